"""The first law: the monitor never changes what the application or SQLAlchemy does.

One test (or a few) per way an earlier version broke it, each written to fail on that version:
a failing checkout ran twice, copied contexts kept dropped sessions alive, foreign binds were
touched, `execution_options` views were counted twice or not at all, dead pools stayed in the
gauges, a proxy prefix defeated `excluded_paths`, an outer cleanup middleware made false leaks,
the OpenTelemetry side escaped the guard, and a renamed private method broke the import.
"""

# No `from __future__ import annotations`: FastAPI must resolve endpoints' local annotations.

import asyncio
import contextvars
import gc
import sqlite3
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import sample, total
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, create_engine, event, exc, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, scoped_session, sessionmaker
from sqlalchemy.pool import QueuePool
from starlette.middleware.base import BaseHTTPMiddleware

from session_monitor import SessionMonitor

pytestmark = pytest.mark.anyio


def internal_errors(registry: CollectorRegistry) -> float:
    return total(registry, "session_monitor_internal_errors_total")


def leaks(registry: CollectorRegistry, reason: str) -> float:
    return total(registry, "sqlalchemy_sessions_leaked_total", reason=reason)


# -- 1. the original call is made exactly once ------------------------------------------------


@pytest.mark.parametrize("through", ["session", "core"])
def test_a_refused_connection_on_an_unwatched_engine_is_attempted_once(
    through: str,
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    make_monitor(make_engine(sqlite_url), registry=registry)
    attempts: list[float] = []

    def refuse() -> sqlite3.Connection:
        attempts.append(time.monotonic())
        raise sqlite3.OperationalError("connection refused")

    unwatched = make_engine("sqlite://", creator=refuse)
    connect: Callable[[], object] = (
        (lambda: Session(unwatched).execute(text("select 1")))
        if through == "session"
        else unwatched.connect
    )
    with pytest.raises(exc.OperationalError, match="connection refused"):
        connect()
    assert len(attempts) == 1
    assert internal_errors(registry) == 0


@pytest.mark.parametrize("watched", [False, True], ids=["unwatched", "watched"])
def test_a_pool_timeout_waits_pool_timeout_once(
    watched: bool,
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    tmp_path: Path,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    pool_timeout = 0.5
    busy = make_engine(
        f"sqlite:///{tmp_path / 'busy.db'}", pool_size=1, max_overflow=0, pool_timeout=pool_timeout
    )
    make_monitor(busy if watched else make_engine(sqlite_url), registry=registry)
    with busy.connect():
        started = time.monotonic()
        with pytest.raises(exc.TimeoutError):
            Session(busy).execute(text("select 1"))
        waited = time.monotonic() - started
    # Twice pool_timeout when the wrapper retried the checkout in its except.
    assert pool_timeout <= waited < 1.6 * pool_timeout
    assert internal_errors(registry) == 0
    if watched:
        assert total(registry, "db_client_connection_timeouts_total") == 1


# -- 2. nothing kept holds an application object ----------------------------------------------


class Marker:
    """A local of the caller that opens the connection: alive only while its frame is."""


def test_a_context_copied_during_the_checkout_keeps_no_session_or_frame(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    # asyncio copies the current context into every callback a connect() schedules (asyncpg's
    # transport, say); the copies live as long as the connection. A pool connect listener sees
    # the same context, so a copy taken there holds whatever the monitor's ContextVars hold.
    engine = make_engine(sqlite_url)
    make_monitor(engine, registry=registry)
    copies: list[contextvars.Context] = []
    event.listen(engine, "connect", lambda *_: copies.append(contextvars.copy_context()))

    def drop_a_session() -> tuple[weakref.ref[Session], weakref.ref[Marker]]:
        marker = Marker()
        session = Session(engine)
        session.execute(text("select 1"))
        return weakref.ref(session), weakref.ref(marker)

    def drop_a_core_connection() -> weakref.ref[Marker]:
        marker = Marker()
        engine.connect().execute(text("select 1"))
        return weakref.ref(marker)

    session, session_caller = drop_a_session()
    engine.dispose()  # the next checkout connects again, under the listener
    core_caller = drop_a_core_connection()
    gc.collect()
    assert len(copies) == 2
    assert session() is None
    assert session_caller() is None
    assert core_caller() is None
    assert leaks(registry, "gc") == 2  # both were dropped unclosed, and are still reported


@pytest.mark.postgres
async def test_a_dropped_async_session_on_asyncpg_is_collected_and_its_connection_returned(
    postgres_url: str, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> None:
    pytest.importorskip("asyncpg")
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    url = make_url(postgres_url).set(drivername="postgresql+asyncpg")
    engine = create_async_engine(url)
    make_monitor(engine, registry=registry)

    async def drop() -> weakref.ref[AsyncSession]:
        session = AsyncSession(engine)
        await session.execute(text("select 1"))  # the pool opens a connection for it
        return weakref.ref(session)

    try:
        dropped = await drop()
        for _ in range(3):
            gc.collect()
            await asyncio.sleep(0.05)
        assert dropped() is None
        assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert leaks(registry, "gc") == 1
        assert internal_errors(registry) == 0
    finally:
        await engine.dispose()


# -- 3. only real SQLAlchemy objects are touched ----------------------------------------------


class RecordingBind:
    """A bind of the app's own: an object in front of an Engine that records what is asked of it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.asked: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.asked.append(name)
        return getattr(self._engine, name)


def test_a_bind_that_is_not_an_engine_is_left_alone(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    engine = make_engine(sqlite_url)

    def use(bind: RecordingBind) -> list[str]:
        with Session(bind=bind) as session:  # type: ignore[call-overload]
            session.execute(text("select 1"))
        return bind.asked

    alone = use(RecordingBind(engine))
    make_monitor(registry=registry)  # every engine: the monitor meets the foreign bind
    assert use(RecordingBind(engine)) == alone
    assert internal_errors(registry) == 0


# -- 4. an execution_options view is its parent's pool ----------------------------------------


def pool_gauges(registry: CollectorRegistry) -> tuple[float, float, float]:
    return (
        total(registry, "db_client_connection_count", db_client_connection_state="used"),
        total(registry, "db_client_connection_count", db_client_connection_state="idle"),
        total(registry, "db_client_connection_max"),
    )


@pytest.mark.parametrize("watch", ["every engine", "the parent"])
def test_an_execution_options_view_is_counted_once_as_its_parents_pool(
    watch: str,
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    engine = make_engine(sqlite_url, pool_size=2, max_overflow=1)
    read_only = engine.execution_options(isolation_level="AUTOCOMMIT")
    if watch == "every engine":
        make_monitor(registry=registry)
    else:
        make_monitor(engine, registry=registry)
    with Session(read_only) as session, engine.connect() as connection:
        session.execute(text("select 1"))
        connection.execute(text("select 1"))
        assert pool_gauges(registry) == (2, 0, 3)
    view_session = Session(read_only)
    view_session.execute(text("select 1"))
    assert pool_gauges(registry) == (1, 1, 3)
    view_session.close()
    assert pool_gauges(registry) == (0, 2, 3)
    assert total(registry, "db_client_connection_use_time_seconds_count") == 3
    # Two ORM sessions through the view, one Core connection through the parent.
    assert total(registry, "sqlalchemy_sessions_opened_total") == 3
    assert total(registry, "sqlalchemy_sessions_closed_total") == 3
    assert internal_errors(registry) == 0


# -- 5. gauges come from live pools only ------------------------------------------------------


def test_engines_disposed_and_collected_leave_the_gauges(
    tmp_path: Path, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> None:
    make_monitor(registry=registry)

    def engine_used_once(n: int) -> Engine:
        engine = create_engine(f"sqlite:///{tmp_path / f'{n}.db'}", poolclass=QueuePool)
        with Session(engine) as session:
            session.execute(text("select 1"))
        return engine

    for n in range(10):
        engine_used_once(n).dispose()
    dropped = engine_used_once(10)  # never disposed: its idle connection stays in its pool
    kept = engine_used_once(11)
    gc.collect()  # an engine is a cycle of objects: dropped, it lives until the collector runs
    assert pool_gauges(registry) == (0, 2, 30)
    del dropped
    gc.collect()
    assert pool_gauges(registry) == (0, 1, 15)
    kept.dispose()
    assert pool_gauges(registry) == (0, 0, 15)


# -- 6 and 7. paths and cleanup as the app sees them ------------------------------------------


async def test_excluded_paths_are_app_paths_behind_a_proxy_prefix(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    engine = make_engine(sqlite_url)
    monitor = make_monitor(engine, registry=registry, excluded_paths=["/health"])
    app = FastAPI()  # the prefix is the server's: uvicorn --root-path /svc
    kept: list[Session] = []

    @app.get("/health")
    def health() -> str:
        session = Session(engine)  # a probe that keeps its session: not the app's concern
        session.execute(text("select 1"))
        kept.append(session)
        return "ok"

    monitor.instrument_app(app)
    transport = httpx.ASGITransport(app=app, root_path="/svc")
    async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as http:
        assert (await http.get("/svc/health")).status_code == 200
        assert (await http.get("/svc/metrics")).status_code == 200
    assert leaks(registry, "request_end") == 0
    assert total(registry, "sqlalchemy_sessions_opened_total", route="/health") == 0
    kept[0].close()


class RemoveScopedSessions:
    """Closes the request's scoped sessions after the app, outside the monitor if added later."""

    def __init__(self, app: Any, registry: scoped_session[Session]) -> None:
        self.app, self.registry = app, registry

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            self.registry.remove()


@pytest.mark.parametrize("style", ["pure ASGI", "BaseHTTPMiddleware"])
async def test_sessions_closed_by_an_outer_middleware_are_not_leaks(
    style: str,
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    engine = make_engine(sqlite_url)
    monitor = make_monitor(engine, registry=registry)
    request_id: contextvars.ContextVar[int] = contextvars.ContextVar("request_id", default=0)
    sessions = scoped_session(sessionmaker(engine), scopefunc=request_id.get)
    app = FastAPI()

    @app.get("/items")
    async def items() -> int:
        return int(sessions().execute(text("select 1")).scalar_one())

    monitor.instrument_app(app)  # before the cleanup middleware, which ends up outside it
    if style == "pure ASGI":
        app.add_middleware(RemoveScopedSessions, registry=sessions)
    else:

        async def remove_after(request: Any, call_next: Any) -> Any:
            try:
                return await call_next(request)
            finally:
                sessions.remove()

        app.add_middleware(BaseHTTPMiddleware, dispatch=remove_after)

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        for n in range(1, 4):
            request_id.set(n)
            assert (await http.get("/items")).status_code == 200
    assert leaks(registry, "request_end") == 0
    assert total(registry, "sqlalchemy_sessions_opened_total", route="/items") == 3
    assert total(registry, "sqlalchemy_sessions_closed_total", route="/items") == 3


# -- 8. the OpenTelemetry side ----------------------------------------------------------------


def statement_listeners(target: Any) -> int:
    dispatch = target.dispatch
    return len(dispatch.before_cursor_execute) + len(dispatch.after_cursor_execute)


def test_opentelemetry_listens_only_on_watched_engines_and_leaves_none_when_construction_fails(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    tmp_path: Path,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    from session_monitor import ConfigurationError

    engine = make_engine(sqlite_url)
    unwatched = make_engine(f"sqlite:///{tmp_path / 'other.db'}")
    make_monitor(engine, registry=registry, tracer_provider=TracerProvider())
    assert statement_listeners(engine) == 2
    assert statement_listeners(unwatched) == 0  # nor on the Engine class, which it would share
    # Off SQLAlchemy's per-statement event path: nothing listens on the unwatched engine.
    with unwatched.connect() as connection:
        connection.execute(text("select 1"))
        assert not connection._has_events and not unwatched._has_events

    with pytest.raises(ConfigurationError, match="one monitor per process"):
        SessionMonitor(unwatched, registry=registry, tracer_provider=TracerProvider())
    assert statement_listeners(unwatched) == 0
    assert statement_listeners(create_engine("sqlite://")) == 0


def test_a_failing_statement_listener_is_counted_and_the_statement_runs(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    from session_monitor.exporters.tracing import OpenTelemetryObserver

    engine = make_engine(sqlite_url)
    monitor = make_monitor(engine, registry=registry, tracer_provider=TracerProvider())
    (observer,) = [o for o in monitor.observers if isinstance(o, OpenTelemetryObserver)]

    def broken(connection: Any) -> Any:
        raise RuntimeError("a bug of the monitor's")

    monkeypatch.setattr(observer.statements, "session_for", broken)  # our own code, failing
    with Session(engine) as session:
        assert session.execute(text("select 41 + 1")).scalar_one() == 42
        assert session.execute(text("select 2")).scalar_one() == 2
    assert internal_errors(registry) == 2
    logged = [r for r in caplog.records if "otel_before_cursor_execute" in r.getMessage()]
    assert len(logged) == 1


# -- 9. a private method SQLAlchemy no longer has ---------------------------------------------


MISSING_METHOD_APP = """
import logging, sys
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session
from sqlalchemy.orm import session as orm_session

# As if a release had moved Session._close_impl: Session still works, but the method the
# monitor wraps is not where it looks. Done before the import, as a new SQLAlchemy would be.
close_impl = Session.__dict__["_close_impl"]
del Session._close_impl
orm_session._SessionClassMethods._close_impl = close_impl

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s", stream=sys.stdout)
from session_monitor import SessionMonitor

engine = create_engine("sqlite://")
registry = CollectorRegistry()
monitor = SessionMonitor(engine, registry=registry)
SessionMonitor(engine, registry=CollectorRegistry())  # a second monitor says nothing again
monitor.uninstrument()
monitor.instrument()  # nor does instrumenting again
with Session(engine) as session:
    print("result", session.execute(text("select 1")).scalar_one())
for name, labels in [
    ("session_monitor_internal_errors_total", {"listener": "hook:Session._close_impl"}),
    ("sqlalchemy_sessions_opened_total", {"route": "<none>", "method": "<none>"}),
    ("db_client_connection_use_time_seconds_count", {"db_client_connection_pool_name": "memory"}),
]:
    print(name, registry.get_sample_value(name, labels))
"""


CHANGED_SIGNATURE_APP = """
import logging, sys
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

# As if a release had given Engine.raw_connection a parameter: the hook, which spells out the
# parameters it passes on, must not be installed, or the new argument would be refused.
original = Engine.__dict__["raw_connection"]
def raw_connection(self, _shared=None):
    return original(self)
Engine.raw_connection = raw_connection

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s", stream=sys.stdout)
from session_monitor import SessionMonitor

engine = create_engine("sqlite://")
registry = CollectorRegistry()
SessionMonitor(engine, registry=registry)
print("hooked", Engine.raw_connection is raw_connection)
print("result", engine.raw_connection(_shared=True).cursor().execute("select 1").fetchone()[0])
with engine.connect() as connection:
    print("core", connection.execute(text("select 1")).scalar_one())
print("checkins", registry.get_sample_value(
    "db_client_connection_use_time_seconds_count", {"db_client_connection_pool_name": "memory"}
))
"""


def _run_with_warnings(app: str) -> tuple[list[str], list[str]]:
    """The app's printed lines, and those of them that are WARNINGs."""
    out = subprocess.run(
        [sys.executable, "-c", app], capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()
    return out, [line for line in out if line.startswith("WARNING")]


def test_a_changed_signature_leaves_its_hook_out_and_says_so() -> None:
    out, warnings = _run_with_warnings(CHANGED_SIGNATURE_APP)
    assert len(warnings) == 1, out
    assert "changed the parameters of Engine.raw_connection" in warnings[0]
    assert "hooked True" in out  # the app's (new) method is left in place
    assert "result 1" in out and "core 1" in out
    # No checkout is counted without the hook, so no checkin either: the gauges stay right.
    assert {"checkins None", "checkins 0", "checkins 0.0"} & set(out), out


def test_a_missing_private_method_turns_off_only_its_piece() -> None:
    out, warnings = _run_with_warnings(MISSING_METHOD_APP)
    assert len(warnings) == 1
    assert "cannot see ORM sessions" in warnings[0] and "Session._close_impl" in warnings[0]
    assert "result 1" in out
    assert "session_monitor_internal_errors_total 1" in out
    # Sessions are off (without their close they would all look open for ever); the pool is on.
    assert "sqlalchemy_sessions_opened_total None" in out
    assert "db_client_connection_use_time_seconds_count 1" in out


# -- the monitor's own threads never hold the app back ----------------------------------------


def test_uninstrument_during_traffic_changes_no_result_and_counts_no_leak(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    engine = make_engine(sqlite_url, pool_size=4)
    monitor = make_monitor(engine, registry=registry)
    results: list[int] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def traffic() -> None:
        try:
            while not stop.is_set():
                with Session(engine) as session:
                    results.append(session.execute(text("select 1")).scalar_one())
        except BaseException as failure:  # the app's own failure: the test reports it
            import traceback

            traceback.print_exc()
            failures.append(failure)

    workers = [threading.Thread(target=traffic) for _ in range(3)]
    for worker in workers:
        worker.start()
    for _ in range(50):
        monitor.uninstrument()
        monitor.instrument()
    stop.set()
    for worker in workers:
        worker.join()
    gc.collect()
    assert failures == []
    assert results and set(results) == {1}
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    # Sessions open at an uninstrument() are counted closed then, never leaked later.
    assert total(registry, "sqlalchemy_sessions_leaked_total") == 0
    assert total(registry, "sqlalchemy_sessions_active") == 0
    assert total(registry, "db_client_connection_count", db_client_connection_state="used") == 0
    assert internal_errors(registry) == 0


# -- found by SQLAlchemy's own test suite with the monitor injected (tests/upstream) ----------


def test_raw_connection_as_a_greenlets_first_frame_works(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    # AsyncEngine.raw_connection() runs sync_engine.raw_connection through greenlet_spawn: the
    # wrapper is then the greenlet's first frame, with no caller frame to look at.
    greenlet = pytest.importorskip("greenlet")
    engine = make_engine(sqlite_url)
    make_monitor(engine, registry=registry)
    connection = greenlet.greenlet(engine.raw_connection).switch()
    connection.close()
    assert total(registry, "db_client_connection_use_time_seconds_count") == 1
    assert internal_errors(registry) == 0


def test_the_apps_session_info_is_left_as_it_was(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    import json

    engine = make_engine(sqlite_url)
    make_monitor(engine, registry=registry)
    session = Session(engine, info={"tenant": "a"})
    session.execute(text("select 1"))
    assert session.info == {"tenant": "a"}
    assert json.dumps(session.info) == '{"tenant": "a"}'
    copy = Session(engine, info=session.info)  # an app copying it copies nothing of ours
    copy.execute(text("select 1"))
    assert total(registry, "sqlalchemy_sessions_opened_total") == 2
    copy.close()
    session.close()
    assert total(registry, "sqlalchemy_sessions_closed_total") == 2


def test_a_failure_in_the_flush_hook_is_counted_and_the_flush_goes_on(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sqlalchemy import Column, Integer, MetaData, Table, insert

    engine = make_engine(sqlite_url)
    table = Table("flushed", MetaData(), Column("id", Integer, primary_key=True))
    table.create(engine)
    monitor = make_monitor(engine, registry=registry)

    def broken(session: Session) -> None:
        raise RuntimeError("a bug of the monitor's")

    with Session(engine) as session:
        session.execute(insert(table))
        monkeypatch.setattr(monitor._sessions, "tracked", broken)  # our own code, failing
        session._flush()  # what flush() calls when there is something to write
        monkeypatch.undo()
        session.commit()
    assert sample(
        registry, "session_monitor_internal_errors_total", listener="session_flushed"
    ) == 1
