"""pytest plugin: a SessionMonitor watching everything a project's own test suite does.

``-p inject`` (the run with the monitor) builds one ``SessionMonitor()`` (no engine: every engine
in the process) before any test runs, with its own registry, leak logging, stack capture and an
age threshold, so that every hook, pool listener and the age watcher's thread run under the
suite's tests. At the end it prints what the monitor counted and fails the run if the monitor
counted an internal error: the monitor swallows its own failures, so the tests alone would never
show one.
"""

from __future__ import annotations

import gc
import logging
import os
import traceback
from pathlib import Path
from typing import Any

import pytest
from bed_plugin import write_report
from prometheus_client import CollectorRegistry

from session_monitor import SessionMonitor

INTERNAL_ERRORS = "session_monitor_internal_errors_total"
# What the summary adds up, by sample name; the keys of the JSON report.
TOTALS = {
    "sessions_opened": "sqlalchemy_sessions_opened_total",
    "sessions_closed": "sqlalchemy_sessions_closed_total",
    "checkouts": "db_client_connection_wait_time_seconds_count",
    "checkins": "db_client_connection_use_time_seconds_count",
    "connections_created": "db_client_connection_create_time_seconds_count",
    "invalidations": "sqlalchemy_pool_invalidations_total",
    "timeouts": "db_client_connection_timeouts_total",
}
BY_LABEL = {
    "leaks": ("sqlalchemy_sessions_leaked_total", "reason"),
    "transactions": ("sqlalchemy_transactions_total", "outcome"),
    "internal_errors": (INTERNAL_ERRORS, "listener"),
}
KEPT_LOGS = 20


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("session_monitor sdist suite")
    group.addoption("--monitor-report", metavar="PATH", help="write the monitor's counts here")
    group.addoption(
        "--monitor-leak-threshold",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="leak_threshold of the injected monitor; 0 = off (default 1.0)",
    )
    group.addoption(
        "--monitor-otel",
        action="store_true",
        help="with the OpenTelemetry observer too (SDK providers that export nowhere), which "
        "adds statement listeners to every engine",
    )
    group.addoption(
        "--monitor-no-stacks",
        action="store_true",
        help="capture_stacks=False (default: True, which walks the stack at every open)",
    )


class ErrorLog(logging.Handler):
    """The monitor logs its first failure of each listener with a traceback: keep those."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.records) < KEPT_LOGS:
            # Which test was running: the first failure of a listener is the one logged.
            test = os.environ.get("PYTEST_CURRENT_TEST", "outside any test")
            text = f"[{test}] {record.getMessage()}"
            if record.exc_info:
                text += "\n" + "".join(traceback.format_exception(*record.exc_info))
            self.records.append(text)


class Injected:
    def __init__(self, config: pytest.Config) -> None:
        threshold: float = config.getoption("--monitor-leak-threshold")
        self.report_path: str | None = config.getoption("--monitor-report")
        self.registry = CollectorRegistry()
        self.errors = ErrorLog()
        self.warnings = 0
        logger = logging.getLogger("session_monitor")
        logger.addHandler(self.errors)
        otel: dict[str, Any] = {}
        if config.getoption("--monitor-otel"):
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.trace import TracerProvider

            otel = {"tracer_provider": TracerProvider(), "meter_provider": MeterProvider()}
        self.monitor = SessionMonitor(
            registry=self.registry,
            log_leaks=True,
            capture_stacks=not config.getoption("--monitor-no-stacks"),
            leak_threshold=threshold or None,
            metrics_path=None,
            **otel,
        )
        self.summary: dict[str, Any] = {}

    def collect(self) -> dict[str, Any]:
        # Sessions the tests dropped are closed (and counted as gc leaks) when collected.
        gc.collect()
        totals = dict.fromkeys(TOTALS, 0.0)
        by_label: dict[str, dict[str, float]] = {key: {} for key in BY_LABEL}
        names = {sample: key for key, sample in TOTALS.items()}
        labelled = {sample: (key, label) for key, (sample, label) in BY_LABEL.items()}
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name in names:
                    totals[names[sample.name]] += sample.value
                elif sample.name in labelled:
                    key, label = labelled[sample.name]
                    value = sample.labels[label]
                    by_label[key][value] = by_label[key].get(value, 0.0) + sample.value
        return {
            "totals": {key: int(value) for key, value in totals.items()},
            **{
                key: {label: int(v) for label, v in sorted(values.items()) if v}
                for key, values in by_label.items()
            },
            "tracked_sessions_at_end": self.monitor.tracked_sessions,
            "tracked_checkouts_at_end": self.monitor.tracked_checkouts,
            "error_log_records": self.errors.count,
            "error_logs": self.errors.records,
        }

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        # trylast: after SQLAlchemy's own final cleanup has disposed of its engines.
        self.summary = self.collect()
        if self.report_path:
            write_report(Path(self.report_path), self.summary)
        if self.summary["internal_errors"] or self.errors.count:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        summary = self.summary
        if not summary:
            return  # the session never finished (a usage error): nothing was counted
        totals = summary["totals"]
        errors = sum(summary["internal_errors"].values())
        terminalreporter.write_sep("=", "session_monitor")
        terminalreporter.write_line(
            " ".join(f"{key}={value}" for key, value in totals.items())
            + f" leaks={summary['leaks']} transactions={summary['transactions']}"
        )
        terminalreporter.write_line(
            f"{INTERNAL_ERRORS} = {errors} {summary['internal_errors'] or ''}",
            red=bool(errors),
            green=not errors,
        )
        for text in summary["error_logs"]:
            terminalreporter.write_line(text, red=True)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self.monitor.uninstrument()
        logging.getLogger("session_monitor").removeHandler(self.errors)


def pytest_configure(config: pytest.Config) -> None:
    # Before the session starts: SQLAlchemy's plugin opens its first engines at sessionstart.
    config.pluginmanager.register(Injected(config), "session_monitor_injected")
