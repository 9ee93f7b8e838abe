"""Who holds the pool: holders equal the connections really checked out, the timeout WARNING
names them once per interval, idle-in-transaction holders are found by sampling, and the new pool
counters (waited, cancelled, peak) equal what happened."""

# No `from __future__ import annotations`: FastAPI must resolve endpoints' local annotations.

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import line_of, sample, total
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, exc, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from session_monitor import SessionMonitor

pytestmark = pytest.mark.anyio

HERE = Path(__file__).resolve()


def hold_in_thread(engine: Engine, held: threading.Event, release: threading.Event) -> None:
    with Session(engine) as session:
        session.execute(text("select 1"))  # opened-in-thread
        held.set()
        release.wait(10)  # waiting-in-thread


async def hold_in_task(engine: Engine, held: asyncio.Event, release: asyncio.Event) -> None:
    connection = engine.connect()  # opened-in-task
    held.set()
    await release.wait()  # awaiting-in-task
    connection.close()


async def test_holders_are_the_connections_checked_out_with_both_locations(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    engine = make_engine(sqlite_url, pool_size=6)
    monitor = make_monitor(engine, registry=registry)
    release, thread_release = asyncio.Event(), threading.Event()
    thread_events = [threading.Event() for _ in range(3)]
    threads = [
        threading.Thread(target=hold_in_thread, args=(engine, held, thread_release), name=f"w{n}")
        for n, held in enumerate(thread_events)
    ]
    for thread in threads:
        thread.start()
    task_events = [asyncio.Event() for _ in range(2)]
    tasks = [asyncio.create_task(hold_in_task(engine, held, release)) for held in task_events]
    try:
        for held in thread_events:
            assert held.wait(5)
        for task_held in task_events:
            await asyncio.wait_for(task_held.wait(), 5)
        raw = engine.raw_connection()  # neither session nor Core connection: a raw holder
        holders = monitor.holders()
        assert len(holders) == 6 == engine.pool.checkedout()  # type: ignore[attr-defined]
        assert [h.held_for for h in holders] == sorted((h.held_for for h in holders), reverse=True)
        by_kind: dict[str, list] = {}
        for holder in holders:
            by_kind.setdefault(holder.kind, []).append(holder)
        assert {kind: len(found) for kind, found in by_kind.items()} == {
            "session": 3,
            "connection": 2,
            "raw": 1,
        }
        for holder in by_kind["session"]:
            assert holder.opened_at == (str(HERE), line_of(HERE, "opened-in-thread"), "hold_in_thread")
            assert holder.holder.startswith("thread w")
            assert holder.activity == "application"
            assert holder.now_at[0] == (str(HERE), line_of(HERE, "waiting-in-thread"), "hold_in_thread")
            assert holder.transaction_for is not None and holder.transaction_for > 0
        for holder in by_kind["connection"]:
            assert holder.opened_at == (str(HERE), line_of(HERE, "opened-in-task"), "hold_in_task")
            assert holder.holder.startswith("task ")
            assert holder.activity == "awaiting"
            assert holder.now_at[0] == (str(HERE), line_of(HERE, "awaiting-in-task"), "hold_in_task")
            assert holder.transaction_for is None  # a Core connection begins on first use
        assert by_kind["raw"][0].opened_at is None
        raw.close()
    finally:
        thread_release.set()
        release.set()
        for thread in threads:
            thread.join()
        await asyncio.gather(*tasks)
    assert monitor.holders() == []


def test_a_pool_timeout_logs_the_holders_once_per_interval(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = make_engine(sqlite_url, pool_size=2, max_overflow=0, pool_timeout=0.05)
    monitor = make_monitor(engine, registry=registry, timeout_log_interval=60)
    held = [Session(engine) for _ in range(2)]
    for session in held:
        session.execute(text("select 1"))  # holding-the-pool
    with caplog.at_level(logging.WARNING, logger="session_monitor"):
        for _ in range(4):
            with pytest.raises(exc.TimeoutError):
                Session(engine).execute(text("select 1"))
    warnings = [r.getMessage() for r in caplog.records if "exhausted" in r.getMessage()]
    assert len(warnings) == 1
    assert "2 in use (max 2), 0 idle" in warnings[0]
    assert (
        f"2 of 2 held by outside any request, opened at {HERE}:{line_of(HERE, 'holding-the-pool')} "
        "in test_a_pool_timeout_logs_the_holders_once_per_interval"
    ) in warnings[0]
    events = monitor.pool_events()
    assert [e.kind for e in events] == ["timeout"] * 4
    assert events[-1].holders and "2 of 2 held by" in events[-1].holders[0]
    assert total(registry, "db_client_connection_timeouts_total") == 4
    assert total(registry, "sqlalchemy_pool_waited_checkouts_total") == 4
    for session in held:
        session.close()


def test_the_peak_in_use_between_two_scrapes_is_kept_once(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    engine = make_engine(sqlite_url, pool_size=5)
    make_monitor(engine, registry=registry)
    connections = [engine.connect() for _ in range(4)]
    for connection in connections:
        connection.close()
    assert total(registry, "sqlalchemy_pool_used_peak") == 4  # the scrape sees the peak ...
    assert total(registry, "sqlalchemy_pool_used_peak") == 0  # ... and the next one starts over
    with engine.connect():
        assert total(registry, "sqlalchemy_pool_used_peak") == 1


@pytest.mark.postgres
async def test_a_wait_cancelled_by_the_caller_is_counted_and_reported(
    postgres_url: str, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> None:
    pytest.importorskip("asyncpg")
    from sqlalchemy.ext.asyncio import create_async_engine

    url = make_url(postgres_url).set(drivername="postgresql+asyncpg")
    engine = create_async_engine(url, pool_size=1, max_overflow=0, pool_timeout=30)
    monitor = make_monitor(engine, registry=registry)
    try:
        async with engine.connect() as holding:
            await holding.execute(text("select 1"))

            async def wait_for_a_connection() -> None:
                async with engine.connect() as connection:
                    await connection.execute(text("select 1"))

            waiting = asyncio.create_task(wait_for_a_connection())
            await asyncio.sleep(0.2)  # it is waiting in the pool now
            waiting.cancel()  # the client went away
            with pytest.raises(asyncio.CancelledError):
                await waiting
        assert total(registry, "sqlalchemy_pool_cancelled_waits_total") == 1
        assert total(registry, "sqlalchemy_pool_waited_checkouts_total") == 1
        assert total(registry, "db_client_connection_timeouts_total") == 0
        assert [e.kind for e in monitor.pool_events()] == ["cancelled"]
    finally:
        await engine.dispose()


def test_idle_in_transaction_is_found_by_sampling_and_reported_once(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = make_engine(sqlite_url)
    make_monitor(engine, registry=registry, idle_in_transaction_threshold=0.2)
    with caplog.at_level(logging.WARNING, logger="session_monitor"), Session(engine) as session:
        session.execute(text("select 1"))  # idle-opened
        time.sleep(0.8)  # idle-elsewhere
        session.commit()
        # Without a transaction, however long it is held, it is not idle in one.
        session.connection()
        time.sleep(0.1)
    found = [r.getMessage() for r in caplog.records if "idle in transaction" in r.getMessage()]
    assert len(found) == 1
    assert f"opened at {HERE}:{line_of(HERE, 'idle-opened')}" in found[0]
    assert f"now at {HERE}:{line_of(HERE, 'idle-elsewhere')}" in found[0]
    assert sample(
        registry, "sqlalchemy_sessions_idle_in_transaction_total", route="<none>", method="<none>"
    ) == 1


@pytest.mark.postgres
def test_a_long_statement_is_not_idle_in_transaction(
    make_engine: Callable[..., Engine],
    postgres_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    engine = make_engine(postgres_url)
    make_monitor(engine, registry=registry, idle_in_transaction_threshold=0.2)
    with Session(engine) as session:
        session.execute(text("select pg_sleep(0.8)"))  # busy in the database all along
        session.commit()
    assert total(registry, "sqlalchemy_sessions_idle_in_transaction_total") == 0


async def test_an_async_session_awaiting_elsewhere_in_a_transaction_is_idle(
    tmp_path: Path, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> None:
    pytest.importorskip("aiosqlite")
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    make_monitor(engine, registry=registry, idle_in_transaction_threshold=0.2)
    try:
        async with AsyncSession(engine) as session:
            await session.execute(text("select 1"))
            await asyncio.sleep(0.8)  # an HTTP call, say, with the transaction open
            await session.commit()
        assert total(registry, "sqlalchemy_sessions_idle_in_transaction_total") == 1
    finally:
        await engine.dispose()


@pytest.mark.postgres
def test_a_failed_pre_ping_is_an_invalidation_of_its_own_reason(
    make_engine: Callable[..., Engine],
    postgres_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    import psycopg

    engine = make_engine(postgres_url, pool_size=1, pool_pre_ping=True)
    make_monitor(engine, registry=registry)
    with engine.connect() as connection:
        pid = connection.exec_driver_sql("select pg_backend_pid()").scalar_one()
    url = make_url(postgres_url).set(drivername="postgresql")
    with psycopg.connect(url.render_as_string(False), autocommit=True) as admin:
        admin.execute("select pg_terminate_backend(%s)", (pid,))
    with engine.connect() as connection:  # the pre-ping finds the idle connection dead
        assert connection.exec_driver_sql("select 1").scalar_one() == 1
    invalidations = "sqlalchemy_pool_invalidations_total"
    assert total(registry, invalidations, soft="false", reason="pre_ping") == 1
    assert total(registry, invalidations) == 1


def test_a_session_whose_first_checkout_timed_out_holds_nothing_and_is_no_leak(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    import gc

    engine = make_engine(sqlite_url, pool_size=1, max_overflow=0, pool_timeout=0.05)
    make_monitor(engine, registry=registry)
    with engine.connect():

        def drop_a_session_that_timed_out() -> None:
            session = Session(engine)
            with pytest.raises(exc.TimeoutError):
                session.execute(text("select 1"))

        drop_a_session_that_timed_out()
        gc.collect()
    # Counted as opened and closed (it asked), never as leaked: an exhaustion leaks nothing.
    assert total(registry, "sqlalchemy_sessions_leaked_total") == 0
    opened = total(registry, "sqlalchemy_sessions_opened_total")
    assert opened == total(registry, "sqlalchemy_sessions_closed_total") == 2
    assert total(registry, "sqlalchemy_sessions_active") == 0
