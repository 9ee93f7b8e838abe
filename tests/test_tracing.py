"""OpenTelemetry: one span per session in the request's trace, and metrics equal to Prometheus's.

Providers are built per test and passed in; no test sets a global provider (the one test of the
global fallback runs in a subprocess). opentelemetry-instrumentation-fastapi is not installed, so
`ServerSpanMiddleware` below plays its part: a pure-ASGI wrapper around the whole app that makes a
SERVER span current, as the ASGI instrumentation's `OpenTelemetryMiddleware(app)` does.
"""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import anyio
import httpx
import pytest
import requests
import sqlalchemy
from fastapi import Depends, FastAPI, HTTPException, Request
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from otlp_receiver import OTLPReceiver, attributes
from prometheus_client import CollectorRegistry
from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    event,
    insert,
    make_url,
    select,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import AsyncAdaptedQueuePool

from session_monitor import SessionMonitor, pool_name_for

pytestmark = pytest.mark.anyio

SESSION_SCOPE = "session_monitor"
SQLALCHEMY_SCOPE = "opentelemetry.instrumentation.sqlalchemy"
SQLALCHEMY_21 = sqlalchemy.__version__.startswith("2.1")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- OpenTelemetry, per test ------------------------------------------------------------------


@dataclass
class Otel:
    exporter: InMemorySpanExporter
    tracer_provider: TracerProvider
    reader: InMemoryMetricReader
    meter_provider: MeterProvider

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def sessions(self) -> list[ReadableSpan]:
        return [s for s in self.spans() if s.name in ("db.session", "db.connection")]

    def server(self) -> list[ReadableSpan]:
        return [s for s in self.spans() if s.kind is SpanKind.SERVER]


@pytest.fixture
def otel() -> Iterator[Otel]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    yield Otel(exporter, tracer_provider, reader, meter_provider)
    tracer_provider.shutdown()
    meter_provider.shutdown()


class ServerSpanMiddleware:
    """The HTTP server span, current around the whole app (stands in for the ASGI instrumentation)."""

    def __init__(self, app: Any, *, tracer_provider: TracerProvider) -> None:
        self.app = app
        self.tracer = tracer_provider.get_tracer("tests.server")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        name = f"{scope['method']} {scope['path']}"
        with self.tracer.start_as_current_span(name, kind=SpanKind.SERVER):
            await self.app(scope, receive, send)


# -- the app: a get_db dependency that commits, rolls back on error, closes in finally --------


def get_db(request: Request) -> Iterator[Session]:
    db: Session = request.app.state.sessions()
    try:
        yield db
        db.commit()
    except Exception:
        db.rollback()
        raise
    finally:
        db.close()


async def get_async_db(request: Request) -> AsyncIterator[AsyncSession]:
    db: AsyncSession = request.app.state.sessions()
    try:
        yield db
        await db.commit()
    except Exception:
        await db.rollback()
        raise
    finally:
        await db.close()


Db = Annotated[Session, Depends(get_db)]
AsyncDb = Annotated[AsyncSession, Depends(get_async_db)]


def items_table() -> Table:
    # A table of its own: other tests may share the PostgreSQL database.
    return Table(
        f"tracing_items_{uuid.uuid4().hex[:12]}",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("name", String(50), nullable=False),
    )


@dataclass
class Stack:
    engine: Engine
    table: Table
    monitor: SessionMonitor
    app: FastAPI = field(default_factory=FastAPI)
    served: Any = None  # what the client calls: the app inside the server span
    leaked: list[Session] = field(default_factory=list)
    held: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.served), base_url="http://t")

    @property
    def pool_name(self) -> str:
        return pool_name_for(self.engine.url)


def build_app(stack: Stack, tracer_provider: TracerProvider) -> None:
    app, table, engine = stack.app, stack.table, stack.engine
    app.state.sessions = sessionmaker(engine)

    @app.post("/items")
    def create_item(db: Db) -> dict[str, str]:
        db.execute(insert(table).values(name="ok"))
        return {"status": "created"}

    @app.post("/items/conflict")
    def conflict(db: Db) -> None:
        db.execute(insert(table).values(name="conflict"))
        raise HTTPException(409, "conflict")

    @app.get("/leak")
    def leak() -> dict[str, str]:
        session = app.state.sessions()
        session.execute(select(table.c.id))
        stack.leaked.append(session)  # never closed: still holds its connection at request end
        return {"status": "leaked"}

    @app.post("/core")
    def core() -> dict[str, str]:
        with engine.connect() as connection:
            connection.execute(insert(table).values(name="core"))
            connection.commit()
        return {"status": "created"}

    @app.get("/hold")
    def hold(db: Db) -> dict[str, str]:
        db.execute(select(table.c.id))
        stack.held.set()
        stack.release.wait(10)
        return {"status": "released"}

    @app.get("/wait")
    def wait(db: Db) -> dict[str, str]:
        try:
            db.execute(select(table.c.id))
        except sa_exc.TimeoutError:
            raise HTTPException(503, "no connection available") from None
        return {"status": "served"}

    stack.monitor.instrument_app(app)
    stack.served = ServerSpanMiddleware(app, tracer_provider=tracer_provider)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 't.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return make_url(url).set(drivername="postgresql+psycopg").render_as_string(False)


@pytest.fixture
def make_stack(
    database_url: str,
    make_engine: Callable[..., Engine],
    make_monitor: Callable[..., SessionMonitor],
    registry: CollectorRegistry,
    otel: Otel,
) -> Iterator[Callable[..., Stack]]:
    stacks: list[Stack] = []

    def make(engine_options: dict[str, Any] | None = None, **monitor_options: Any) -> Stack:
        engine = make_engine(database_url, **(engine_options or {}))
        table = items_table()
        table.create(engine)  # before the monitor: the DDL is nobody's session
        monitor = make_monitor(
            engine,
            registry=registry,
            tracer_provider=otel.tracer_provider,
            meter_provider=otel.meter_provider,
            **monitor_options,
        )
        stack = Stack(engine, table, monitor)
        build_app(stack, otel.tracer_provider)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.release.set()
        for session in stack.leaked:
            session.close()
        stack.table.drop(stack.engine)


@pytest.fixture
def stack(make_stack: Callable[..., Stack]) -> Stack:
    return make_stack()


@pytest.fixture
def sqlalchemy_instrumentor() -> Iterator[SQLAlchemyInstrumentor]:
    instrumentor = SQLAlchemyInstrumentor()
    yield instrumentor
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()


# -- helpers ------------------------------------------------------------------------------------


def event_names(span: ReadableSpan) -> list[str]:
    return [e.name for e in span.events]


def attrs_of(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def span_event(span: ReadableSpan, name: str) -> dict[str, Any]:
    (found,) = [dict(e.attributes or {}) for e in span.events if e.name == name]
    return found


def parent_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def only(spans: list[ReadableSpan]) -> ReadableSpan:
    assert len(spans) == 1, [s.name for s in spans]
    return spans[0]


def assert_child(child: ReadableSpan, parent: ReadableSpan) -> None:
    assert child.context is not None and parent.context is not None
    assert child.context.trace_id == parent.context.trace_id
    assert parent_id(child) == parent.context.span_id


def drop_unclosed_session(engine: Engine, table: Table) -> None:
    # The Session and its transaction reference each other: only the cycle collector frees them.
    session = Session(engine)
    session.execute(select(table.c.id))


def no_sdk_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("opentelemetry") and r.levelno >= logging.WARNING
    ]


# -- spans --------------------------------------------------------------------------------------


async def test_commit_span_is_the_request_spans_child_with_its_attributes_and_events(
    stack: Stack, otel: Otel
) -> None:
    async with stack.client() as http:
        assert (await http.post("/items")).status_code == 200

    server, session = only(otel.server()), only(otel.sessions())
    assert_child(session, server)
    assert session.name == "db.session"
    assert session.kind is SpanKind.INTERNAL
    assert session.instrumentation_scope is not None
    assert session.instrumentation_scope.name == SESSION_SCOPE
    assert session.status.status_code is StatusCode.UNSET
    assert session.end_time is not None and server.end_time is not None
    assert session.end_time <= server.end_time
    attrs = attrs_of(session)
    assert attrs["db.system.name"] == stack.engine.dialect.name
    assert attrs["db.client.connection.pool.name"] == stack.pool_name
    assert attrs["http.route"] == "/items"
    assert attrs["http.request.method"] == "POST"
    assert attrs["code.file.path"] == __file__
    assert attrs["code.function.name"] == "create_item"
    assert isinstance(attrs["code.line.number"], int)
    assert attrs["session_monitor.leaked"] is False
    assert "session_monitor.leak.reason" not in attrs
    assert attrs["session_monitor.transaction.count"] == 1
    assert attrs["session_monitor.transaction.last_outcome"] == "commit"
    assert attrs["session_monitor.connection.checkouts"] == 1
    checkout = span_event(session, "connection.checkout")
    checkin = span_event(session, "connection.checkin")
    assert (
        attrs["session_monitor.connection.wait_time"]
        == checkout["session_monitor.connection.wait_time"]
    )
    assert (
        attrs["session_monitor.connection.use_time"]
        == checkin["session_monitor.connection.use_time"]
    )
    assert checkin["session_monitor.connection.use_time"] > 0
    assert sorted(event_names(session)) == ["commit", "connection.checkin", "connection.checkout"]
    assert event_names(session)[0] == "connection.checkout"
    commit = span_event(session, "commit")
    assert commit["session_monitor.transaction.outcome"] == "commit"
    assert commit["session_monitor.transaction.duration"] > 0


async def test_rollback_on_error_is_an_event_and_the_last_outcome(stack: Stack, otel: Otel) -> None:
    async with stack.client() as http:
        assert (await http.post("/items/conflict")).status_code == 409

    session = only(otel.sessions())
    assert_child(session, only(otel.server()))
    attrs = attrs_of(session)
    assert attrs["http.route"] == "/items/conflict"
    assert attrs["session_monitor.transaction.last_outcome"] == "rollback"
    assert attrs["session_monitor.leaked"] is False
    assert "commit" not in event_names(session)
    assert span_event(session, "rollback")["session_monitor.transaction.outcome"] == "rollback"
    # A rolled-back request is the app's decision, not a failure of the session.
    assert session.status.status_code is StatusCode.UNSET


async def test_core_connection_is_a_db_connection_span(stack: Stack, otel: Otel) -> None:
    async with stack.client() as http:
        assert (await http.post("/core")).status_code == 200

    span = only(otel.sessions())
    assert span.name == "db.connection"
    assert_child(span, only(otel.server()))
    attrs = attrs_of(span)
    assert attrs["code.function.name"] == "core"
    assert attrs["session_monitor.transaction.last_outcome"] == "commit"
    assert set(event_names(span)) == {"connection.checkout", "commit", "connection.checkin"}


async def test_request_end_leak_ends_the_span_at_detection_and_a_later_close_is_harmless(
    stack: Stack, otel: Otel, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    async with stack.client() as http:
        assert (await http.get("/leak")).status_code == 200

    # Exported while the session is still open: it ended when the request's end found the leak.
    assert stack.leaked and stack.leaked[0].get_bind() is stack.engine
    server, span = only(otel.server()), only(otel.sessions())
    assert_child(span, server)
    assert span.end_time is not None and server.end_time is not None
    assert span.end_time <= server.end_time
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "session leaked (request_end)"
    attrs = attrs_of(span)
    assert attrs["session_monitor.leaked"] is True
    assert attrs["session_monitor.leak.reason"] == "request_end"
    # Still held at detection: its use so far is counted, though no checkin happened yet.
    assert "connection.checkin" not in event_names(span)
    assert attrs["session_monitor.connection.use_time"] > 0
    leaked = span_event(span, "session.leaked")
    assert leaked["session_monitor.leak.reason"] == "request_end"
    assert leaked["code.file.path"] == __file__
    assert leaked["code.function.name"] == "leak"
    assert leaked["code.line.number"] == attrs["code.line.number"]
    assert leaked["session_monitor.session.age"] > 0

    caplog.set_level(logging.WARNING)
    stack.leaked.pop().close()
    assert otel.sessions() == [span]  # not ended twice, not exported twice
    assert no_sdk_warnings(caplog) == []
    assert (
        registry.get_sample_value(
            "sqlalchemy_sessions_closed_total", {"route": "/leak", "method": "GET"}
        )
        == 1
    )


def test_gc_leak_outside_a_request_is_a_child_of_the_current_span(stack: Stack, otel: Otel) -> None:
    tracer = otel.tracer_provider.get_tracer("tests.job")
    with tracer.start_as_current_span("job"):
        drop_unclosed_session(stack.engine, stack.table)
        gc.collect()

    span = only(otel.sessions())
    (job_span,) = [s for s in otel.spans() if s.name == "job"]
    assert_child(span, job_span)
    assert span.status.status_code is StatusCode.ERROR
    attrs = attrs_of(span)
    assert attrs["session_monitor.leaked"] is True
    assert attrs["session_monitor.leak.reason"] == "gc"
    assert "http.route" not in attrs and "http.request.method" not in attrs
    leaked = span_event(span, "session.leaked")
    assert leaked["session_monitor.leak.reason"] == "gc"
    assert leaked["code.function.name"] == "drop_unclosed_session"
    # The transaction the collector ended comes before the leak, which ends the span. Whether the
    # session or its connection proxy is collected first is up to the garbage collector.
    names = event_names(span)
    assert names[-1] == "session.leaked"
    assert "close" in names[:-1]


def test_age_leak_ends_the_span_from_the_watcher_thread_and_later_events_are_ignored(
    make_stack: Callable[..., Stack], otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    stack = make_stack(leak_threshold=0.1, capture_stacks=True)
    caplog.set_level(logging.WARNING)
    session = Session(stack.engine)
    session.execute(insert(stack.table).values(name="slow"))
    deadline = time.monotonic() + 5
    while not otel.sessions() and time.monotonic() < deadline:
        time.sleep(0.02)

    span = only(otel.sessions())
    assert span.status.status_code is StatusCode.ERROR
    leaked = span_event(span, "session.leaked")
    assert leaked["session_monitor.leak.reason"] == "age"
    assert "test_age_leak_ends_the_span" in leaked["code.stacktrace"]

    session.commit()  # after the span ended: the commit and the close only reach the metrics
    session.close()
    assert otel.sessions() == [span]
    assert "commit" not in event_names(span)
    assert no_sdk_warnings(caplog) == []


async def test_pool_timeout_is_an_event_on_the_waiting_session(
    make_stack: Callable[..., Stack], otel: Otel, registry: CollectorRegistry
) -> None:
    stack = make_stack({"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.2})
    async with stack.client() as http, anyio.create_task_group() as tasks:
        tasks.start_soon(http.get, "/hold")
        assert await anyio.to_thread.run_sync(stack.held.wait, 5)
        assert (await http.get("/wait")).status_code == 503
        stack.release.set()

    (waiting,) = [
        s for s in otel.sessions() if s.attributes and s.attributes["http.route"] == "/wait"
    ]
    timeout = span_event(waiting, "pool.timeout")
    assert timeout["db.client.connection.pool.name"] == stack.pool_name
    assert timeout["session_monitor.connection.wait_time"] >= 0.2
    # Who held the pool, as the timeout WARNING says it.
    assert timeout["session_monitor.pool.holders"].startswith("1 of 1 held by GET /hold, opened at")
    assert waiting.status.status_code is StatusCode.ERROR
    assert (waiting.status.description or "").startswith("connection pool timeout")
    assert attrs_of(waiting)["session_monitor.connection.checkouts"] == 0
    holding = only([s for s in otel.sessions() if s is not waiting])
    assert holding.status.status_code is StatusCode.UNSET
    assert_metrics_equal(registry, otel.reader)
    assert otel_total(otel.reader, "db.client.connection.timeouts") == 1


def test_core_connect_timeout_is_an_event_on_the_callers_span(
    make_stack: Callable[..., Stack], otel: Otel
) -> None:
    stack = make_stack({"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.2})
    tracer = otel.tracer_provider.get_tracer("tests.job")
    with stack.engine.connect() as holding, tracer.start_as_current_span("job"):
        holding.execute(select(1))
        with pytest.raises(sa_exc.TimeoutError):
            stack.engine.connect()
    (job,) = [s for s in otel.spans() if s.name == "job"]
    # A Core connect() that never got a connection never became a session: its caller is told.
    assert span_event(job, "pool.timeout")["session_monitor.connection.wait_time"] >= 0.2
    assert len(otel.sessions()) == 1


# -- statement spans of opentelemetry-instrumentation-sqlalchemy --------------------------------


async def test_trace_tree_request_session_statements(
    stack: Stack, otel: Otel, sqlalchemy_instrumentor: SQLAlchemyInstrumentor
) -> None:
    sqlalchemy_instrumentor.instrument(
        engine=stack.engine, tracer_provider=otel.tracer_provider, skip_dep_check=True
    )
    async with stack.client() as http:
        assert (await http.post("/items")).status_code == 200
        assert (await http.post("/items/conflict")).status_code == 409

    servers = otel.server()
    sessions = otel.sessions()
    assert len(servers) == len(sessions) == 2
    statements = [
        s
        for s in otel.spans()
        if s.instrumentation_scope is not None
        and s.instrumentation_scope.name == SQLALCHEMY_SCOPE
        and s.kind is SpanKind.CLIENT
        and s.name != "connect"
    ]
    assert len(statements) == 2
    for server in servers:
        (session,) = [s for s in sessions if parent_id(s) == server.context.span_id]
        (statement,) = [s for s in statements if parent_id(s) == session.context.span_id]
        assert_child(statement, session)
        assert "INSERT" in str(statement.name).upper()


def test_sqlalchemy_instrumentor_needs_skip_dep_check_on_sqlalchemy_21(
    stack: Stack,
    otel: Otel,
    sqlalchemy_instrumentor: SQLAlchemyInstrumentor,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def statements() -> list[ReadableSpan]:
        return [
            s
            for s in otel.spans()
            if s.instrumentation_scope is not None
            and s.instrumentation_scope.name == SQLALCHEMY_SCOPE
        ]

    tracer = otel.tracer_provider.get_tracer("tests.job")
    caplog.set_level(logging.ERROR)
    engine_tracer = sqlalchemy_instrumentor.instrument(
        engine=stack.engine, tracer_provider=otel.tracer_provider
    )
    with tracer.start_as_current_span("job"), Session(stack.engine) as session:
        session.execute(select(stack.table.c.id))
    if SQLALCHEMY_21:
        # Refused with one ERROR log line, and no statement spans.
        assert engine_tracer is None
        assert not sqlalchemy_instrumentor.is_instrumented_by_opentelemetry
        assert any("falls outside of that range" in r.getMessage() for r in caplog.records)
        assert statements() == []
        sqlalchemy_instrumentor.instrument(
            engine=stack.engine, tracer_provider=otel.tracer_provider, skip_dep_check=True
        )
        with tracer.start_as_current_span("job"), Session(stack.engine) as session:
            session.execute(select(stack.table.c.id))
    assert sqlalchemy_instrumentor.is_instrumented_by_opentelemetry
    (statement,) = [s for s in statements() if s.name != "connect"]
    session_span = otel.sessions()[-1]
    assert_child(statement, session_span)


async def test_async_session_trace_tree(
    async_url: str,
    otel: Otel,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
    sqlalchemy_instrumentor: SQLAlchemyInstrumentor,
) -> None:
    pytest.importorskip("greenlet", reason="SQLAlchemy's asyncio extension needs greenlet")
    engine = create_async_engine(async_url, poolclass=AsyncAdaptedQueuePool)
    table = items_table()
    try:
        async with engine.begin() as connection:
            await connection.run_sync(table.create)
        monitor = make_monitor(
            engine,
            registry=registry,
            tracer_provider=otel.tracer_provider,
            meter_provider=otel.meter_provider,
        )
        sqlalchemy_instrumentor.instrument(
            engine=engine.sync_engine, tracer_provider=otel.tracer_provider, skip_dep_check=True
        )
        app = FastAPI()
        app.state.sessions = async_sessionmaker(engine)

        @app.post("/items")
        async def create_item(db: AsyncDb) -> dict[str, str]:
            await db.execute(insert(table).values(name="async"))
            return {"status": "created"}

        monitor.instrument_app(app)
        served = ServerSpanMiddleware(app, tracer_provider=otel.tracer_provider)
        transport = httpx.ASGITransport(app=served)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            assert (await http.post("/items")).status_code == 200

        server, session = only(otel.server()), only(otel.sessions())
        assert_child(session, server)
        attrs = attrs_of(session)
        assert attrs["http.route"] == "/items"
        assert attrs["session_monitor.transaction.last_outcome"] == "commit"
        (statement,) = [
            s
            for s in otel.spans()
            if s.instrumentation_scope is not None
            and s.instrumentation_scope.name == SQLALCHEMY_SCOPE
            and s.name != "connect"
        ]
        assert_child(statement, session)
    finally:
        sqlalchemy_instrumentor.uninstrument()
        async with engine.begin() as connection:
            await connection.run_sync(table.drop)
        await engine.dispose()


# -- metrics ------------------------------------------------------------------------------------

# Prometheus sample -> OpenTelemetry metric and the data point field to compare.
SAME_VALUES = {
    "sqlalchemy_sessions_opened_total": ("db.client.session.opened", "value"),
    "sqlalchemy_sessions_closed_total": ("db.client.session.closed", "value"),
    "sqlalchemy_sessions_active": ("db.client.session.active", "value"),
    "sqlalchemy_session_duration_seconds_count": ("db.client.session.duration", "count"),
    "sqlalchemy_sessions_leaked_total": ("db.client.session.leaked", "value"),
    "sqlalchemy_transactions_total": ("db.client.transaction.count", "value"),
    "sqlalchemy_transaction_duration_seconds_count": ("db.client.transaction.duration", "count"),
    "db_client_connection_count": ("db.client.connection.count", "value"),
    "db_client_connection_max": ("db.client.connection.max", "value"),
    "db_client_connection_pending_requests": ("db.client.connection.pending_requests", "value"),
    "db_client_connection_timeouts_total": ("db.client.connection.timeouts", "value"),
    "db_client_connection_wait_time_seconds_count": ("db.client.connection.wait_time", "count"),
    "db_client_connection_use_time_seconds_count": ("db.client.connection.use_time", "count"),
    "db_client_connection_create_time_seconds_count": (
        "db.client.connection.create_time",
        "count",
    ),
    "db_client_connection_wait_time_seconds_sum": ("db.client.connection.wait_time", "sum"),
    "db_client_connection_use_time_seconds_sum": ("db.client.connection.use_time", "sum"),
    "session_monitor_internal_errors_total": ("session_monitor.internal_errors", "value"),
}

LABEL_ATTRIBUTES = {
    "db_client_connection_pool_name": "db.client.connection.pool.name",
    "db_client_connection_state": "db.client.connection.state",
    "reason": "session_monitor.leak.reason",
    "outcome": "session_monitor.transaction.outcome",
    "listener": "session_monitor.listener",
}

Series = dict[frozenset[tuple[str, Any]], float]


def otel_attributes(labels: dict[str, str]) -> frozenset[tuple[str, Any]]:
    """The attributes the OpenTelemetry side uses for a Prometheus label set."""
    found: dict[str, Any] = {}
    for label, value in labels.items():
        if label == "route":
            if value not in ("<none>", "<unmatched>"):
                found["http.route"] = value
        elif label == "method":
            if value != "<none>":
                found["http.request.method"] = "_OTHER" if value == "OTHER" else value
        else:
            found[LABEL_ATTRIBUTES[label]] = value
    return frozenset(found.items())


def prometheus_series(registry: CollectorRegistry, sample_name: str) -> Series:
    found: Series = {}
    for metric in registry.collect():
        for s in metric.samples:
            if s.name == sample_name and s.value:
                key = otel_attributes(s.labels)
                found[key] = found.get(key, 0.0) + s.value
    return found


def otel_series(reader: InMemoryMetricReader, name: str, value_field: str) -> Series:
    found: Series = {}
    data = reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data else ():
        for scope_metrics in resource_metrics.scope_metrics:
            if scope_metrics.scope.name != SESSION_SCOPE:
                continue
            for metric in scope_metrics.metrics:
                if metric.name != name:
                    continue
                for point in metric.data.data_points:
                    value = float(getattr(point, value_field))
                    if value:
                        found[frozenset((point.attributes or {}).items())] = value
    return found


def otel_total(reader: InMemoryMetricReader, name: str) -> float:
    return sum(otel_series(reader, name, "value").values())


def assert_metrics_equal(registry: CollectorRegistry, reader: InMemoryMetricReader) -> None:
    for sample_name, (otel_name, value_field) in SAME_VALUES.items():
        expected = prometheus_series(registry, sample_name)
        assert otel_series(reader, otel_name, value_field) == pytest.approx(expected), sample_name


async def test_metric_values_equal_the_prometheus_values(
    stack: Stack, otel: Otel, registry: CollectorRegistry
) -> None:
    async with stack.client() as http:
        for _ in range(3):
            assert (await http.post("/items")).status_code == 200
        for _ in range(2):
            assert (await http.post("/items/conflict")).status_code == 409
        assert (await http.post("/core")).status_code == 200
        assert (await http.get("/leak")).status_code == 200
        assert (await http.get("/nowhere")).status_code == 404
    drop_unclosed_session(stack.engine, stack.table)
    gc.collect()
    open_session = Session(stack.engine)
    open_session.execute(select(stack.table.c.id))
    try:
        assert_metrics_equal(registry, otel.reader)  # one session still open, holding
        active = otel_series(otel.reader, "db.client.session.active", "value")
        assert active == {
            frozenset({("http.request.method", "GET"), ("http.route", "/leak")}): 1,
            frozenset(): 1,
        }
    finally:
        open_session.close()
        stack.leaked.pop().close()
    assert_metrics_equal(registry, otel.reader)

    reader = otel.reader
    opened = otel_series(reader, "db.client.session.opened", "value")
    assert opened[frozenset({("http.route", "/items"), ("http.request.method", "POST")})] == 3
    assert opened[frozenset()] == 2  # the gc leak and the open session: no request
    leaked = otel_series(reader, "db.client.session.leaked", "value")
    assert sorted((dict(k)["session_monitor.leak.reason"], v) for k, v in leaked.items()) == [
        ("gc", 1),
        ("request_end", 1),
    ]
    outcomes: dict[str, float] = {}
    for key, value in otel_series(reader, "db.client.transaction.count", "value").items():
        outcome = dict(key)["session_monitor.transaction.outcome"]
        outcomes[outcome] = outcomes.get(outcome, 0) + value
    assert outcomes == {"commit": 4, "rollback": 2, "close": 3}
    assert otel_total(reader, "db.client.session.active") == 0
    states = {
        dict(key)["db.client.connection.state"]: value
        for key, value in otel_series(reader, "db.client.connection.count", "value").items()
    }
    assert set(states) == {"idle"} and states["idle"] >= 1  # every connection back in the pool
    assert otel_total(reader, "db.client.connection.max") == 15  # QueuePool: 5 + 10 overflow


# -- export, and the cost of leaving it off --------------------------------------------------


async def test_otlp_export_leaves_the_process(
    make_engine: Callable[..., Engine],
    make_monitor: Callable[..., SessionMonitor],
    registry: CollectorRegistry,
    tmp_path: Path,
) -> None:
    with OTLPReceiver() as receiver:
        http_session = requests.Session()
        http_session.trust_env = False  # straight to 127.0.0.1, whatever proxy is configured
        provider = TracerProvider(resource=Resource.create({"service.name": "tracing-tests"}))
        provider.add_span_processor(
            SimpleSpanProcessor(
                OTLPSpanExporter(endpoint=receiver.endpoint, session=http_session, timeout=5)
            )
        )
        try:
            engine = make_engine(f"sqlite:///{tmp_path / 'otlp.db'}")
            table = items_table()
            table.create(engine)
            monitor = make_monitor(engine, registry=registry, tracer_provider=provider)
            stack = Stack(engine, table, monitor)
            build_app(stack, provider)
            async with stack.client() as http:
                assert (await http.post("/items")).status_code == 200
            assert receiver.received.wait(5)
        finally:
            provider.shutdown()

    spans = {span.name: (resource, span) for resource, span in receiver.spans()}
    resource, session = spans["db.session"]
    _, server = spans["POST /items"]
    assert resource["service.name"] == "tracing-tests"
    assert session.trace_id == server.trace_id
    assert session.parent_span_id == server.span_id
    attrs = attributes(session)
    assert attrs["db.system.name"] == "sqlite"
    assert attrs["db.client.connection.pool.name"] == "otlp.db"
    assert attrs["http.route"] == "/items"
    assert attrs["session_monitor.leaked"] is False
    assert attrs["session_monitor.transaction.last_outcome"] == "commit"
    assert {e.name for e in session.events} == {
        "connection.checkout",
        "commit",
        "connection.checkin",
    }


def test_opentelemetry_off_builds_no_observer(
    make_engine: Callable[..., Engine],
    make_monitor: Callable[..., SessionMonitor],
    sqlite_url: str,
    otel: Otel,
) -> None:
    engine = make_engine(sqlite_url)
    default = make_monitor(engine, registry=CollectorRegistry())
    assert default.observers == ()
    default.uninstrument()
    # Providers given but switched off explicitly: still nothing.
    off = make_monitor(
        engine,
        registry=CollectorRegistry(),
        opentelemetry=False,
        tracer_provider=otel.tracer_provider,
        meter_provider=otel.meter_provider,
    )
    assert off.observers == ()
    with Session(engine) as session:
        session.execute(select(1))
    assert otel.spans() == []
    assert (
        otel.reader.get_metrics_data() is None
        or otel_series(otel.reader, "db.client.session.opened", "value") == {}
    )


def run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "PYTHONWARNINGS": "error"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_opentelemetry_off_never_imports_tracing_or_opentelemetry() -> None:
    out = run_python(
        """
        import sys
        from prometheus_client import CollectorRegistry
        from sqlalchemy import create_engine, text
        from sqlalchemy.orm import Session
        from session_monitor import SessionMonitor

        engine = create_engine("sqlite://")
        monitor = SessionMonitor(engine, registry=CollectorRegistry())
        with Session(engine) as session:
            session.execute(text("select 1"))
        monitor.uninstrument()
        print(sorted(m for m in sys.modules if m.startswith(("opentelemetry", "session_monitor.exporters.tracing"))))
        """
    )
    assert out == "[]"


def test_providers_fall_back_to_the_global_ones() -> None:
    # In a subprocess: setting the global providers in this process would leak into other tests.
    out = run_python(
        """
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from sqlalchemy import create_engine, text
        from sqlalchemy.orm import Session
        from session_monitor import SessionMonitor

        exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        engine = create_engine("sqlite://")
        monitor = SessionMonitor(engine, registry=None, opentelemetry=True)
        with Session(engine) as session:
            session.execute(text("select 1"))
        monitor.uninstrument()
        names = {m.name for rm in reader.get_metrics_data().resource_metrics
                 for sm in rm.scope_metrics for m in sm.metrics}
        print([s.name for s in exporter.get_finished_spans()], "db.client.session.opened" in names)
        """
    )
    assert out == "['db.session'] True"


def test_uninstrument_silences_the_statement_listeners(
    stack: Stack, otel: Otel, sqlalchemy_instrumentor: SQLAlchemyInstrumentor
) -> None:
    from session_monitor.exporters.tracing import OpenTelemetryObserver

    (observer,) = [o for o in stack.monitor.observers if isinstance(o, OpenTelemetryObserver)]
    listeners: list[tuple[str, Callable[..., Any]]] = [
        ("before_cursor_execute", observer.statements._before_cursor_execute_evt),
        ("after_cursor_execute", observer.statements._after_cursor_execute_evt),
        ("handle_error", observer.statements._handle_error_evt),
    ]
    # On the watched engine only: the Engine class, and so every other engine, stays bare.
    assert all(event.contains(stack.engine, name, fn) for name, fn in listeners)
    assert not any(event.contains(Engine, name, fn) for name, fn in listeners)
    stack.monitor.uninstrument()
    # Still there (removing one races with another thread running the event), and silent.
    assert all(event.contains(stack.engine, name, fn) for name, fn in listeners)
    sqlalchemy_instrumentor.instrument(
        engine=stack.engine, tracer_provider=otel.tracer_provider, skip_dep_check=True
    )
    with Session(stack.engine) as session:
        session.execute(select(stack.table.c.id))
    assert otel.sessions() == []


# -- code locations across the greenlet boundary and under other instrumentation --------------


async def test_async_session_location_is_the_application_frame(
    tmp_path: Path,
    otel: Otel,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    pytest.importorskip("greenlet", reason="SQLAlchemy's asyncio extension needs greenlet")
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    try:
        make_monitor(engine, registry=registry, tracer_provider=otel.tracer_provider)
        async with AsyncSession(engine) as session:
            await session.execute(select(1))
    finally:
        await engine.dispose()
    attrs = dict(only(otel.sessions()).attributes or {})
    assert attrs.get("code.function.name") == "test_async_session_location_is_the_application_frame"


def test_core_connection_location_under_the_sqlalchemy_instrumentor(
    stack: Stack, otel: Otel, sqlalchemy_instrumentor: SQLAlchemyInstrumentor
) -> None:
    sqlalchemy_instrumentor.instrument(
        engine=stack.engine, tracer_provider=otel.tracer_provider, skip_dep_check=True
    )
    with stack.engine.connect() as connection:
        connection.execute(select(1))
    span = only(otel.sessions())
    # Engine.connect() is wrapped in the instrumentor's "connect" span: the checkout, where a
    # Core session opens, happens inside it, so that span is the session's parent.
    (connect,) = [s for s in otel.spans() if s.name == "connect"]
    assert_child(span, connect)
    attrs = attrs_of(span)
    assert attrs.get("code.function.name") == (
        "test_core_connection_location_under_the_sqlalchemy_instrumentor"
    )
