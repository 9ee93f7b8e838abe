"""Route labels on apps shaped the way FastAPI's docs build them: routers included with prefixes
(nested), two routers with the same relative path, a mounted sub-application, a mounted app that
routes no further, plain Starlette routes of a FastAPI app, a proxy's root path, websockets.

The label must be the full template, the same string FastAPI's own telemetry reports as
`http.route` (compared with it where the installed FastAPI has telemetry).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import sample
from fastapi import APIRouter, FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from session_monitor import SessionMonitor
from session_monitor.state.context import RequestScope

pytestmark = pytest.mark.anyio


def query(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.execute(text("SELECT 1")).scalar_one())


async def query_in_thread(engine: Engine) -> int:
    return await run_in_threadpool(query, engine)


def build(engine: Engine, static_dir: Path, **fastapi_kw: Any) -> FastAPI:
    app = FastAPI(**fastapi_kw)
    items = APIRouter()
    users = APIRouter()
    admin = APIRouter(prefix="/admin")

    @items.get("/{item_id}")
    def read_item(item_id: int) -> int:
        return query(engine)

    @users.get("/{user_id}")
    def read_user(user_id: int) -> int:
        return query(engine)

    @admin.get("/stats")
    def stats() -> int:
        return query(engine)

    @app.get("/plain/{n}")
    def plain(n: int) -> int:
        return query(engine)

    api = APIRouter(prefix="/api/v1")
    api.include_router(items, prefix="/items")
    api.include_router(users, prefix="/users")
    api.include_router(admin)
    app.include_router(api)

    sub = FastAPI()

    @sub.get("/sub/{x}")
    def sub_route(x: int) -> int:
        return query(engine)

    app.mount("/subapi", sub)
    # A mount with a parameter: each tenant must not become a series of its own.
    tenants = FastAPI()

    @tenants.get("/orders/{order_id}")
    def tenant_order(order_id: int) -> int:
        return query(engine)

    app.mount("/tenants/{tenant}", tenants)
    app.mount("/static", StaticFiles(directory=static_dir), name="static")
    return app


# path -> the template FastAPI's telemetry reports, without a root path
EXPECTED = {
    "/api/v1/items/3": "/api/v1/items/{item_id}",
    "/api/v1/users/4": "/api/v1/users/{user_id}",
    "/api/v1/admin/stats": "/api/v1/admin/stats",
    "/plain/5": "/plain/{n}",
    "/subapi/sub/6": "/subapi/sub/{x}",
    "/tenants/acme/orders/1": "/tenants/{tenant}/orders/{order_id}",
    "/tenants/globex/orders/2": "/tenants/{tenant}/orders/{order_id}",
    "/static/a.txt": "/static/{path}",
    "/openapi.json": "/openapi.json",
    "/docs": "/docs",
}
WITH_SESSIONS = (
    "/api/v1/items/3",
    "/api/v1/users/4",
    "/api/v1/admin/stats",
    "/plain/5",
    "/subapi/sub/6",
    "/tenants/acme/orders/1",
    "/tenants/globex/orders/2",
)


def telemetry_kw() -> tuple[dict[str, Any], Any]:
    """FastAPI's own telemetry with an in-memory exporter, where this FastAPI has it."""
    try:
        import fastapi.telemetry  # noqa: F401
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    except ImportError:
        return {}, None
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    config = {"tracer_provider": provider, "metrics": False, "logs": False}
    return {"telemetry": config}, exporter


def fastapi_routes(exporter: Any) -> list[str]:
    routes = []
    for span in exporter.get_finished_spans():
        route = (span.attributes or {}).get("http.route")
        if route is not None and span.parent is None:
            routes.append(str(route))
    return routes


@pytest.fixture
def labels(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The label of every request the monitor finished, in order."""
    seen: list[str] = []
    finish = SessionMonitor._request_finished

    def record(self: SessionMonitor, request: RequestScope) -> None:
        seen.append(request.route)
        finish(self, request)

    monkeypatch.setattr(SessionMonitor, "_request_finished", record)
    return seen


@pytest.mark.parametrize("root_path", ["", "/proxy"])
async def test_labels_are_fastapis_http_route(
    make_engine: Any, sqlite_url: str, registry: CollectorRegistry, tmp_path: Path,
    labels: list[str], root_path: str,
) -> None:
    engine = make_engine(sqlite_url)
    (tmp_path / "a.txt").write_text("a")
    kw, exporter = telemetry_kw()
    # The root path as a server sets it (uvicorn --root-path), FastAPI(root_path=) is deprecated.
    app = build(engine, tmp_path, **kw)
    monitor = SessionMonitor(engine, registry=registry)
    monitor.instrument_app(app)
    try:
        transport = httpx.ASGITransport(app=app, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            for path in EXPECTED:
                # A server with a root path passes it in the path too (ASGI's rule).
                assert (await http.get(root_path + path)).status_code == 200, path
        for path in WITH_SESSIONS:
            route = root_path + EXPECTED[path]
            opened = sum(1 for other in WITH_SESSIONS if EXPECTED[other] == EXPECTED[path])
            assert sample(registry, "sqlalchemy_sessions_opened_total", route=route, method="GET") == opened, route
    finally:
        monitor.uninstrument()
    expected = [root_path + template for template in EXPECTED.values()]
    assert labels == expected
    if exporter is not None:
        assert fastapi_routes(exporter) == expected


async def test_unmatched_request_and_no_route_collision(
    make_engine: Any, sqlite_url: str, registry: CollectorRegistry, tmp_path: Path,
    labels: list[str],
) -> None:
    engine = make_engine(sqlite_url)
    app = build(engine, tmp_path)
    monitor = SessionMonitor(engine, registry=registry)
    monitor.instrument_app(app)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            assert (await http.get("/nothing/here")).status_code == 404
            for n in range(3):
                assert (await http.get(f"/api/v1/items/{n}")).status_code == 200
            assert (await http.get("/api/v1/users/1")).status_code == 200
        # Both routers' "/{id}" are series of their own, under their full templates.
        assert sample(registry, "sqlalchemy_sessions_opened_total", route="/api/v1/items/{item_id}", method="GET") == 3
        assert sample(registry, "sqlalchemy_sessions_opened_total", route="/api/v1/users/{user_id}", method="GET") == 1
    finally:
        monitor.uninstrument()
    assert labels == ["<unmatched>"] + ["/api/v1/items/{item_id}"] * 3 + ["/api/v1/users/{user_id}"]


def test_websocket_sessions_are_attributed_and_leaks_reported(
    make_engine: Any, sqlite_url: str, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture,
) -> None:
    engine = make_engine(sqlite_url)
    app = FastAPI()
    router = APIRouter(prefix="/ws")
    kept: list[Session] = []

    @router.websocket("/echo/{room}")
    async def echo(websocket: WebSocket, room: str) -> None:
        await websocket.accept()
        await websocket.send_text(str(await query_in_thread(engine)))
        await websocket.close()

    @router.websocket("/leak")
    async def leak(websocket: WebSocket) -> None:
        await websocket.accept()
        session = Session(engine)
        await run_in_threadpool(session.execute, text("SELECT 1"))
        kept.append(session)  # never closed: the handler leaks it
        await websocket.close()

    app.include_router(router)
    monitor = SessionMonitor(engine, registry=registry)
    monitor.instrument_app(app)
    try:
        with TestClient(app) as client:
            with client.websocket_connect("/ws/echo/lobby") as ws:
                assert ws.receive_text() == "1"
            with client.websocket_connect("/ws/leak"):
                pass
        opened = sample(registry, "sqlalchemy_sessions_opened_total", route="/ws/echo/{room}", method="WS")
        assert opened == 1
        leaked = sample(
            registry, "sqlalchemy_sessions_leaked_total", route="/ws/leak", method="WS", reason="request_end"
        )
        assert leaked == 1
        assert sample(registry, "sqlalchemy_sessions_opened_total", route="<none>", method="<none>") == 0
    finally:
        monitor.uninstrument()
        for session in kept:
            session.close()


@pytest.mark.parametrize("handler_kind", ["async", "sync"])
def test_500_handler_work_belongs_to_the_failed_request(
    make_engine: Any, sqlite_url: str, registry: CollectorRegistry, handler_kind: str,
) -> None:
    engine = make_engine(sqlite_url)
    app = FastAPI()
    router = APIRouter(prefix="/orders")

    @router.post("/{order_id}")
    def place(order_id: int) -> None:
        raise RuntimeError("payment service down")

    def record_failure() -> JSONResponse:
        query(engine)  # the handler writes the failure down
        return JSONResponse({"detail": "try later"}, status_code=500)

    if handler_kind == "async":

        async def on_error(request: Request, exc: Exception) -> JSONResponse:
            return await run_in_threadpool(record_failure)

    else:

        def on_error(request: Request, exc: Exception) -> JSONResponse:  # type: ignore[misc]
            return record_failure()

    app.add_exception_handler(Exception, on_error)
    app.include_router(router)
    monitor = SessionMonitor(engine, registry=registry)
    monitor.instrument_app(app)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            for _ in range(2):
                response = client.post("/orders/7")
                assert response.status_code == 500
                assert response.json() == {"detail": "try later"}
        route = {"route": "/orders/{order_id}", "method": "POST"}
        assert sample(registry, "sqlalchemy_sessions_opened_total", **route) == 2
        assert sample(registry, "sqlalchemy_sessions_closed_total", **route) == 2
        assert sample(registry, "sqlalchemy_sessions_opened_total", route="<none>", method="<none>") == 0
    finally:
        monitor.uninstrument()


def test_500_handler_leak_is_reported_once(
    make_engine: Any, sqlite_url: str, registry: CollectorRegistry,
) -> None:
    engine = make_engine(sqlite_url)
    app = FastAPI()
    kept: list[Session] = []

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("boom")

    async def leaky_handler(request: Request, exc: Exception) -> PlainTextResponse:
        session = Session(engine)
        await run_in_threadpool(session.execute, text("SELECT 1"))
        kept.append(session)
        return PlainTextResponse("failed", status_code=500)

    app.add_exception_handler(Exception, leaky_handler)
    monitor = SessionMonitor(engine, registry=registry)
    monitor.instrument_app(app)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            assert client.get("/boom").status_code == 500
        labels = {"route": "/boom", "method": "GET"}
        assert sample(registry, "sqlalchemy_sessions_leaked_total", reason="request_end", **labels) == 1
    finally:
        monitor.uninstrument()
        for session in kept:
            session.close()


def test_lifespan_work_is_no_blocking_pitfall(
    make_engine: Any, sqlite_url: str, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture,
) -> None:
    engine = make_engine(sqlite_url)
    served: list[int] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        query(engine)  # create_all, a warm-up query: on the loop, before any request
        yield
        query(engine)  # after the last request

    app = FastAPI(lifespan=lifespan)

    @app.get("/blocking")
    async def blocking() -> int:
        served.append(query(engine))  # a real pitfall: sync I/O inside async def
        return 1

    monitor = SessionMonitor(engine, registry=registry)
    monitor.instrument_app(app)
    try:
        with caplog.at_level("WARNING", logger="session_monitor"), TestClient(app) as client:
            assert client.get("/blocking").status_code == 200
        none = {"route": "<none>", "method": "<none>"}
        assert sample(registry, "sqlalchemy_sessions_opened_total", **none) == 2
        assert sample(registry, "sqlalchemy_session_pitfalls_total", kind="blocking_event_loop", **none) == 0
        # The request's own blocking work is still caught.
        pitfall = {"kind": "blocking_event_loop", "route": "/blocking", "method": "GET"}
        assert sample(registry, "sqlalchemy_session_pitfalls_total", **pitfall) == 1
    finally:
        monitor.uninstrument()
    assert served == [1]


async def test_a_mounted_app_instrumented_too_is_one_request(
    make_engine: Any, sqlite_url: str, registry: CollectorRegistry, tmp_path: Path,
    labels: list[str],
) -> None:
    engine = make_engine(sqlite_url)
    app = build(engine, tmp_path)
    sub = next(route.app for route in app.routes if getattr(route, "path", "") == "/subapi")
    monitor = SessionMonitor(engine, registry=registry)
    monitor.instrument_app(app)
    monitor.instrument_app(sub)  # an app that instruments each FastAPI it builds
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            assert (await http.get("/subapi/sub/1")).status_code == 200
        route = {"route": "/subapi/sub/{x}", "method": "GET"}
        assert sample(registry, "sqlalchemy_sessions_opened_total", **route) == 1
    finally:
        monitor.uninstrument()
    assert labels == ["/subapi/sub/{x}"]
