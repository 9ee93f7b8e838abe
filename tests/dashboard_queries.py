"""Read the PromQL of a Grafana dashboard with its template variables filled in.

    queries = panel_queries(dashboard, {"job": ".*", "instance": ".*", "pool_name": ".*",
                                        "route": ".*", "__rate_interval": "1m",
                                        "__range": "5m", "__interval": "15s"})

gives one (panel title, expr) pair per target, panels of collapsed rows included;
`metric_names(expr)` the series names an expression selects, `label_matchers(selector)` the
matchers of one selector.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

# $name, ${name} and ${name:format}; not label_replace's "$1", which Grafana leaves alone.
_VARIABLE = re.compile(r"\$(?:\{([A-Za-z_]\w*)(?::\w+)?\}|([A-Za-z_]\w*))")
_IDENTIFIER = r"[A-Za-z_:][\w:]*"
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


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


def metric_names(expr: str) -> set[str]:
    """Names of the series an expression selects: identifiers that are not functions,
    keywords, label names, durations or strings."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"\boffset\s+[\w$]+", "", e)
    found = re.findall(rf"(?<![\w:$])({_IDENTIFIER})(?![\w:])(?!\s*\()", e)
    return {name for name in found if name not in {"and", "or", "unless", "bool"}}


def label_matchers(selector: str) -> dict[str, str]:
    """`{a=~"x",b!="y"}` -> {"a": '=~"x"', "b": '!="y"'}."""
    return {label: f'{op}"{value}"' for label, op, value in _MATCHER.findall(selector)}
