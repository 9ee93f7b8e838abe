"""PostgreSQL end to end: request sessions on psycopg and asyncpg, killed backends, pool exhaustion.

Every test needs SESSION_MONITOR_TEST_POSTGRES_URL (the `postgres_url` fixture skips without it).
DDL and ground-truth reads go through an engine the monitor does not watch, so every number the
metrics show comes from the app's requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest
from _it_apps import ItemsApp, build_async_app, build_sync_app, items_table
from _it_checks import GaugeSampler, assert_invariants, expected_counts, route_counts
from conftest import sample, total
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, Table, make_url, select
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from session_monitor import SessionMonitor, pool_name_for

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def driver_url(url: str, driver: str) -> str:
    return make_url(url).set(drivername=f"postgresql+{driver}").render_as_string(False)


def libpq_url(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(False)


def pool_name(url: str) -> str:
    return pool_name_for(make_url(url))


@pytest.fixture
def admin(postgres_url: str, make_engine: Callable[..., Engine]) -> Engine:
    """An engine the monitor never watches: DDL and ground-truth reads."""
    return make_engine(driver_url(postgres_url, "psycopg"), poolclass=NullPool)


@pytest.fixture
def table(admin: Engine) -> Iterator[Table]:
    table = items_table()
    table.metadata.create_all(admin)
    yield table
    table.metadata.drop_all(admin)


def client_for(items: ItemsApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(items.app), base_url="http://pg")


@contextlib.asynccontextmanager
async def items_app(
    driver: str,
    postgres_url: str,
    table: Table,
    registry: CollectorRegistry,
    make_engine: Callable[..., Engine],
    make_monitor: Callable[..., SessionMonitor],
) -> AsyncIterator[ItemsApp]:
    """The app on psycopg (sync) or asyncpg (async), created and disposed in the test's loop."""
    if driver == "psycopg":
        engine = make_engine(driver_url(postgres_url, "psycopg"), pool_size=5, max_overflow=5)
        items = build_sync_app(engine, table)
        make_monitor(engine, registry=registry).instrument_app(items.app)
        try:
            yield items
        finally:
            items.leaks.close_all()
    else:
        async_engine = create_async_engine(
            driver_url(postgres_url, "asyncpg"), pool_size=5, max_overflow=5
        )
        items = build_async_app(async_engine, table)
        make_monitor(async_engine, registry=registry).instrument_app(items.app)
        try:
            yield items
        finally:
            await items.leaks.aclose_all()
            await async_engine.dispose()


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
async def test_request_sessions_counted_by_route(
    driver: str,
    postgres_url: str,
    table: Table,
    admin: Engine,
    registry: CollectorRegistry,
    make_engine: Callable[..., Engine],
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    creates, reads, rollbacks, leaks, no_db = 4, 6, 3, 2, 2
    async with (
        items_app(driver, postgres_url, table, registry, make_engine, make_monitor) as items,
        client_for(items) as client,
    ):
        ids = []
        for i in range(creates):
            response = await client.post("/items", params={"name": f"item{i}"})
            assert response.status_code == 200
            ids.append(response.json()["id"])
        assert (await client.post("/leak")).json() == {"count": creates}
        for i in range(reads):
            response = await client.get(f"/items/{ids[i % creates]}")
            assert response.json() == {"id": ids[i % creates], "name": f"item{i % creates}"}
        for i in range(rollbacks):
            response = await client.post(f"/items/{ids[i]}/rename", params={"name": "renamed"})
            assert response.status_code == 409
        for _ in range(no_db):
            assert (await client.get("/nodb")).status_code == 200
        assert (await client.post("/leak")).status_code == 200

        # The database agrees: the renames were rolled back, the inserts committed.
        with admin.connect() as connection:
            rows = connection.execute(select(table.c.name)).scalars().all()
        assert sorted(rows) == [f"item{i}" for i in range(creates)]

        assert route_counts(registry, "/items", "POST") == expected_counts(
            creates, creates, commit=creates
        )
        assert route_counts(registry, "/items/{item_id}", "GET") == expected_counts(
            reads, reads, commit=reads
        )
        assert route_counts(registry, "/items/{item_id}/rename", "POST") == expected_counts(
            rollbacks, rollbacks, rollback=rollbacks
        )
        # A session that never touches the database is never opened.
        assert route_counts(registry, "/nodb", "GET") == expected_counts()
        assert route_counts(registry, "/leak", "POST") == expected_counts(
            leaks, 0, leaks, leaked_request_end=leaks
        )
        pool = pool_name(postgres_url)
        assert sample(registry, "db_client_connection_count", db_client_connection_pool_name=pool, db_client_connection_state="used") == leaks
        assert (
            total(registry, "sqlalchemy_sessions_opened_total")
            == creates + reads + rollbacks + leaks
        )
        assert_invariants(registry)

        for session in items.leaks.take():
            closing = session.close()
            if asyncio.iscoroutine(closing):
                await closing

        # Closing late ends the leaked transactions as "close" and does not take the leak back.
        assert route_counts(registry, "/leak", "POST") == expected_counts(
            leaks, leaks, 0, leaked_request_end=leaks, close=leaks
        )
        assert sample(registry, "db_client_connection_count", db_client_connection_pool_name=pool, db_client_connection_state="used") == 0
        assert total(registry, "sqlalchemy_sessions_active") == 0
        assert_invariants(registry)


async def test_terminated_backends_fail_one_request_then_recover(
    postgres_url: str,
    table: Table,
    registry: CollectorRegistry,
    make_engine: Callable[..., Engine],
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    application_name = f"smit_{uuid.uuid4().hex[:12]}"
    engine = make_engine(
        driver_url(postgres_url, "psycopg"),
        pool_size=2,
        max_overflow=0,
        pool_pre_ping=False,
        connect_args={"application_name": application_name},
    )
    items = build_sync_app(engine, table)
    make_monitor(engine, registry=registry).instrument_app(items.app)
    pool = pool_name(postgres_url)

    def invalidations(soft: str) -> float:
        return total(registry, "sqlalchemy_pool_invalidations_total", db_client_connection_pool_name=pool, soft=soft)

    def connections_created() -> float:
        return sample(registry, "db_client_connection_create_time_seconds_count", db_client_connection_pool_name=pool)

    def backends(admin: psycopg.Connection[Any]) -> list[int]:
        query = "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
        return [row[0] for row in admin.execute(query, (application_name,)).fetchall()]

    async with client_for(items) as client:
        # Two overlapping requests leave two connections idle in the pool.
        warm = await asyncio.gather(*(client.get("/hold", params={"seconds": 0.3}) for _ in "ab"))
        assert [response.status_code for response in warm] == [200, 200]
        assert sample(registry, "db_client_connection_count", db_client_connection_pool_name=pool, db_client_connection_state="idle") == 2
        assert connections_created() == 2

        with psycopg.connect(libpq_url(postgres_url), autocommit=True) as admin:
            killed = backends(admin)
            assert len(killed) == 2
            terminated = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s",
                (application_name,),
            ).fetchall()
            assert terminated == [(True,), (True,)]
            deadline = time.monotonic() + 5
            while backends(admin):
                assert time.monotonic() < deadline, "backends still alive after 5 s"
                await asyncio.sleep(0.02)

            # SQLAlchemy does not retry: without pre-ping the first statement on a dead
            # connection raises OperationalError, the connection is invalidated (one hard
            # invalidation) and the pool's invalidation time moves past every older connection.
            first = await client.get("/ping")
            assert first.status_code == 503
            assert first.json() == {"error": "database", "connection_invalidated": True}
            assert invalidations("false") == 1
            assert invalidations("true") == 0
            # Seen by a statement, not asked for: the driver's error.
            assert sample(
                registry,
                "sqlalchemy_pool_invalidations_total",
                db_client_connection_pool_name=pool,
                soft="false",
                reason="error",
            ) == 1

            # The other dead connection is recycled at checkout (closed and replaced, no
            # invalidate event), so every later request succeeds.
            for _ in range(5):
                response = await client.get("/ping")
                assert response.json() == {"one": 1}
            assert invalidations("false") == 1
            assert connections_created() == 4
            alive = backends(admin)
            assert len(alive) == 2
            assert not set(alive) & set(killed)

    # get_db rolled the failed request back: that transaction's outcome is a rollback.
    assert route_counts(registry, "/ping", "GET") == expected_counts(6, 6, commit=5, rollback=1)
    assert sample(registry, "db_client_connection_count", db_client_connection_pool_name=pool, db_client_connection_state="used") == 0
    assert total(registry, "sqlalchemy_sessions_active") == 0
    # Session.rollback() on the invalidated connection fires the engine's "rollback" event; the
    # monitor's listener must cope with an invalidated Connection.
    assert sample(registry, "session_monitor_internal_errors_total", listener="rollback") == 0
    assert_invariants(registry)


async def test_pool_exhaustion_times_out_into_503(
    postgres_url: str,
    table: Table,
    registry: CollectorRegistry,
    make_engine: Callable[..., Engine],
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    engine = make_engine(
        driver_url(postgres_url, "psycopg"), pool_size=2, max_overflow=0, pool_timeout=0.5
    )
    items = build_sync_app(engine, table)
    make_monitor(engine, registry=registry).instrument_app(items.app)
    pool = pool_name(postgres_url)

    def pool_sample(name: str, **labels: str) -> float:
        return sample(registry, name, db_client_connection_pool_name=pool, **labels)

    async with client_for(items) as client:
        # A cold pool: six requests arrive while its two connections are still being opened.
        async with GaugeSampler(registry) as cold:
            burst = await asyncio.gather(
                *(client.get("/hold", params={"seconds": 1.0}) for _ in range(6))
            )
        statuses = sorted(response.status_code for response in burst)
        # Two requests get the two connections and hold them for 1 s; the four others give up
        # after pool_timeout (0.5 s).
        assert statuses == [200, 200, 503, 503, 503, 503]
        assert pool_sample("db_client_connection_timeouts_total") == statuses.count(503)
        # Only checkouts that got a connection have a wait time.
        assert pool_sample("db_client_connection_wait_time_seconds_count") == 2
        assert pool_sample("db_client_connection_wait_time_seconds_bucket", le="0.1") == 2

        # A warm pool, three requests holding 0.2 s: the third waits for a connection, then
        # gets one.
        async with GaugeSampler(registry) as warm:
            waited = await asyncio.gather(
                *(client.get("/hold", params={"seconds": 0.2}) for _ in range(3))
            )
        assert [response.status_code for response in waited] == [200, 200, 200]

    assert pool_sample("db_client_connection_timeouts_total") == 4
    assert pool_sample("db_client_connection_wait_time_seconds_count") == 5
    assert pool_sample("db_client_connection_wait_time_seconds_bucket", le="0.1") == 4
    assert pool_sample("db_client_connection_wait_time_seconds_bucket", le="0.5") == 5
    assert pool_sample("db_client_connection_wait_time_seconds_sum") >= 0.1
    assert pool_sample("db_client_connection_pending_requests") == 0
    assert pool_sample("db_client_connection_count", db_client_connection_state="used") == 0
    assert pool_sample("db_client_connection_count", db_client_connection_state="idle") == 2
    # Each timed-out session asked for a connection (opened) and was closed by get_db; it never
    # began a database transaction.
    assert route_counts(registry, "/hold", "GET") == expected_counts(9, 9, commit=5)
    assert_invariants(registry)

    for watch in (cold, warm):
        assert watch.max_used == {pool: 2}
        assert watch.negative == []
        assert watch.over_max == []
    # While the two holders hold, the others wait, and the gauge says how many.
    assert (2, 1) in warm.seen[pool]
    assert warm.max_pending[pool] <= 3
    assert (2, 4) in cold.seen[pool]
    assert cold.max_pending[pool] <= 6
