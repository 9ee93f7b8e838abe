"""Read the PromQL of a Grafana dashboard with its template variables filled in.

    queries = panel_queries(dashboard, {"job": ".*", "instance": ".*", "pool_name": ".*",
                                        "route": ".*", "__rate_interval": "1m",
                                        "__range": "5m", "__interval": "15s"})

gives one (panel title, expr) pair per target, panels of collapsed rows included.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

# $name, ${name} and ${name:format}.
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Yield every panel, rows and the panels nested in collapsed rows included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from iter_panels(panel)


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """Replace each $variable in expr; a variable without a value is an error."""
    values = {name.lstrip("$"): value for name, value in variables.items()}

    def value_of(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no value given for ${name} (in {expr!r})")
        return values[name]

    return _VARIABLE.sub(value_of, expr)


def panel_queries(
    dashboard: Mapping[str, Any], variables: Mapping[str, str]
) -> list[tuple[str, str]]:
    """Return (panel title, expr with variables substituted) for every target of every panel."""
    return [
        (panel.get("title", ""), substitute(target["expr"], variables))
        for panel in iter_panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
