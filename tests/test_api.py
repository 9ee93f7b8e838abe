"""The monitor's surface: options, attachment and removal, engines of every kind, secrets."""

# No `from __future__ import annotations`: FastAPI must resolve endpoints' local annotations.

import gc
import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from conftest import sample, total
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from session_monitor import (
    ConfigurationError,
    SessionMonitor,
    SessionMonitorMiddleware,
    pool_name_for,
)

pytestmark = pytest.mark.anyio


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"leak_threshold": 0}, "leak_threshold must be a positive number"),
        ({"leak_threshold": -5}, "leak_threshold must be a positive number"),
        ({"leak_threshold": "30"}, "leak_threshold must be a positive number"),
        ({"leak_threshold": float("nan")}, "leak_threshold must be a positive number"),
        ({"stack_depth": 0}, "stack_depth must be an integer from 1 to 200"),
        ({"capture_stacks": "yes"}, "capture_stacks must be True or False"),
        ({"excluded_paths": "/health"}, "not the string '/health'"),
        ({"excluded_paths": ["health"]}, "starting with '/'"),
        ({"metrics_path": "metrics"}, "metrics_path must be a URL path"),
        ({"pool_name": ""}, "pool_name must be a non-empty string"),
        ({"registry": object()}, "registry must be a prometheus_client CollectorRegistry"),
    ],
)
def test_bad_options_fail_at_construction_saying_what_to_fix(
    options: dict[str, Any], message: str, make_engine: Callable[..., Engine], sqlite_url: str
) -> None:
    options.setdefault("registry", CollectorRegistry())
    with pytest.raises(ConfigurationError, match=message):
        SessionMonitor(make_engine(sqlite_url), **options)


def test_not_an_engine_is_refused(make_engine: Callable[..., Engine], sqlite_url: str) -> None:
    with pytest.raises(ConfigurationError, match="pass Engine or AsyncEngine objects"):
        SessionMonitor(sqlite_url, registry=CollectorRegistry())  # type: ignore[arg-type]


def test_pool_name_needs_exactly_one_engine(
    make_engine: Callable[..., Engine], sqlite_url: str, tmp_path: Any
) -> None:
    other = make_engine(f"sqlite:///{tmp_path / 'other.db'}")
    with pytest.raises(ConfigurationError, match="exactly one engine"):
        SessionMonitor(make_engine(sqlite_url), other, pool_name="x", registry=CollectorRegistry())


def test_second_monitor_on_the_same_registry_is_told_how_to_fix_it(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    engine = make_engine(sqlite_url)
    make_monitor(engine, registry=registry)
    with pytest.raises(ConfigurationError, match="one monitor per process"):
        SessionMonitor(engine, registry=registry)


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("postgresql+psycopg://app:s3cret@db.internal:5432/orders", "db.internal:5432/orders"),
        ("mysql+pymysql://root:pw@10.0.0.5/shop", "10.0.0.5/shop"),
        ("sqlite:////var/lib/app/data.db", "data.db"),
        ("sqlite://", "memory"),
    ],
)
def test_pool_names_come_from_the_url_without_credentials(url: str, name: str) -> None:
    assert pool_name_for(make_url(url)) == name


async def test_password_never_reaches_metrics_or_logs(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
    caplog: pytest.LogCaptureFixture,
) -> None:
    import os

    caplog.set_level(logging.DEBUG, logger="session_monitor")
    secret = "hunter2-s3cret"
    pg = os.environ.get("SESSION_MONITOR_TEST_POSTGRES_URL")
    # With a server, the password really is used (trust auth ignores it); without, the engine is
    # still monitored and named, which is where a URL could leak into a label.
    url = (
        make_url(pg).set(password=secret)
        if pg
        else make_url(f"postgresql+psycopg://app:{secret}@127.0.0.1:1/app")
    )
    engine = create_engine(url)
    sqlite = make_engine(sqlite_url)
    monitor = make_monitor(engine, sqlite, registry=registry)
    app = FastAPI()

    @app.get("/q")
    def query() -> int:
        with Session(engine if pg else sqlite) as session:
            session.execute(text("SELECT 1"))
            return 1

    monitor.instrument_app(app)
    async with client(app) as http:
        assert (await http.get("/q")).status_code == 200
        page = (await http.get("/metrics")).text
    engine.dispose()
    assert "db_client_connection" in page
    assert secret not in page
    assert secret not in generate_latest(registry).decode()
    assert all(secret not in r.getMessage() for r in caplog.records)


async def test_uninstrument_removes_hooks_middleware_and_metrics_and_silences_listeners(
    make_engine: Callable[..., Engine], sqlite_url: str, registry: CollectorRegistry
) -> None:
    engine = make_engine(sqlite_url)
    from session_monitor.hooks import wrappers as _hooks

    # Another monitor may be alive in this process (importing example_app.app builds one):
    # "restored" means as they were before this test.
    originals = (
        Engine.__dict__["raw_connection"],
        SessionTransaction.__dict__["_connection_for_bind"],
        Session.__dict__["_close_impl"],
    )

    def users_own_listener(*args: Any) -> None:
        pass

    event.listen(engine, "checkout", users_own_listener)
    monitor = SessionMonitor(engine, registry=registry, leak_threshold=60)
    app = FastAPI()

    @app.get("/q")
    def query() -> int:
        with Session(engine) as session:
            return session.execute(text("SELECT 1")).scalar_one()

    monitor.instrument_app(app)
    assert _hooks.subscribed(monitor)
    async with client(app) as http:
        assert (await http.get("/q")).status_code == 200
    assert sample(registry, "sqlalchemy_sessions_opened_total", route="/q", method="GET") == 1

    monitor.uninstrument()
    assert not _hooks.subscribed(monitor)
    assert (
        Engine.__dict__["raw_connection"],
        SessionTransaction.__dict__["_connection_for_bind"],
        Session.__dict__["_close_impl"],
    ) == originals
    assert not event.contains(Session, "after_commit", lambda: None)
    # The pool listeners stay (removing one races with another thread running the event),
    # switched off: a connection held now is not followed.
    assert users_own_listener in list(engine.pool.dispatch.checkout)
    with engine.connect():
        assert monitor.tracked_checkouts == 0
    assert list(registry.collect()) == []
    assert "build_middleware_stack" not in vars(app)
    assert [m for m in app.user_middleware if m.cls is SessionMonitorMiddleware] == []
    # An already-built middleware stack passes everything through.
    async with client(app) as http:
        assert (await http.get("/q")).status_code == 200
        assert (await http.get("/metrics")).status_code == 404
    monitor.uninstrument()  # twice is harmless


async def test_add_middleware_directly_and_excluded_paths(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    engine = make_engine(sqlite_url)
    monitor = make_monitor(engine, registry=registry, excluded_paths=["/health"], metrics_path="/m")
    app = FastAPI()
    app.add_middleware(SessionMonitorMiddleware, monitor=monitor)

    @app.get("/health")
    def health() -> int:
        with Session(engine) as session:
            return session.execute(text("SELECT 1")).scalar_one()

    @app.get("/work")
    def work() -> int:
        return health()

    async with client(app) as http:
        for path in ("/health", "/work", "/work"):
            assert (await http.get(path)).status_code == 200
        page = await http.get("/m")
    assert page.status_code == 200
    assert 'sqlalchemy_sessions_opened_total{method="GET",route="/work"} 2.0' in page.text
    # An excluded request's work is still counted, as work outside any request.
    assert (
        sample(registry, "sqlalchemy_sessions_opened_total", route="<none>", method="<none>") == 1
    )


async def test_every_engine_mode_sees_engines_created_later(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    tmp_path: Any,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    monitor = make_monitor(registry=registry)
    # As a test suite overriding get_db with its own engine would.
    engine = make_engine(sqlite_url, pool_size=3, max_overflow=1)
    other = make_engine(f"sqlite:///{tmp_path / 'second.db'}")
    SessionLocal = sessionmaker(engine)
    app = FastAPI()

    @app.get("/a")
    def a() -> int:
        with SessionLocal() as session:
            return session.execute(text("SELECT 1")).scalar_one()

    @app.get("/b")
    def b() -> int:
        with other.connect() as connection:
            return connection.execute(text("SELECT 1")).scalar_one()

    monitor.instrument_app(app)
    async with client(app) as http:
        for path in ("/a", "/a", "/b"):
            assert (await http.get(path)).status_code == 200
    assert sample(registry, "sqlalchemy_sessions_closed_total", route="/a", method="GET") == 2
    assert sample(registry, "sqlalchemy_sessions_closed_total", route="/b", method="GET") == 1
    assert sample(registry, "db_client_connection_max", db_client_connection_pool_name="app.db") == 4
    assert (
        sample(registry, "db_client_connection_use_time_seconds_count", db_client_connection_pool_name="second.db") == 1
    )
    assert (
        sample(registry, "db_client_connection_create_time_seconds_count", db_client_connection_pool_name="app.db") == 1
    )


def test_savepoints_dispose_and_reuse_of_a_closed_session(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    engine = make_engine(sqlite_url)
    make_monitor(engine, registry=registry)
    session = Session(engine)
    with session.begin():
        session.execute(text("SELECT 1"))
        with session.begin_nested():
            session.execute(text("SELECT 2"))
    session.close()
    engine.dispose()  # the pool is replaced; listeners on the engine carry over
    session.execute(text("SELECT 3"))  # a closed Session can be used again: a new session
    session.close()
    none = {"route": "<none>", "method": "<none>"}
    assert sample(registry, "sqlalchemy_sessions_opened_total", **none) == 2
    assert sample(registry, "sqlalchemy_transactions_total", outcome="commit", **none) == 1
    assert sample(registry, "sqlalchemy_transactions_total", outcome="close", **none) == 1
    assert (
        sample(registry, "db_client_connection_create_time_seconds_count", db_client_connection_pool_name="app.db") == 2
    )
    assert total(registry, "db_client_connection_count", db_client_connection_state="used") == 0
    assert sample(registry, "db_client_connection_count", db_client_connection_pool_name="app.db", db_client_connection_state="idle") == 1


async def test_async_engine_and_async_session(
    tmp_path: Any, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> None:
    pytest.importorskip("aiosqlite")
    pytest.importorskip("greenlet")
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
    from sqlalchemy.pool import AsyncAdaptedQueuePool

    engine = create_async_engine(
        f"sqlite+aiosqlite:///{tmp_path / 'async.db'}", poolclass=AsyncAdaptedQueuePool
    )
    monitor = make_monitor(engine, registry=registry)
    SessionLocal = async_sessionmaker(engine)
    app = FastAPI()

    async def get_db() -> Any:
        async with SessionLocal() as session:
            yield session

    from typing import Annotated

    from fastapi import Depends

    @app.get("/ok")
    async def ok(db: Annotated[AsyncSession, Depends(get_db)]) -> int:
        value = (await db.execute(text("SELECT 1"))).scalar_one()
        await db.commit()
        return int(value)

    @app.get("/rollback")
    async def rollback(db: Annotated[AsyncSession, Depends(get_db)]) -> int:
        await db.execute(text("SELECT 1"))
        await db.rollback()
        return 0

    leaked: list[AsyncSession] = []

    @app.get("/leak")
    async def leak() -> int:
        session = SessionLocal()
        leaked.append(session)
        return int((await session.execute(text("SELECT 1"))).scalar_one())

    monitor.instrument_app(app)
    async with client(app) as http:
        for path in ("/ok", "/ok", "/rollback", "/leak"):
            assert (await http.get(path)).status_code == 200
    assert sample(registry, "sqlalchemy_sessions_opened_total", route="/ok", method="GET") == 2
    assert (
        sample(
            registry, "sqlalchemy_transactions_total", route="/ok", method="GET", outcome="commit"
        )
        == 2
    )
    assert (
        sample(
            registry,
            "sqlalchemy_transactions_total",
            route="/rollback",
            method="GET",
            outcome="rollback",
        )
        == 1
    )
    assert (
        sample(
            registry,
            "sqlalchemy_sessions_leaked_total",
            route="/leak",
            method="GET",
            reason="request_end",
        )
        == 1
    )
    await leaked[0].close()
    assert total(registry, "sqlalchemy_sessions_active") == 0
    assert total(registry, "db_client_connection_count", db_client_connection_state="used") == 0
    await engine.dispose()
    gc.collect()


def test_a_refused_monitor_leaves_the_registry_as_it_was(
    make_engine: Callable[..., Engine], sqlite_url: str, registry: CollectorRegistry
) -> None:
    from prometheus_client import Counter

    # Someone else owns one of our names: construction fails, and registers none of the others.
    Counter("sqlalchemy_transactions", "taken", registry=registry)
    before = {m.name for m in registry.collect()}
    with pytest.raises(ConfigurationError, match="one monitor per process"):
        SessionMonitor(make_engine(sqlite_url), registry=registry)
    assert {m.name for m in registry.collect()} == before


def test_invalidated_connections_are_counted_without_internal_errors(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    engine = make_engine(sqlite_url)
    make_monitor(engine, registry=registry)
    with Session(engine) as session:
        session.execute(text("SELECT 1"))
        session.connection().invalidate()
        session.rollback()
        session.execute(text("SELECT 1"))  # reconnects
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
        connection.invalidate()
        connection.rollback()
    pool = {"db_client_connection_pool_name": "app.db"}
    invalidations = "sqlalchemy_pool_invalidations_total"
    assert sample(registry, invalidations, soft="false", reason="explicit", **pool) == 2
    assert total(registry, invalidations, **pool) == 2
    assert total(registry, "session_monitor_internal_errors_total") == 0
    assert total(registry, "sqlalchemy_sessions_active") == 0
    assert total(registry, "db_client_connection_count", db_client_connection_state="used") == 0


def test_monitoring_keeps_statements_off_the_event_dispatch_path(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    # Any Connection-event listener switches every statement of an engine to SQLAlchemy's
    # slower dispatching path, for good; the monitor must get what it needs without one.
    engine = make_engine(sqlite_url)
    make_monitor(engine, registry=registry)
    with engine.begin() as connection:
        connection.execute(text("SELECT 1"))
    with Session(engine) as session:
        session.execute(text("SELECT 1"))
        session.commit()
    assert engine._has_events is False
    assert sample(registry, "sqlalchemy_transactions_total", route="<none>", method="<none>", outcome="commit") == 2
