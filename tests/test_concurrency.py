"""Concurrent requests and client disconnects: the metrics still add up exactly.

The mixed app runs sync and async endpoints on sync and async sessions (and Core connections)
against a sync engine and an async engine: SQLite files with a QueuePool, and PostgreSQL (psycopg
and asyncpg) when SESSION_MONITOR_TEST_POSTGRES_URL is set.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from _it_apps import MIXED_ROUTES, build_disconnect_app, build_mixed_app, items_table
from _it_checks import GaugeSampler, assert_invariants, expected_counts, route_counts
from _it_server import serve, start_then_hang_up
from conftest import sample, total
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, Table, create_engine, func, make_url, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, NullPool

from session_monitor import SessionMonitor, pool_name_for

pytestmark = pytest.mark.anyio

REQUESTS = 200
STREAM_CHUNKS = 500  # 10 ms apart: a stream that runs to the end takes 5 s


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Backend:
    engine: Engine
    async_engine: AsyncEngine
    sync_table: Table
    async_table: Table
    # Unwatched engines for DDL and ground-truth reads, one per table.
    sync_admin: Engine
    async_admin: Engine

    def rows(self, table: Table, admin: Engine) -> int:
        with admin.connect() as connection:
            return connection.scalar(select(func.count()).select_from(table)) or 0


@pytest.fixture(params=["sqlite", "postgres"])
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, make_engine: Callable[..., Engine]
) -> Iterator[Backend]:
    """Engines and tables; the test disposes of the async engine in its own event loop."""
    pool = {"pool_size": 5, "max_overflow": 5, "pool_timeout": 30}
    sync_table, async_table = items_table("it_sync"), items_table("it_async")
    if request.param == "sqlite":
        sync_file, async_file = tmp_path / "sync.db", tmp_path / "async.db"
        engine = make_engine(f"sqlite:///{sync_file}", **pool)
        async_engine = create_async_engine(
            f"sqlite+aiosqlite:///{async_file}", poolclass=AsyncAdaptedQueuePool, **pool
        )
        sync_admin = make_engine(f"sqlite:///{sync_file}", poolclass=NullPool)
        async_admin = make_engine(f"sqlite:///{async_file}", poolclass=NullPool)
    else:
        url = make_url(request.getfixturevalue("postgres_url"))
        sync_url = url.set(drivername="postgresql+psycopg").render_as_string(False)
        engine = make_engine(sync_url, **pool)
        async_engine = create_async_engine(url.set(drivername="postgresql+asyncpg"), **pool)
        sync_admin = async_admin = make_engine(sync_url, poolclass=NullPool)
    sync_table.metadata.create_all(sync_admin)
    async_table.metadata.create_all(async_admin)
    yield Backend(engine, async_engine, sync_table, async_table, sync_admin, async_admin)
    sync_table.metadata.drop_all(sync_admin)
    async_table.metadata.drop_all(async_admin)


async def test_concurrent_mixed_requests_add_up(
    backend: Backend,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    app = build_mixed_app(
        backend.engine, backend.async_engine, backend.sync_table, backend.async_table
    )
    monitor = make_monitor(backend.engine, backend.async_engine, registry=registry)
    monitor.instrument_app(app)
    plan = [MIXED_ROUTES[i % len(MIXED_ROUTES)] for i in range(REQUESTS)]
    sent = Counter((method, path) for method, path, _ in plan)

    transport = httpx.ASGITransport(app)
    try:
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://mixed") as client,
            GaugeSampler(registry) as watch,
        ):
            responses = await asyncio.gather(
                *(client.request(method, path) for method, path, _ in plan)
            )
    finally:
        await backend.async_engine.dispose()

    for (_, path, kind), response in zip(plan, responses, strict=True):
        assert response.status_code == (409 if kind == "rollback" else 200), path
    # Sampled while the load ran: never negative, never above the pool's maximum, and the
    # requests really did overlap.
    assert watch.samples >= 10
    assert watch.negative == []
    assert watch.over_max == []
    assert watch.max_used, "the sampler saw no pool"
    for pool, used in watch.max_used.items():
        assert used >= 2, f"no two connections of {pool} were ever used at once"

    for method, path, kind in MIXED_ROUTES:
        n = sent[(method, path)]
        expected = {
            "commit": expected_counts(n, n, commit=n),
            "rollback": expected_counts(n, n, rollback=n),
            "nodb": expected_counts(),
        }[kind]
        assert route_counts(registry, path, method) == expected, (method, path)
    used_db = sum(sent[(method, path)] for method, path, kind in MIXED_ROUTES if kind != "nodb")
    assert total(registry, "sqlalchemy_sessions_opened_total") == used_db
    assert total(registry, "sqlalchemy_sessions_active") == 0
    assert total(registry, "db_client_connection_count", db_client_connection_state="used") == 0
    assert total(registry, "db_client_connection_pending_requests") == 0
    assert total(registry, "db_client_connection_timeouts_total") == 0
    assert monitor.tracked_sessions == 0
    assert monitor.tracked_checkouts == 0
    assert_invariants(registry)

    # The database agrees with the outcomes: only committed inserts are there.
    assert backend.rows(backend.sync_table, backend.sync_admin) == sent[("POST", "/sync/commit")]
    assert backend.rows(backend.async_table, backend.async_admin) == sent[("POST", "/async/commit")]


@pytest.mark.e2e
def test_client_disconnect_mid_request(
    sqlite_url: str,
    registry: CollectorRegistry,
    make_engine: Callable[..., Engine],
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    table = items_table()
    table.metadata.create_all(create_engine(sqlite_url, poolclass=NullPool))
    engine = make_engine(sqlite_url, pool_size=2, max_overflow=2)
    served = build_disconnect_app(engine, table, chunks=STREAM_CHUNKS)
    make_monitor(engine, registry=registry).instrument_app(served.app)
    pool = pool_name_for(make_url(sqlite_url))

    def used() -> float:
        return sample(registry, "db_client_connection_count", db_client_connection_pool_name=pool, db_client_connection_state="used")

    with serve(served.app) as running:
        # A streaming body that closes its session in `finally`: the disconnect cancels it.
        head = start_then_hang_up(running.host, running.port, "/stream/closing", read_body=True)
        assert head.startswith(b"HTTP/1.1 200")
        assert served.finished["closing"].wait(5)
        assert served.chunks_sent["closing"] < STREAM_CHUNKS, "the stream was not cut short"
        running.wait_idle()
        assert route_counts(registry, "/stream/closing", "GET") == expected_counts(1, 1, close=1)
        assert used() == 0

        # The same, but the app keeps the session and never closes it: one leak, at request end.
        head = start_then_hang_up(running.host, running.port, "/stream/leaky", read_body=True)
        assert head.startswith(b"HTTP/1.1 200")
        assert served.finished["leaky"].wait(5)
        assert served.chunks_sent["leaky"] < STREAM_CHUNKS, "the stream was not cut short"
        running.wait_idle()
        assert route_counts(registry, "/stream/leaky", "GET") == expected_counts(
            1, 0, 1, leaked_request_end=1
        )
        assert used() == 1

        # A sync endpoint sleeping with its session: it runs to the end, get_db commits.
        sent = start_then_hang_up(
            running.host, running.port, "/sleepy?seconds=0.5", read_body=False
        )
        assert sent == b"", "the client hung up before any response"
        assert served.finished["sleepy"].wait(5)
        running.wait_idle()
        assert route_counts(registry, "/sleepy", "GET") == expected_counts(1, 1, commit=1)

        # The server keeps serving.
        with httpx.Client(base_url=running.url, timeout=5) as client:
            for _ in range(3):
                assert client.get("/ping").json() == {"count": 0}
        running.wait_idle()
        assert route_counts(registry, "/ping", "GET") == expected_counts(3, 3, commit=3)
        assert_invariants(registry)

        # The leaked session is dropped: the garbage collector closes it, and the leak already
        # reported at request end is not reported again.
        dropped = served.leaks.take()
        assert len(dropped) == 1
        del dropped
        deadline = time.monotonic() + 5
        while not sample(
            registry, "sqlalchemy_sessions_closed_total", route="/stream/leaky", method="GET"
        ):
            gc.collect()
            assert time.monotonic() < deadline, "the dropped session was never collected"
            time.sleep(0.01)
        assert route_counts(registry, "/stream/leaky", "GET") == expected_counts(
            1, 1, leaked_request_end=1, close=1
        )

    assert used() == 0
    assert total(registry, "sqlalchemy_sessions_active") == 0
    assert total(registry, "sqlalchemy_sessions_leaked_total") == 1
    assert_invariants(registry)
