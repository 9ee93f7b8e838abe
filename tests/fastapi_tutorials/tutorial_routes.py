"""pytest plugin: every request FastAPI served, with the route FastAPI itself reports for it.

Loaded in both runs (``-p tutorial_routes --tutorial-routes PATH``), so the runs
differ only by the monitor. FastAPI (0.165 and later) has its own OpenTelemetry telemetry: with a
tracer provider configured it opens a server span per request or WebSocket and sets its
``http.route`` when the router selects a route (``_route_selected``, mounts included). This sets
an SDK tracer provider that exports nowhere and keeps, per test, what each server span said.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from bed_plugin import CurrentTest, write_report


def telemetry_available() -> bool:
    try:
        import fastapi.telemetry  # noqa: F401
        from opentelemetry.sdk.trace import TracerProvider  # noqa: F401
    except ImportError:
        return False
    return True


class Routes(CurrentTest):
    """Keeps one record per FastAPI server span that ended, under the test that made it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.requests: dict[str, list[dict[str, Any]]] = {}
        self.lock = threading.Lock()
        self.telemetry = telemetry_available()
        if self.telemetry:
            self._install_provider()

    def _install_provider(self) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
        from opentelemetry.trace import SpanKind

        routes = self

        class Keep(SpanProcessor):
            def on_end(self, span: ReadableSpan) -> None:
                scope = span.instrumentation_scope
                if span.kind is not SpanKind.SERVER or scope is None or scope.name != "fastapi":
                    return
                attributes = dict(span.attributes or {})
                websocket = attributes.get("network.protocol.name") == "websocket"
                context = span.get_span_context()
                routes.record(
                    {
                        "span_id": format(context.span_id, "016x") if context else None,
                        "type": "websocket" if websocket else "http",
                        "method": attributes.get("http.request.method"),
                        "path": attributes.get("url.path"),
                        "name": span.name,
                        "route": attributes.get("http.route"),
                        "status": attributes.get("http.response.status_code"),
                    }
                )

        provider = TracerProvider()
        provider.add_span_processor(Keep())
        trace.set_tracer_provider(provider)

    def record(self, request: dict[str, Any]) -> None:
        with self.lock:
            self.requests.setdefault(self.current, []).append(request)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        write_report(self.path, {"telemetry": self.telemetry, "requests": self.requests})


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("session_monitor tutorials")
    group.addoption(
        "--tutorial-routes",
        metavar="PATH",
        help="write every request FastAPI served, with FastAPI's own http.route, to this file",
    )


def pytest_configure(config: pytest.Config) -> None:
    path: Any = config.getoption("--tutorial-routes")
    if path:
        config.pluginmanager.register(Routes(Path(path)), "session_monitor_tutorial_routes")
