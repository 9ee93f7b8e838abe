"""The committed dashboard, and its packaged copy, are what grafana/build_dashboard.py builds.

The builder needs Grafana's foundation SDK (the dev extra, on Python 3.11 and later): without it
this module is skipped, and the committed files are still checked by tests/test_dashboard.py
and tests/test_packaging.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip(
    "grafana_foundation_sdk",
    reason="Grafana's foundation SDK is not installed (the dev extra; it needs Python 3.11+)",
)

ROOT = Path(__file__).resolve().parents[1]
BUILDER = ROOT / "grafana" / "build_dashboard.py"


def load_builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_dashboard", BUILDER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_dashboard_is_the_built_one() -> None:
    builder = load_builder()
    built: str = builder.render()
    assert built.endswith("}\n")
    assert [path.relative_to(ROOT).as_posix() for path in builder.OUTPUTS] == [
        "grafana/dashboards/session_monitor.json",
        "session_monitor/assets/session_monitor.json",
    ]
    for path in builder.OUTPUTS:
        assert path.read_bytes() == built.encode("utf-8"), (
            f"{path.relative_to(ROOT)} is not what grafana/build_dashboard.py builds: "
            "run `make dashboard` and commit the result"
        )


def test_building_twice_gives_the_same_bytes() -> None:
    assert load_builder().render() == load_builder().render()


def test_every_row_is_built_in_order_with_its_panels() -> None:
    builder = load_builder()
    panels = builder.build().panels
    rows = [p.title for p in panels if p.type_val == "row"]
    assert rows == [title for title, _ in builder.ROWS]
    assert [p.id_val for p in panels] == list(range(1, len(panels) + 1))
