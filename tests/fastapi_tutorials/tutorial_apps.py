"""pytest plugin: the injected monitor on every app the tutorials build, and what it labelled.

Loaded after ``-p inject`` (``tests/sdist_suite/plugins/inject.py``, which builds one
``SessionMonitor()`` watching every engine and fails the run on an internal error): every
``FastAPI`` or ``Starlette`` app built from then on is given to ``monitor.instrument_app`` as its
constructor returns, so the middleware is the outermost user middleware of each,
sub-applications included.

The monitor's request-end call is wrapped on this one monitor: when a request ends it reads the
route label the monitor settled on (``RequestScope.route`` after the app returned) and, from the
same context, FastAPI's request telemetry, whose route and span identify the request in
``tutorial_routes.py``'s records. It also keeps every WARNING or worse of the ``session_monitor``
logger, with the test that was running: tutorial code must cause no leak or pitfall warning.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest
from bed_plugin import CurrentTest, write_report

from session_monitor import SessionMonitor


class Warnings(logging.Handler):
    def __init__(self, instrumented: Instrumented) -> None:
        super().__init__(logging.WARNING)
        self.instrumented = instrumented
        self.records: list[dict[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(
            {
                "test": self.instrumented.current,
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
            }
        )


class Instrumented(CurrentTest):
    def __init__(self, path: Path, monitor: SessionMonitor) -> None:
        self.path = path
        self.monitor = monitor
        self.apps: weakref.WeakSet[Any] = weakref.WeakSet()
        self.labels: list[dict[str, Any]] = []
        self.bed_errors: list[str] = []
        self.lock = threading.Lock()
        self.warnings = Warnings(self)
        self.undo: list[tuple[Any, str, Any]] = []

    def install(self) -> None:
        logging.getLogger("session_monitor").addHandler(self.warnings)
        from fastapi import FastAPI
        from starlette.applications import Starlette

        # FastAPI.__init__ does not call Starlette's: each class is wrapped, each app once.
        for cls in (FastAPI, Starlette):
            self._wrap(cls, "__init__", self._instrumenting_init(cls.__init__))
        # On the instance: the middleware calls `monitor._request_finished(request)`.
        self.monitor._request_finished = self._labelling(self.monitor._request_finished)  # type: ignore[method-assign]

    def _wrap(self, owner: Any, name: str, replacement: Any) -> None:
        self.undo.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, replacement)

    def uninstall(self) -> None:
        for owner, name, original in reversed(self.undo):
            setattr(owner, name, original)
        logging.getLogger("session_monitor").removeHandler(self.warnings)

    def _instrumenting_init(self, original: Any) -> Any:
        @functools.wraps(original)
        def __init__(app: Any, *args: Any, **kwargs: Any) -> None:
            original(app, *args, **kwargs)
            if app not in self.apps:
                self.apps.add(app)
                self.monitor.instrument_app(app)

        return __init__

    def _labelling(self, original: Any) -> Any:
        @functools.wraps(original)
        def request_finished(request: Any) -> None:
            try:
                self.label(request)
            except Exception as error:  # the bed's own failure: reported, never the app's
                self.bed_errors.append(f"[{self.current}] {type(error).__name__}: {error}")
            original(request)

        return request_finished

    def label(self, request: Any) -> None:
        try:  # FastAPI 0.165 and later
            from fastapi.telemetry._api import _get_request_telemetry
        except ImportError:
            telemetry = None
        else:
            telemetry = _get_request_telemetry()
        span = getattr(telemetry, "span", None)
        context = span.get_span_context() if span is not None else None
        attributes = dict(getattr(span, "attributes", None) or {})
        with self.lock:
            self.labels.append(
                {
                    "test": self.current,
                    "span_id": format(context.span_id, "016x") if context else None,
                    "method": getattr(request, "method", None),
                    "path": attributes.get("url.path"),
                    "ours": request.route,
                    "fastapi": getattr(telemetry, "route", None),
                    "telemetry": telemetry is not None,
                }
            )

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        data = {
            "apps_instrumented": len(self.apps),
            "labels": self.labels,
            "warnings": self.warnings.records,
            "bed_errors": self.bed_errors,
        }
        write_report(self.path, data)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self.uninstall()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("session_monitor tutorials")
    group.addoption(
        "--tutorial-labels",
        metavar="PATH",
        help="instrument every app with the injected monitor; write its route labels here",
    )


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    # trylast: after inject.py has built the monitor in its own pytest_configure.
    path: Any = config.getoption("--tutorial-labels")
    injected = config.pluginmanager.get_plugin("session_monitor_injected")
    if not path or injected is None:
        raise pytest.UsageError("tutorial_apps needs --tutorial-labels and -p inject before it")
    instrumented = Instrumented(Path(path), injected.monitor)
    instrumented.install()
    config.pluginmanager.register(instrumented, "session_monitor_tutorial_apps")
