"""The example app: its CRUD works, and each /demo failure moves the metric it is meant to move."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from example_app.app import create_app
from example_app.loadgen import NO_RESPONSE, run_load

pytestmark = pytest.mark.anyio

POOL = "example.db"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def _build(tmp_path: Path, registry: CollectorRegistry, **options: Any) -> FastAPI:
    return create_app(database_url=f"sqlite:///{tmp_path / POOL}", registry=registry, **options)


def _teardown(app: FastAPI) -> None:
    app.state.leaked_sessions.release_all()
    app.state.monitor.uninstrument()
    app.state.database.engine.dispose()


@pytest.fixture
def app(tmp_path: Path, registry: CollectorRegistry) -> Iterator[FastAPI]:
    app = _build(tmp_path, registry)
    yield app
    _teardown(app)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    # ASGITransport sends no lifespan events; run the lifespan (which creates the tables) here.
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://example") as client,
    ):
        yield client


def sample(
    registry: CollectorRegistry, name: str, route: str, method: str = "GET", **labels: str
) -> float:
    value = registry.get_sample_value(name, {"route": route, "method": method, **labels})
    return value or 0.0


def total(registry: CollectorRegistry, name: str) -> float:
    return sum(
        metric_sample.value
        for metric in registry.collect()
        for metric_sample in metric.samples
        if metric_sample.name == name
    )


def pool_sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, {"db_client_connection_pool_name": POOL, **labels}) or 0.0


async def test_items_crud(client: httpx.AsyncClient) -> None:
    assert (await client.get("/items")).json() == []

    created = await client.post("/items", json={"name": "hammer", "description": "heavy"})
    assert created.status_code == 201
    item = created.json()
    assert item == {"id": item["id"], "name": "hammer", "description": "heavy"}

    assert (await client.get(f"/items/{item['id']}")).json() == item
    assert (await client.get("/items")).json() == [item]
    assert (await client.get("/items/999")).status_code == 404
    assert (await client.post("/items", json={"name": ""})).status_code == 422


async def test_item_requests_close_every_session(
    client: httpx.AsyncClient, registry: CollectorRegistry
) -> None:
    ids = [(await client.post("/items", json={"name": f"n{i}"})).json()["id"] for i in range(4)]
    for item_id in [*ids, 999]:
        await client.get(f"/items/{item_id}")
    for _ in range(3):
        await client.get("/items")

    for route, method, requests in [
        ("/items", "POST", 4),
        ("/items/{item_id}", "GET", 5),
        ("/items", "GET", 3),
    ]:
        opened = sample(registry, "sqlalchemy_sessions_opened_total", route, method)
        closed = sample(registry, "sqlalchemy_sessions_closed_total", route, method)
        assert opened == closed == requests, (route, method)
        assert sample(registry, "sqlalchemy_sessions_active", route, method) == 0
        assert (
            sample(
                registry, "sqlalchemy_sessions_leaked_total", route, method, reason="request_end"
            )
            == 0
        )
    assert (
        sample(registry, "sqlalchemy_transactions_total", "/items", "POST", outcome="commit") == 4
    )
    # The 404 raises inside get_db, which rolls back.
    assert (
        sample(registry, "sqlalchemy_transactions_total", "/items/{item_id}", outcome="rollback")
        == 1
    )
    assert pool_sample(registry, "db_client_connection_count", db_client_connection_state="used") == 0


async def test_leak_counts_one_leak_per_call_until_released(
    client: httpx.AsyncClient, registry: CollectorRegistry
) -> None:
    for calls in range(1, 4):
        assert (await client.get("/demo/leak")).json() == {"leaked_sessions": calls}
        leaked = sample(
            registry, "sqlalchemy_sessions_leaked_total", "/demo/leak", reason="request_end"
        )
        assert leaked == calls
    assert sample(registry, "sqlalchemy_sessions_active", "/demo/leak") == 3
    assert pool_sample(registry, "db_client_connection_count", db_client_connection_state="used") == 3

    assert (await client.get("/demo/leak/release")).status_code == 405  # it changes state
    assert (await client.post("/demo/leak/release")).json() == {"released": 3}
    assert sample(registry, "sqlalchemy_sessions_active", "/demo/leak") == 0
    assert sample(registry, "sqlalchemy_sessions_closed_total", "/demo/leak") == 3
    assert pool_sample(registry, "db_client_connection_count", db_client_connection_state="used") == 0
    # Closing late does not take the leak back.
    assert (
        sample(registry, "sqlalchemy_sessions_leaked_total", "/demo/leak", reason="request_end")
        == 3
    )


async def test_leak_on_error_leaks_at_request_end(
    client: httpx.AsyncClient, registry: CollectorRegistry
) -> None:
    response = await client.get("/demo/leak-on-error")

    assert response.status_code == 500
    assert (
        sample(
            registry,
            "sqlalchemy_sessions_leaked_total",
            "/demo/leak-on-error",
            reason="request_end",
        )
        == 1
    )


async def test_gc_leak_is_reported_as_collected(
    client: httpx.AsyncClient, registry: CollectorRegistry
) -> None:
    assert (await client.get("/demo/gc-leak")).status_code == 200

    route = "/demo/gc-leak"
    assert sample(registry, "sqlalchemy_sessions_leaked_total", route, reason="gc") == 1
    assert sample(registry, "sqlalchemy_sessions_leaked_total", route, reason="request_end") == 0
    assert sample(registry, "sqlalchemy_sessions_closed_total", route) == 1
    assert pool_sample(registry, "db_client_connection_count", db_client_connection_state="used") == 0


async def test_rollback_is_counted_and_nothing_is_written(
    client: httpx.AsyncClient, registry: CollectorRegistry
) -> None:
    response = await client.get("/demo/rollback")

    assert response.status_code == 409
    route = "/demo/rollback"
    assert sample(registry, "sqlalchemy_transactions_total", route, outcome="rollback") == 1
    assert sample(registry, "sqlalchemy_transactions_total", route, outcome="commit") == 0
    assert sample(registry, "sqlalchemy_sessions_closed_total", route) == 1
    assert (await client.get("/items")).json() == []


async def test_slow_and_core_close_their_connections(
    client: httpx.AsyncClient, registry: CollectorRegistry
) -> None:
    assert (await client.get("/demo/slow", params={"seconds": 0.05})).status_code == 200
    assert (await client.get("/demo/core")).json() == {"items": 0}

    for route in ("/demo/slow", "/demo/core"):
        assert sample(registry, "sqlalchemy_sessions_opened_total", route) == 1
        assert sample(registry, "sqlalchemy_sessions_closed_total", route) == 1
    assert pool_sample(registry, "db_client_connection_count", db_client_connection_state="used") == 0


async def test_invalidate_is_counted_and_the_pool_reconnects(
    client: httpx.AsyncClient, registry: CollectorRegistry
) -> None:
    assert (await client.get("/demo/invalidate")).status_code == 200
    assert (await client.get("/demo/core")).status_code == 200

    invalidations = "sqlalchemy_pool_invalidations_total"
    assert pool_sample(registry, invalidations, soft="false", reason="explicit") == 1
    assert pool_sample(registry, invalidations, soft="true", reason="explicit") == 0
    # The connection was discarded: the next checkout opened a new one.
    assert pool_sample(registry, "db_client_connection_create_time_seconds_count") == 2
    assert pool_sample(registry, "db_client_connection_count", db_client_connection_state="used") == 0


async def test_hold_burst_exhausts_the_pool_into_503(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    app = _build(tmp_path, registry, pool_size=1, max_overflow=1, pool_timeout=0.2)
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://x") as client,
        ):
            responses = await asyncio.gather(
                *(client.get("/demo/hold", params={"seconds": 1}) for _ in range(3))
            )

        assert sorted(response.status_code for response in responses) == [200, 200, 503]
        assert pool_sample(registry, "db_client_connection_timeouts_total") == 1
    finally:
        # After this the registry holds no session_monitor metric any more.
        _teardown(app)


@pytest.fixture
def server_url(tmp_path: Path, registry: CollectorRegistry) -> Iterator[str]:
    app = _build(tmp_path, registry)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped while starting"
        assert time.monotonic() < deadline, "uvicorn did not start within 10 s"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listener.close()
        _teardown(app)


@pytest.mark.e2e
async def test_loadgen_summary_matches_the_server(
    server_url: str, registry: CollectorRegistry
) -> None:
    opened_before = total(registry, "sqlalchemy_sessions_opened_total")
    summary = await run_load(server_url, requests=120, concurrency=4, seed=7)

    statuses = summary.statuses()
    releases = summary.endpoints.get("POST /demo/leak/release")
    assert summary.requests_sent == sum(statuses.values())
    assert summary.requests_sent - (releases.requests if releases else 0) == 120
    assert NO_RESPONSE not in statuses
    assert not summary.lost_connection
    assert summary.metrics is not None
    # Every 503 is a pool timeout, and every pool timeout a 503.
    assert summary.metrics.connection_timeouts == statuses[503]
    opened = total(registry, "sqlalchemy_sessions_opened_total") - opened_before
    assert summary.metrics.sessions_opened == opened > 0

    def answered(endpoint: str, status: int) -> int:
        stats = summary.endpoints.get(endpoint)
        return stats.statuses[status] if stats else 0

    # Each of these leaked exactly one session; sessions that got 503 may add "gc" leaks later.
    leaks = (
        answered("GET /demo/leak", 200)
        + answered("GET /demo/leak-on-error", 500)
        + answered("GET /demo/gc-leak", 200)
    )
    assert sum(summary.metrics.sessions_leaked.values()) >= leaks > 0
    assert summary.render().splitlines()[0].startswith(f"{summary.requests_sent} requests")


@pytest.mark.e2e
async def test_loadgen_without_failures_leaves_no_session_open(server_url: str) -> None:
    summary = await run_load(server_url, requests=100, concurrency=8, seed=1, failures=False)

    assert summary.requests_sent == sum(summary.statuses().values()) == 100
    assert not any(
        label.startswith("GET /demo/") and label != "GET /demo/core" for label in summary.endpoints
    )
    assert summary.metrics is not None
    assert summary.metrics.sessions_opened == summary.metrics.sessions_closed == 100
    assert summary.metrics.sessions_leaked == {}
    assert summary.metrics.connection_timeouts == 0


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/demo/pitfall/blocking", "blocking_event_loop"),
        ("/demo/pitfall/forgot-commit", "uncommitted_changes"),
        ("/demo/pitfall/nested", "nested_checkout"),
    ],
)
async def test_each_pitfall_demo_is_caught_once_per_request(
    path: str, kind: str, client: httpx.AsyncClient, registry: CollectorRegistry
) -> None:
    for _ in range(2):
        assert (await client.get(path)).status_code == 200
    found = registry.get_sample_value(
        "sqlalchemy_session_pitfalls_total", {"kind": kind, "route": path, "method": "GET"}
    )
    assert found == 2


async def test_the_shared_session_demo_is_caught_from_its_second_request(
    client: httpx.AsyncClient, registry: CollectorRegistry
) -> None:
    for _ in range(3):
        assert (await client.get("/demo/pitfall/shared")).status_code == 200
    labels = {"kind": "shared_session", "route": "/demo/pitfall/shared", "method": "GET"}
    assert registry.get_sample_value("sqlalchemy_session_pitfalls_total", labels) == 2
