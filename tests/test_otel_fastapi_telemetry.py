"""Session spans under FastAPI's own telemetry, and the semantic-convention attributes they carry.

FastAPI 0.142 and later make the HTTP server span themselves (`FastAPI(telemetry=...)`), with no
opentelemetry-instrumentation-fastapi: a session's span must be part of that request's trace,
below its server span, with the same `http.route`. Those tests skip on an older FastAPI. The rest
(database attributes, error.type, WebSockets, the extras) run on every FastAPI.

Providers are built per test and passed in; no test sets a global provider.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import fastapi
import pytest
from fastapi import APIRouter, Depends, FastAPI, Request, WebSocket
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, make_url, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from session_monitor import SessionMonitor, pool_name_for
from session_monitor.exporters.otel_spans import connection_attributes

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

NATIVE_TELEMETRY = importlib.util.find_spec("fastapi.telemetry") is not None
needs_native_telemetry = pytest.mark.skipif(
    not NATIVE_TELEMETRY,
    reason=f"FastAPI {fastapi.__version__} has no built-in telemetry (FastAPI(telemetry=...) "
    "came with 0.142): its server span comes from opentelemetry-instrumentation-fastapi, "
    "which test_packaging.py and test_tracing.py cover",
)
SESSION_SPANS = ("db.session", "db.connection")
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def by_id(exporter: InMemorySpanExporter) -> dict[int, ReadableSpan]:
    return {s.context.span_id: s for s in exporter.get_finished_spans() if s.context is not None}


def sessions_of(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name in SESSION_SPANS]


def attrs_of(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def parent_of(span: ReadableSpan, found: dict[int, ReadableSpan]) -> ReadableSpan:
    assert span.parent is not None, f"{span.name} is a root span"
    return found[span.parent.span_id]


def server_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]


def telemetry(tracer_provider: TracerProvider, **options: Any) -> dict[str, Any]:
    """FastAPI's telemetry: traces to the test's provider, nothing global, no metrics or logs
    (they would go to the global providers)."""
    return {"tracer_provider": tracer_provider, "metrics": False, "logs": False, **options}


def get_db(request: Request) -> Iterator[Session]:
    db: Session = request.app.state.sessions()
    try:
        yield db
    finally:
        db.close()


async def get_async_db(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.async_sessions() as db:
        yield db


Db = Annotated[Session, Depends(get_db)]
AsyncDb = Annotated[AsyncSession, Depends(get_async_db)]


def add_routes(app: FastAPI, router: APIRouter | None = None) -> None:
    routes = router or app

    @routes.get("/items/{item_id}")
    def read_item(item_id: int, db: Db) -> dict[str, int]:
        return {"id": db.execute(text("SELECT :i"), {"i": item_id}).scalar_one()}

    @routes.get("/async/{item_id}")
    async def read_async(item_id: int, db: AsyncDb) -> dict[str, int]:
        return {"id": (await db.execute(text("SELECT :i"), {"i": item_id})).scalar_one()}

    @routes.get("/core/{item_id}")
    def read_core(item_id: int, request: Request) -> dict[str, int]:
        with request.app.state.engine.connect() as connection:
            return {"id": connection.execute(text("SELECT :i"), {"i": item_id}).scalar_one()}

    if router is not None:
        app.include_router(router, prefix="/api")


# Where the routes are, the path asked, and the template both FastAPI and the monitor must report.
SHAPES = {
    "plain": ("", "/items/{item_id}"),
    "include_router": ("/api/v1", "/api/v1/items/{item_id}"),
    "mounted app": ("/sub", "/sub/items/{item_id}"),
}


def build(
    shape: str, tracer_provider: TracerProvider, engine: Engine, async_engine: Any, **options: Any
) -> FastAPI:
    app = FastAPI(telemetry=telemetry(tracer_provider, **options))
    routed = app
    if shape == "mounted app":
        # The sub-app's own telemetry steps aside for the outer app's, as FastAPI documents.
        routed = FastAPI(telemetry=telemetry(tracer_provider, **options))
        app.mount("/sub", routed)
    for state in {app, routed}:
        state.state.engine = engine
        state.state.sessions = sessionmaker(engine)
        state.state.async_sessions = async_sessionmaker(async_engine)
    add_routes(routed, APIRouter(prefix="/v1") if shape == "include_router" else None)
    return app


@needs_native_telemetry
@pytest.mark.parametrize(
    "operation_spans", [False, True], ids=["server span only", "operation spans"]
)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("endpoint", ["items", "async", "core"])
def test_session_spans_nest_under_fastapis_own_server_span_with_its_route(
    shape: str,
    endpoint: str,
    operation_spans: bool,
    tmp_path: Path,
    make_engine: Callable[..., Engine],
    make_monitor: Callable[..., SessionMonitor],
    registry: CollectorRegistry,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    tracer_provider, exporter = spans
    engine = make_engine(f"sqlite:///{tmp_path / 'app.db'}")
    # NullPool: its connections close at checkin, on the client's event loop, which is gone by
    # the time the test could dispose of a pool.
    async_engine = create_async_engine(
        f"sqlite+aiosqlite:///{tmp_path / 'app.db'}", poolclass=NullPool
    )
    app = build(shape, tracer_provider, engine, async_engine, operation_spans=operation_spans)
    monitor = make_monitor(engine, async_engine, registry=registry, tracer_provider=tracer_provider)
    monitor.instrument_app(app)
    prefix, template = SHAPES[shape]
    template = template.replace("/items/", f"/{endpoint}/")
    with TestClient(app) as client:
        assert client.get(f"{prefix}/{endpoint}/7").json() == {"id": 7}

    found = by_id(exporter)
    (server,) = server_spans(exporter)
    (session,) = sessions_of(exporter)
    assert server.instrumentation_scope is not None
    assert server.instrumentation_scope.name == "fastapi"  # FastAPI's own, no other package
    assert server.parent is None
    assert session.context is not None and server.context is not None
    assert session.context.trace_id == server.context.trace_id
    parent = parent_of(session, found)
    if operation_spans:
        # The span current where the session first used the database: the endpoint's.
        assert parent.name == "fastapi.endpoint"
        assert parent_of(parent, found) is server
    else:
        assert parent is server
    assert attrs_of(server)["http.route"] == template
    assert attrs_of(session)["http.route"] == attrs_of(server)["http.route"]
    assert attrs_of(session)["http.request.method"] == attrs_of(server)["http.request.method"]
    assert server.name == f"GET {template}"


@needs_native_telemetry
def test_failed_and_leaking_requests_keep_their_sessions_under_the_server_span(
    sqlite_url: str,
    make_engine: Callable[..., Engine],
    make_monitor: Callable[..., SessionMonitor],
    registry: CollectorRegistry,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    tracer_provider, exporter = spans
    engine = make_engine(sqlite_url)
    app = FastAPI(telemetry=telemetry(tracer_provider, operation_spans=False))
    app.state.sessions = sessionmaker(engine)
    leaked: list[Session] = []

    @app.get("/fail/{item_id}")
    def fail(item_id: int, db: Db) -> None:
        db.execute(text("SELECT :i"), {"i": item_id})
        raise RuntimeError("the endpoint failed")

    @app.get("/leak/{item_id}")
    def leak(item_id: int) -> dict[str, str]:
        session = app.state.sessions()
        session.execute(text("SELECT :i"), {"i": item_id})
        leaked.append(session)  # still open at request end
        return {"status": "leaked"}

    make_monitor(engine, registry=registry, tracer_provider=tracer_provider).instrument_app(app)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            assert client.get("/fail/1").status_code == 500
            assert client.get("/leak/2").status_code == 200
    finally:
        for session in leaked:
            session.close()

    found = by_id(exporter)
    servers = {attrs_of(s)["http.route"]: s for s in server_spans(exporter)}
    assert set(servers) == {"/fail/{item_id}", "/leak/{item_id}"}
    for session in sessions_of(exporter):
        route = attrs_of(session)["http.route"]
        assert parent_of(session, found) is servers[route]
    (failed,) = [s for s in sessions_of(exporter) if attrs_of(s)["http.route"] == "/fail/{item_id}"]
    assert servers["/fail/{item_id}"].status.status_code is StatusCode.ERROR
    assert failed.status.status_code is StatusCode.UNSET  # the session itself did nothing wrong
    (leaking,) = [
        s for s in sessions_of(exporter) if attrs_of(s)["http.route"] == "/leak/{item_id}"
    ]
    assert leaking.status.status_code is StatusCode.ERROR
    assert attrs_of(leaking)["error.type"] == "session_leaked"


@needs_native_telemetry
def test_with_the_legacy_instrumentor_too_there_is_one_server_span(
    sqlite_url: str,
    make_engine: Callable[..., Engine],
    make_monitor: Callable[..., SessionMonitor],
    registry: CollectorRegistry,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """An app upgraded to FastAPI's telemetry that still calls FastAPIInstrumentor: FastAPI sees
    the instrumentor's middleware and makes no span of its own; the session nests under the one."""
    instrumentation = pytest.importorskip("opentelemetry.instrumentation.fastapi")
    tracer_provider, exporter = spans
    engine = make_engine(sqlite_url)
    app = FastAPI(telemetry=telemetry(tracer_provider, operation_spans=False))
    app.state.sessions = sessionmaker(engine)
    add_routes(app)
    make_monitor(engine, registry=registry, tracer_provider=tracer_provider).instrument_app(app)
    instrumentation.FastAPIInstrumentor.instrument_app(app, tracer_provider=tracer_provider)
    try:
        with TestClient(app) as client:
            assert client.get("/items/3").json() == {"id": 3}
    finally:
        instrumentation.FastAPIInstrumentor.uninstrument_app(app)

    (server,) = server_spans(exporter)
    (session,) = sessions_of(exporter)
    assert parent_of(session, by_id(exporter)) is server
    assert attrs_of(session)["http.route"] == attrs_of(server)["http.route"] == "/items/{item_id}"


# -- semantic-convention attributes, on every FastAPI ------------------------------------------


def test_connection_attributes_come_from_the_url_without_credentials() -> None:
    url = make_url("postgresql+psycopg://app_user:pa55word@db.example:6543/shop?sslmode=require")
    assert connection_attributes(url) == {
        "db.namespace": "shop",
        "server.address": "db.example",
        "server.port": 6543,
    }
    assert connection_attributes(make_url("mysql+pymysql://u:p@db.example/shop")) == {
        "db.namespace": "shop",
        "server.address": "db.example",
    }
    assert connection_attributes(make_url("sqlite:////var/lib/app/app.db")) == {
        "db.namespace": "/var/lib/app/app.db"
    }
    for memory in ("sqlite://", "sqlite:///:memory:", "sqlite:///file::memory:?uri=true"):
        assert connection_attributes(make_url(memory)) == {}
    # A socket directory in the query is no server.address (and the query never shows).
    assert connection_attributes(make_url("postgresql://u@/shop?host=/run/postgresql")) == {
        "db.namespace": "shop"
    }


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'app.db'}"
    url = make_url(request.getfixturevalue("postgres_url")).set(drivername="postgresql+psycopg")
    # The server trusts every password: this one must show nowhere.
    return url.set(password="n0t-in-spans").render_as_string(hide_password=False)


def test_session_span_carries_the_database_attributes_and_no_credentials(
    database_url: str,
    make_engine: Callable[..., Engine],
    make_monitor: Callable[..., SessionMonitor],
    registry: CollectorRegistry,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    tracer_provider, exporter = spans
    engine = make_engine(database_url)
    make_monitor(engine, registry=registry, tracer_provider=tracer_provider)
    with Session(engine) as session:
        session.execute(text("SELECT 1"))

    (span,) = sessions_of(exporter)
    attrs = attrs_of(span)
    url = engine.url
    assert span.kind is SpanKind.INTERNAL
    assert attrs["db.system.name"] == (
        "sqlite" if url.get_backend_name() == "sqlite" else "postgresql"
    )
    assert attrs["db.client.connection.pool.name"] == pool_name_for(url)
    assert attrs["db.namespace"] == url.database
    if url.host:
        assert attrs["server.address"] == url.host
        assert attrs.get("server.port") == url.port
    else:
        assert "server.address" not in attrs
    # One session is no single database operation: none of the operation attributes.
    assert not {"db.operation.name", "db.query.summary", "db.query.text"} & set(attrs)
    shown = [str(v) for v in attrs.values()] + [
        str(v) for event in span.events for v in (event.attributes or {}).values()
    ]
    assert url.password is None or not any(str(url.password) in v for v in shown)
    # (A user named like the database, postgres on postgres, is seen as db.namespace: skipped.)
    assert url.username in (None, url.database) or not any(url.username == v for v in shown)


def test_pool_name_given_to_the_monitor_keeps_the_database_attributes(
    sqlite_url: str,
    make_engine: Callable[..., Engine],
    make_monitor: Callable[..., SessionMonitor],
    registry: CollectorRegistry,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    tracer_provider, exporter = spans
    engine = make_engine(sqlite_url)
    make_monitor(engine, pool_name="primary", registry=registry, tracer_provider=tracer_provider)
    with Session(engine) as session:
        session.execute(text("SELECT 1"))
    (span,) = sessions_of(exporter)
    assert attrs_of(span)["db.client.connection.pool.name"] == "primary"
    assert attrs_of(span)["db.namespace"] == engine.url.database


def test_pool_timeout_sets_error_type_to_sqlalchemys_exception(
    sqlite_url: str,
    make_engine: Callable[..., Engine],
    make_monitor: Callable[..., SessionMonitor],
    registry: CollectorRegistry,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    tracer_provider, exporter = spans
    engine = make_engine(sqlite_url, pool_size=1, max_overflow=0, pool_timeout=0.1)
    make_monitor(engine, registry=registry, tracer_provider=tracer_provider)
    with Session(engine) as holding, Session(engine) as waiting:
        holding.execute(text("SELECT 1"))
        with pytest.raises(sa_exc.TimeoutError) as raised:
            waiting.execute(text("SELECT 2"))

    (timed_out,) = [s for s in sessions_of(exporter) if s.status.status_code is StatusCode.ERROR]
    cls = type(raised.value)
    # The same value FastAPI's telemetry writes on its server span when the error propagates.
    assert attrs_of(timed_out)["error.type"] == f"{cls.__module__}.{cls.__qualname__}"
    (held,) = [s for s in sessions_of(exporter) if s is not timed_out]
    assert "error.type" not in attrs_of(held)


def test_websocket_session_span_has_a_route_and_no_http_method(
    sqlite_url: str,
    make_engine: Callable[..., Engine],
    make_monitor: Callable[..., SessionMonitor],
    registry: CollectorRegistry,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    tracer_provider, exporter = spans
    engine = make_engine(sqlite_url)
    # FastAPI's own spans (where there are any) go to the test's provider too.
    native = {"telemetry": telemetry(tracer_provider, operation_spans=False)}
    app = FastAPI(**(native if NATIVE_TELEMETRY else {}))
    done = threading.Event()

    @app.websocket("/echo/{room}")
    async def echo(websocket: WebSocket, room: str) -> None:
        await websocket.accept()
        with Session(engine) as session:
            await websocket.send_json(session.execute(text("SELECT :r"), {"r": room}).scalar_one())
        await websocket.close()
        done.set()

    make_monitor(engine, registry=registry, tracer_provider=tracer_provider).instrument_app(app)
    with TestClient(app) as client, client.websocket_connect("/echo/lobby") as websocket:
        assert websocket.receive_json() == "lobby"
    assert done.wait(5)

    (session,) = sessions_of(exporter)
    assert attrs_of(session)["http.route"] == "/echo/{room}"
    # "WS" is no HTTP method: the conventions allow only the known ones and "_OTHER".
    assert "http.request.method" not in attrs_of(session)
    if NATIVE_TELEMETRY:
        (server,) = server_spans(exporter)
        assert server.name == "WS /echo/{room}"
        assert parent_of(session, by_id(exporter)) is server
        assert "http.request.method" not in attrs_of(server)


# -- the extras ---------------------------------------------------------------------------------


def test_the_otel_extra_leaves_fastapis_instrumentation_to_the_legacy_extra() -> None:
    """FastAPI 0.142 and later trace requests themselves. Installed, the contrib instrumentation
    would take over from them under `opentelemetry-instrument`; only older FastAPIs need it."""
    extras = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"][
        "optional-dependencies"
    ]

    def names(extra: str) -> set[str]:
        return {
            requirement.split(">")[0].split("[")[0].split("=")[0] for requirement in extras[extra]
        }

    assert "opentelemetry-instrumentation-fastapi" not in names("otel")
    assert "opentelemetry-instrumentation-sqlalchemy" in names("otel")
    legacy = extras["otel-fastapi-legacy"]
    assert "session-monitor[otel]" in legacy
    assert "opentelemetry-instrumentation-fastapi" in names("otel-fastapi-legacy")
