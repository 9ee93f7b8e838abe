"""A pool is one engine's pool object, whatever its name.

Two engines on one database share a pool_name label but not their connections: waits, pending
callers and nested checkouts are counted per pool object. After `engine.dispose()` and in a
forked child the gauges follow the engine's live pool, whose own counts (`pool.checkedin()`,
`pool.checkedout()`) are the ground truth here.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from conftest import in_child, sample, total
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy import Connection, Engine, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from test_postgres import driver_url, pool_name

from session_monitor import SessionMonitor, pool_name_for

SQLITE_POOL = "app.db"  # the label of the `sqlite_url` fixture's pool


def pool_sample(registry: CollectorRegistry, name: str, pool: str, **labels: str) -> float:
    return sample(registry, name, db_client_connection_pool_name=pool, **labels)


def gauges(registry: CollectorRegistry, pool: str) -> tuple[float, float]:
    """(idle, used) as the scrape shows them."""
    return (
        pool_sample(registry, "db_client_connection_count", pool, db_client_connection_state="idle"),
        pool_sample(registry, "db_client_connection_count", pool, db_client_connection_state="used"),
    )


def balanced(registry: CollectorRegistry, pool: str) -> bool:
    """checkouts = checkins + used."""
    checkouts = pool_sample(registry, "db_client_connection_wait_time_seconds_count", pool)
    checkins = pool_sample(registry, "db_client_connection_use_time_seconds_count", pool)
    return checkouts == checkins + gauges(registry, pool)[1]


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def connected(engine: Engine, count: int) -> list[Connection]:
    """`count` connections out of the pool at once, each used: the pool has opened as many."""
    connections = [engine.connect() for _ in range(count)]
    for connection in connections:
        connection.execute(text("select 1"))
    return connections


def checkout_that_waits(
    engine: Engine, bound: int, registry: CollectorRegistry, pool: str
) -> float:
    """Hold the `bound` connections the engine's pool allows, let one more caller wait, then
    release one: returns the pending gauge seen while that caller waited."""
    held = connected(engine, bound)
    waiter = threading.Thread(target=lambda: engine.connect().close())
    waiter.start()
    # The waiter is in the pool's queue once the pool says nothing is left for it.
    wait_until(lambda: pool_sample(registry, "db_client_connection_pending_requests", pool) > 0, 1)
    pending = pool_sample(registry, "db_client_connection_pending_requests", pool)
    held.pop().close()
    waiter.join(5)
    for connection in held:
        connection.close()
    return pending


# -- two engines, one database ------------------------------------------------------------------


async def wait_async(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def select_one(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await connection.execute(text("select 1"))


@pytest.mark.anyio
async def test_an_exhausted_async_pool_beside_a_sync_pool_counts_its_waits(
    postgres_url: str,
    registry: CollectorRegistry,
    make_engine: Callable[..., Engine],
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    sync_engine = make_engine(driver_url(postgres_url, "psycopg"), pool_size=2, max_overflow=0)
    async_engine = create_async_engine(
        driver_url(postgres_url, "asyncpg"), pool_size=1, max_overflow=0, pool_timeout=10
    )
    name = pool_name(postgres_url)
    assert pool_name_for(async_engine.url) == name  # one label for both
    try:
        make_monitor(sync_engine, async_engine, registry=registry)
        with sync_engine.connect() as first, sync_engine.connect() as second:
            first.execute(text("select 1"))
            second.execute(text("select 1"))
        assert sync_engine.pool.checkedin() == 2  # type: ignore[attr-defined]

        def pending() -> float:
            return pool_sample(registry, "db_client_connection_pending_requests", name)

        async with async_engine.connect() as held:
            await held.execute(text("select 1"))
            # The async pool is exhausted, the sync pool has two idle connections: a caller of
            # the async engine waits all the same.
            given_up = asyncio.create_task(select_one(async_engine))
            await wait_async(lambda: pending() == 1)
            given_up.cancel()
            with pytest.raises(asyncio.CancelledError):
                await given_up
            assert pending() == 0
            served = asyncio.create_task(select_one(async_engine))
            await wait_async(lambda: pending() == 1)
        await served

        assert pool_sample(registry, "sqlalchemy_pool_waited_checkouts_total", name) == 2
        assert pool_sample(registry, "sqlalchemy_pool_cancelled_waits_total", name) == 1
        assert pending() == 0
        # One label: the two pools' connections summed, each pool's own count the truth.
        live = sync_engine.pool.checkedin() + async_engine.sync_engine.pool.checkedin()  # type: ignore[attr-defined]
        assert gauges(registry, name) == (live, 0) == (3, 0)
        assert pool_sample(registry, "db_client_connection_max", name) == 3
        assert balanced(registry, name)
    finally:
        await async_engine.dispose()


@pytest.mark.anyio
async def test_holding_one_pool_and_asking_another_is_no_nested_checkout(
    postgres_url: str,
    registry: CollectorRegistry,
    make_engine: Callable[..., Engine],
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    sync_engine = make_engine(driver_url(postgres_url, "psycopg"), pool_size=2, max_overflow=0)
    async_engine = create_async_engine(driver_url(postgres_url, "asyncpg"), pool_size=1)
    app = FastAPI()

    def select_two() -> int:
        with Session(sync_engine) as session:
            return int(session.execute(text("select 2")).scalar_one())

    @app.get("/two-pools")
    async def two_pools() -> int:
        async with AsyncSession(async_engine) as held:
            await held.execute(text("select 1"))
            return await run_in_threadpool(select_two)

    @app.get("/one-pool")
    def one_pool() -> int:
        with Session(sync_engine) as held:
            held.execute(text("select 1"))
            return select_two()

    try:
        make_monitor(sync_engine, async_engine, registry=registry).instrument_app(app)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://pg") as client:
            assert (await client.get("/two-pools")).json() == 2
            assert (await client.get("/one-pool")).json() == 2

        def nested(route: str) -> float:
            labels = {"kind": "nested_checkout", "route": route, "method": "GET"}
            return sample(registry, "sqlalchemy_session_pitfalls_total", **labels)

        assert nested("/two-pools") == 0
        assert nested("/one-pool") == 1
    finally:
        await async_engine.dispose()


# -- dispose -----------------------------------------------------------------------------------


def test_dispose_with_a_connection_out(
    sqlite_url: str,
    registry: CollectorRegistry,
    make_engine: Callable[..., Engine],
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    engine = make_engine(sqlite_url, pool_size=2, max_overflow=0, pool_timeout=5)
    view = engine.execution_options(isolation_level="SERIALIZABLE")  # its parent's pool
    make_monitor(engine, registry=registry)
    out = view.connect()
    out.execute(text("select 1"))
    with engine.connect() as returned:
        returned.execute(text("select 1"))
    assert gauges(registry, SQLITE_POOL) == (1, 1)

    engine.dispose()  # closes the idle connection; the one out is left to its holder
    assert engine.pool.checkedin() == 0  # type: ignore[attr-defined]
    # Still held by the app: used until it comes back, so checkouts = checkins + used.
    assert gauges(registry, SQLITE_POOL) == (0, 1)
    assert balanced(registry, SQLITE_POOL)

    out.close()  # back to the disposed pool, not to the engine's
    live = engine.pool
    assert gauges(registry, SQLITE_POOL) == (live.checkedin(), live.checkedout()) == (0, 0)  # type: ignore[attr-defined]
    assert balanced(registry, SQLITE_POOL)

    # The new pool is empty: a caller finding both its connections held waits, through the view.
    assert checkout_that_waits(view, 2, registry, SQLITE_POOL) == 1
    assert pool_sample(registry, "sqlalchemy_pool_waited_checkouts_total", SQLITE_POOL) == 1
    assert gauges(registry, SQLITE_POOL) == (live.checkedin(), 0) == (2, 0)  # type: ignore[attr-defined]
    assert balanced(registry, SQLITE_POOL)


def test_dispose_without_closing(
    sqlite_url: str,
    registry: CollectorRegistry,
    make_engine: Callable[..., Engine],
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    engine = make_engine(sqlite_url, pool_size=4, max_overflow=0, pool_timeout=5)
    make_monitor(engine, registry=registry)
    for connection in connected(engine, 4):
        connection.close()
    assert gauges(registry, SQLITE_POOL) == (4, 0)

    # As in a forked child: the old pool's connections are left alone (kept open here, so
    # their ids stay taken), the engine starts a new, empty pool.
    old = engine.pool
    engine.dispose(close=False)
    assert old.checkedin() == 4  # type: ignore[attr-defined]
    assert gauges(registry, SQLITE_POOL) == (engine.pool.checkedin(), 0) == (0, 0)  # type: ignore[attr-defined]

    assert checkout_that_waits(engine, 4, registry, SQLITE_POOL) == 1
    assert pool_sample(registry, "sqlalchemy_pool_waited_checkouts_total", SQLITE_POOL) == 1
    assert gauges(registry, SQLITE_POOL) == (engine.pool.checkedin(), 0) == (4, 0)  # type: ignore[attr-defined]
    assert balanced(registry, SQLITE_POOL)
    old.dispose()


# -- before the monitor, and in a forked child ---------------------------------------------------


def test_idle_connections_opened_before_the_monitor_are_idle(
    sqlite_url: str,
    registry: CollectorRegistry,
    make_engine: Callable[..., Engine],
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    engine = make_engine(sqlite_url, pool_size=3, max_overflow=0, pool_timeout=5)
    for connection in connected(engine, 3):
        connection.close()
    make_monitor(engine, registry=registry)
    assert gauges(registry, SQLITE_POOL) == (engine.pool.checkedin(), 0) == (3, 0)  # type: ignore[attr-defined]
    with engine.connect() as connection:
        connection.execute(text("select 1"))
        assert gauges(registry, SQLITE_POOL) == (2, 1)
    assert gauges(registry, SQLITE_POOL) == (3, 0)
    assert balanced(registry, SQLITE_POOL)


def _child(engine: Engine, registry: CollectorRegistry) -> dict[str, Any]:
    """In the forked child: SQLAlchemy's recipe, one connection of its own, a session held past
    the leak threshold; then its numbers."""
    engine.dispose(close=False)
    with engine.connect() as connection:
        connection.execute(text("select 1"))
    with Session(engine) as session:
        session.execute(text("select 1"))
        time.sleep(1.0)  # past leak_threshold: only a running age watcher reports it
    live = engine.pool
    return {
        "gauges": gauges(registry, SQLITE_POOL),
        "live": (live.checkedin(), live.checkedout()),  # type: ignore[attr-defined]
        "balanced": balanced(registry, SQLITE_POOL),
        "age_leaks": total(registry, "sqlalchemy_sessions_leaked_total", reason="age"),
        "threads": sorted(t.name for t in threading.enumerate() if t.is_alive()),
    }


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="os.fork as gunicorn uses it")
def test_a_forked_child_counts_its_own_pool(
    sqlite_url: str,
    registry: CollectorRegistry,
    make_engine: Callable[..., Engine],
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    engine = make_engine(sqlite_url, pool_size=5, max_overflow=0, pool_timeout=5)
    make_monitor(engine, registry=registry, leak_threshold=0.3)
    connections = connected(engine, 4)
    held = connections.pop()
    for connection in connections:
        connection.close()
    assert gauges(registry, SQLITE_POOL) == (3, 1)

    child = in_child(lambda: _child(engine, registry))

    # Its own connection idle, none of the parent's, the held one not its own.
    assert child["gauges"] == child["live"] == [1, 0]
    assert child["balanced"]
    assert "session_monitor-age-watcher" in child["threads"]
    assert "session_monitor-idle-sampler" in child["threads"]
    assert child["age_leaks"] == 1
    # The parent's numbers are its own.
    held.close()
    assert gauges(registry, SQLITE_POOL) == (engine.pool.checkedin(), 0) == (4, 0)  # type: ignore[attr-defined]
