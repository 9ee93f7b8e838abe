"""What the beds' pytest plugins share: a JSON report written whole, and the test running now.

Imported by module name, as the plugins are loaded (``tests/sdist_suite/runs.py`` puts this folder
and the bed's own on PYTHONPATH): the suite under test may have a ``tests`` package of its own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

OUTSIDE_TESTS = "<outside any test>"


def write_report(path: Path, data: Any) -> None:
    """Written under a temporary name, then renamed: the runner never reads half a report."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps(data, indent=1, sort_keys=True))
    temporary.replace(path)


class CurrentTest:
    """A plugin that knows the node id of the test running now: from its setup to its teardown,
    so a module-scoped client's lifespan counts for its first test."""

    current = OUTSIDE_TESTS

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None, Any, Any]:
        self.current = item.nodeid
        try:
            return (yield)
        finally:
            self.current = OUTSIDE_TESTS
