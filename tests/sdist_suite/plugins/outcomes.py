"""pytest plugin: one outcome per test of a project's suite, written as JSON for the comparison.

Loaded in both runs (``-p outcomes --upstream-outcomes PATH --upstream-package NAME``), so the
two files differ only by what the monitor changed. It also refuses to run if ``import NAME``
(``sqlalchemy``, ``fastapi``) found the sdist's copy: the point is to test the installed package,
the one the monitor patches or instruments.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
from bed_plugin import write_report

# A test's phases fold into one outcome; a later phase only makes it worse.
_RANK = {"passed": 0, "xpassed": 0, "skipped": 1, "xfailed": 1, "failed": 3, "error": 3}
DETAIL_CHARS = 1500


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("session_monitor sdist suite")
    group.addoption(
        "--upstream-outcomes",
        metavar="PATH",
        help="write {nodeid: outcome} and the package under test to this JSON file",
    )
    group.addoption(
        "--upstream-package",
        metavar="NAME",
        help="the package the suite tests (sqlalchemy, fastapi): it must be the installed one",
    )


class Outcomes:
    def __init__(self, path: Path, package: str) -> None:
        self.path = path
        self.package_name = package
        self.outcomes: dict[str, str] = {}
        self.details: dict[str, str] = {}
        self.package: dict[str, str] = {}

    @pytest.hookimpl(trylast=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        # The suite's conftest has run by now, and with it any sys.path change it makes.
        module = importlib.import_module(self.package_name)
        location = Path(module.__file__ or "").resolve()
        version = str(getattr(module, "__version__", ""))
        self.package = {"name": self.package_name, "version": version, "file": str(location)}
        if location.is_relative_to(session.config.rootpath.resolve()):
            raise pytest.UsageError(
                f"{self.package_name} was imported from the test suite's own copy ({location}), "
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
            "package": self.package,
            "exitstatus": int(exitstatus),
            "outcomes": self.outcomes,
            "details": self.details,
        }
        write_report(self.path, data)


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
    package: Any = config.getoption("--upstream-package")
    if path and not package:
        raise pytest.UsageError("--upstream-outcomes needs --upstream-package")
    if path:
        config.pluginmanager.register(Outcomes(Path(path), package), "session_monitor_outcomes")
