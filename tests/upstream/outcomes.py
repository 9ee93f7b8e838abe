"""pytest plugin: one outcome per test of SQLAlchemy's suite, written as JSON for the comparison.

Loaded in both runs (``-p tests.upstream.outcomes --upstream-outcomes PATH``), so the two files
differ only by what the monitor changed. It also refuses to run if ``import sqlalchemy`` found
the sdist's copy: the point is to test the installed SQLAlchemy, the one the monitor patches.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

# A test's phases fold into one outcome; a later phase only makes it worse.
_RANK = {"passed": 0, "xpassed": 0, "skipped": 1, "xfailed": 1, "failed": 3, "error": 3}
DETAIL_CHARS = 1500


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("session_monitor upstream")
    group.addoption(
        "--upstream-outcomes",
        metavar="PATH",
        help="write {nodeid: outcome} and the SQLAlchemy under test to this JSON file",
    )


class Outcomes:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.outcomes: dict[str, str] = {}
        self.details: dict[str, str] = {}
        self.sqlalchemy: dict[str, str] = {}

    @pytest.hookimpl(trylast=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        # SQLAlchemy's conftest has run by now, and with it any sys.path change it makes.
        import sqlalchemy

        location = Path(sqlalchemy.__file__).resolve()
        self.sqlalchemy = {"version": sqlalchemy.__version__, "file": str(location)}
        if location.is_relative_to(session.config.rootpath.resolve()):
            raise pytest.UsageError(
                f"sqlalchemy was imported from the test suite's own copy ({location}), "
                "not the installed package"
            )

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        outcome = _outcome(report)
        if outcome is None:
            return
        previous = self.outcomes.get(report.nodeid)
        if previous is None or _RANK[outcome] > _RANK[previous]:
            self.outcomes[report.nodeid] = outcome
            if outcome in ("failed", "error"):
                self.details[report.nodeid] = _detail(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.outcomes[report.nodeid] = "error"
            self.details[report.nodeid] = _detail(report)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        data = {
            "sqlalchemy": self.sqlalchemy,
            "exitstatus": int(exitstatus),
            "outcomes": self.outcomes,
            "details": self.details,
        }
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        temporary.write_text(json.dumps(data, indent=1, sort_keys=True))
        temporary.replace(self.path)


def _outcome(report: pytest.TestReport) -> str | None:
    xfail = hasattr(report, "wasxfail")
    if report.when == "call":
        if report.passed:
            return "xpassed" if xfail else "passed"
        if report.skipped:
            return "xfailed" if xfail else "skipped"
        return "failed"
    if report.failed:
        return "error"
    if report.skipped:
        return "skipped"
    return None  # a phase around the call that passed says nothing about the test


def _detail(report: pytest.TestReport | pytest.CollectReport) -> str:
    text = report.longreprtext
    crash = getattr(report.longrepr, "reprcrash", None)
    message = getattr(crash, "message", None)
    if isinstance(message, str) and message:
        return f"{report.when}: {message}"[:DETAIL_CHARS]
    return text[-DETAIL_CHARS:]


def pytest_configure(config: pytest.Config) -> None:
    path: Any = config.getoption("--upstream-outcomes")
    if path:
        config.pluginmanager.register(Outcomes(Path(path)), "session_monitor_outcomes")
