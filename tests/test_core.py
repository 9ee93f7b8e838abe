"""Ground truth through the ASGI app: every counter equals what the requests really did."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from _apps import build_app, dependencies_exit_before_streaming
from conftest import sample, total
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from session_monitor import NO_REQUEST, UNMATCHED_ROUTE, SessionMonitor

pytestmark = pytest.mark.anyio


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def route_count(registry: CollectorRegistry, name: str, route: str, **labels: str) -> float:
    return total(registry, name, route=route, **labels)


def assert_balanced(registry: CollectorRegistry) -> None:
    opened = total(registry, "sqlalchemy_sessions_opened_total")
    closed = total(registry, "sqlalchemy_sessions_closed_total")
    active = total(registry, "sqlalchemy_sessions_active")
    assert opened == closed + active
    checkouts = total(registry, "db_client_connection_wait_time_seconds_count")
    checkins = total(registry, "db_client_connection_use_time_seconds_count")
    used = total(registry, "db_client_connection_count", db_client_connection_state="used")
    assert checkouts == checkins + used
    for metric in registry.collect():
        if metric.type == "gauge":
            for s in metric.samples:
                assert s.value >= 0, s


@pytest.fixture
def engine(make_engine: Callable[..., Engine], sqlite_url: str) -> Engine:
    return make_engine(sqlite_url, pool_size=5, max_overflow=5)


@pytest.fixture
def monitored(
    engine: Engine, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> tuple[Any, list[Session], SessionMonitor]:
    built = build_app(engine)
    monitor = make_monitor(engine, registry=registry)
    monitor.instrument_app(built.app)
    return built.app, built.leaked, monitor


async def test_get_db_requests_counted_exactly(
    monitored: tuple[Any, list[Session], SessionMonitor], registry: CollectorRegistry
) -> None:
    app, _, _ = monitored
    async with client(app) as http:
        for n in range(5):
            assert (await http.post("/items", params={"name": f"item-{n}"})).status_code == 200
        for n in range(1, 6):
            assert (await http.get(f"/items/{n}")).status_code == 200
        assert (await http.get("/items/999")).status_code == 404
        for n in range(3):
            assert (await http.post("/items/fail", params={"name": f"x{n}"})).status_code == 409

    post, get, fail = "/items", "/items/{item_id}", "/items/fail"
    assert sample(registry, "sqlalchemy_sessions_opened_total", route=post, method="POST") == 5
    assert sample(registry, "sqlalchemy_sessions_closed_total", route=post, method="POST") == 5
    assert sample(registry, "sqlalchemy_sessions_opened_total", route=get, method="GET") == 6
    assert sample(registry, "sqlalchemy_sessions_opened_total", route=fail, method="POST") == 3
    assert total(registry, "sqlalchemy_sessions_active") == 0
    # POST: commit in the endpoint, then refresh() opens a second transaction that get_db commits.
    assert route_count(registry, "sqlalchemy_transactions_total", post, outcome="commit") == 10
    # GET: get_db commits the read; the 404 raises an HTTPException, so get_db rolls back.
    assert route_count(registry, "sqlalchemy_transactions_total", get, outcome="commit") == 5
    assert route_count(registry, "sqlalchemy_transactions_total", get, outcome="rollback") == 1
    assert route_count(registry, "sqlalchemy_transactions_total", fail, outcome="rollback") == 3
    assert total(registry, "sqlalchemy_transactions_total", outcome="close") == 0
    assert total(registry, "sqlalchemy_sessions_leaked_total") == 0
    assert (
        sample(registry, "sqlalchemy_session_duration_seconds_count", route=get, method="GET") == 6
    )
    assert total(registry, "db_client_connection_wait_time_seconds_count") == 19
    assert_balanced(registry)


async def test_every_way_of_making_a_session_is_tracked(
    monitored: tuple[Any, list[Session], SessionMonitor], registry: CollectorRegistry
) -> None:
    app, _, _ = monitored
    async with client(app) as http:
        for path in ("/plain", "/async-dep", "/core", "/async-items/1", "/stream", "/background"):
            response = await http.get(path)
            assert response.status_code == 200, (path, response.text)
        assert (await http.post("/core/commit")).status_code == 200
        assert (await http.get("/nothing")).status_code == 200

    for route in ("/plain", "/async-dep", "/core", "/async-items/{item_id}", "/stream"):
        assert sample(registry, "sqlalchemy_sessions_opened_total", route=route, method="GET") == 1
        if route == "/stream":
            gc.collect()  # where get_db closed before the body ran, the body's session is dropped
        assert sample(registry, "sqlalchemy_sessions_closed_total", route=route, method="GET") == 1
    # The background task's session belongs to the request that queued it.
    assert route_count(registry, "sqlalchemy_sessions_opened_total", "/background") == 1
    assert (
        route_count(registry, "sqlalchemy_transactions_total", "/background", outcome="commit") == 1
    )
    # A session that never touches the database is not a session the monitor can see.
    assert route_count(registry, "sqlalchemy_sessions_opened_total", "/nothing") == 0
    # `with Session(engine)` and get_db's bare close(): ended by close, the normal read path.
    assert route_count(registry, "sqlalchemy_transactions_total", "/plain", outcome="close") == 1
    assert route_count(registry, "sqlalchemy_transactions_total", "/core", outcome="close") == 1
    assert (
        route_count(registry, "sqlalchemy_transactions_total", "/core/commit", outcome="commit")
        == 1
    )
    assert total(registry, "sqlalchemy_transactions_total", outcome="rollback") == 0
    if dependencies_exit_before_streaming():
        # Some FastAPI releases (0.110, the oldest supported, among them) end a yield
        # dependency before the response body runs: get_db has committed and closed an untouched
        # session, the body opens it again, and nothing closes it. A real leak on those.
        assert route_count(registry, "sqlalchemy_transactions_total", "/stream", outcome="close") == 1
        assert sample(registry, "sqlalchemy_sessions_leaked_total", route="/stream", method="GET", reason="request_end") == 1
        assert total(registry, "sqlalchemy_sessions_leaked_total") == 1
    else:
        assert route_count(registry, "sqlalchemy_transactions_total", "/stream", outcome="commit") == 1
        assert total(registry, "sqlalchemy_sessions_leaked_total") == 0
    assert_balanced(registry)



async def test_request_end_leaks_counted_once_and_logged_with_location(
    monitored: tuple[Any, list[Session], SessionMonitor],
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, leaked, _ = monitored
    caplog.set_level(logging.WARNING, logger="session_monitor")
    async with client(app) as http:
        for _ in range(3):
            assert (await http.get("/leak")).status_code == 200
        for _ in range(2):
            assert (await http.get("/leak/core")).status_code == 200
        assert (await http.get("/idle-unclosed")).status_code == 200

    leaks = [r.getMessage() for r in caplog.records if "Leaked session" in r.getMessage()]
    assert len(leaks) == 5
    assert all("request_end" in m and "_apps.py:" in m for m in leaks)
    assert sum("GET /leak: session on pool 'app.db'" in m and " in leak," in m for m in leaks) == 3
    assert sum("GET /leak/core: Core connection" in m and " in leak_core," in m for m in leaks) == 2
    assert (
        sample(
            registry,
            "sqlalchemy_sessions_leaked_total",
            route="/leak",
            method="GET",
            reason="request_end",
        )
        == 3
    )
    assert route_count(registry, "sqlalchemy_sessions_leaked_total", "/leak/core") == 2
    # Still open, so still active: leaking is not closing.
    assert total(registry, "sqlalchemy_sessions_active") == 6
    assert sample(registry, "db_client_connection_count", db_client_connection_pool_name="app.db", db_client_connection_state="used") == 5

    for resource in leaked:
        resource.close()
    leaked.clear()
    gc.collect()
    # Closing later is a close, not a second leak.
    assert total(registry, "sqlalchemy_sessions_leaked_total") == 5
    assert total(registry, "sqlalchemy_sessions_active") == 0
    assert sample(registry, "db_client_connection_count", db_client_connection_pool_name="app.db", db_client_connection_state="used") == 0
    assert_balanced(registry)


async def test_garbage_collected_session_is_a_gc_leak_once(
    monitored: tuple[Any, list[Session], SessionMonitor], registry: CollectorRegistry
) -> None:
    app, leaked, _ = monitored
    async with client(app) as http:
        for _ in range(4):
            assert (await http.get("/gc-leak")).status_code == 200
        assert (await http.get("/leak")).status_code == 200
    leaked.clear()  # the request-end leak is now dropped without close: it must not count twice
    gc.collect()
    gc_leaks = route_count(registry, "sqlalchemy_sessions_leaked_total", "/gc-leak", reason="gc")
    end_leaks = route_count(
        registry, "sqlalchemy_sessions_leaked_total", "/gc-leak", reason="request_end"
    )
    # A dropped session still holding its connection at request end was collected either before
    # the request ended (gc) or after (request_end): either way, once.
    assert gc_leaks + end_leaks == 4
    assert route_count(registry, "sqlalchemy_sessions_leaked_total", "/leak") == 1
    assert total(registry, "sqlalchemy_sessions_active") == 0
    assert total(registry, "sqlalchemy_sessions_closed_total") == 5
    assert sample(registry, "db_client_connection_count", db_client_connection_pool_name="app.db", db_client_connection_state="used") == 0
    assert_balanced(registry)


def test_gc_leak_outside_requests_on_a_sync_engine(
    engine: Engine, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> None:
    make_monitor(engine, registry=registry)
    session = sessionmaker(engine)()
    session.execute(text("SELECT 1"))
    connection = engine.connect()
    connection.execute(text("SELECT 1"))
    del session, connection
    gc.collect()
    assert (
        sample(
            registry,
            "sqlalchemy_sessions_leaked_total",
            route=NO_REQUEST,
            method=NO_REQUEST,
            reason="gc",
        )
        == 2
    )
    assert total(registry, "sqlalchemy_sessions_active") == 0
    assert_balanced(registry)


async def test_session_held_by_a_fixture_is_not_the_requests_leak(
    engine: Engine, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> None:
    from _apps import Item

    built = build_app(engine)
    make_monitor(engine, registry=registry).instrument_app(built.app)
    # The testing pattern: one outer transaction per test, the app's session joined to it.
    connection = engine.connect()
    outer = connection.begin()
    session = Session(bind=connection, join_transaction_mode="create_savepoint")
    session.add(Item(name="from-fixture"))
    session.flush()

    def override() -> Iterator[Session]:
        yield session

    built.app.dependency_overrides[built.get_db] = override
    async with client(built.app) as http:
        assert (await http.get("/items/1")).json() == {"id": 1, "name": "from-fixture"}
    assert total(registry, "sqlalchemy_sessions_leaked_total") == 0
    session.close()
    outer.rollback()
    connection.close()
    assert total(registry, "sqlalchemy_sessions_leaked_total") == 0
    assert total(registry, "sqlalchemy_sessions_active") == 0
    assert_balanced(registry)


async def test_age_leak_reported_once_then_its_return(
    engine: Engine,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="session_monitor")
    app = build_app(engine).app
    monitor = make_monitor(engine, registry=registry, leak_threshold=0.2, capture_stacks=True)
    monitor.instrument_app(app)
    async with client(app) as http:
        assert (await http.get("/hold", params={"seconds": 0.7})).status_code == 200
        assert (await http.get("/hold", params={"seconds": 0.0})).status_code == 200
    assert route_count(registry, "sqlalchemy_sessions_leaked_total", "/hold", reason="age") == 1
    messages = [r.getMessage() for r in caplog.records]
    age = [m for m in messages if "Leaked session (age)" in m]
    assert len(age) == 1
    assert "threshold 0.2s" in age[0] and 'File "' in age[0] and "in hold" in age[0]
    assert sum("came back after" in m for m in messages) == 1
    (came_back,) = [m for m in messages if "came back after" in m]
    assert came_back.endswith("ago.") and ",." not in came_back  # no dangling comma
    assert_balanced(registry)


async def test_pool_exhaustion_counts_timeouts_and_waits(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    from fastapi import Request
    from fastapi.responses import PlainTextResponse
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    engine = make_engine(sqlite_url, pool_size=2, max_overflow=0, pool_timeout=0.5)
    app = build_app(engine).app

    @app.exception_handler(PoolTimeout)
    async def pool_timeout(request: Request, exc: PoolTimeout) -> PlainTextResponse:
        return PlainTextResponse("pool exhausted", status_code=503)

    make_monitor(engine, registry=registry).instrument_app(app)
    async with client(app) as http:
        responses = await asyncio.gather(
            *(http.get("/hold", params={"seconds": 1.2}) for _ in range(6))
        )
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 2 and statuses.count(503) >= 1
    assert set(statuses) <= {200, 503}
    pool = {"db_client_connection_pool_name": "app.db"}
    assert sample(registry, "db_client_connection_timeouts_total", **pool) == statuses.count(503)
    assert sample(registry, "db_client_connection_max", **pool) == 2
    assert sample(registry, "db_client_connection_pending_requests", **pool) == 0
    assert sample(registry, "db_client_connection_count", db_client_connection_state="used", **pool) == 0
    assert sample(registry, "db_client_connection_count", db_client_connection_state="idle", **pool) == 2
    # Every success waited, some for a holder to finish: the slowest wait is well above zero.
    waits = sample(registry, "db_client_connection_wait_time_seconds_sum", **pool)
    assert waits > 0
    # Sessions whose checkout timed out were opened and then closed by get_db.
    assert route_count(registry, "sqlalchemy_sessions_opened_total", "/hold") == 6
    assert route_count(
        registry, "sqlalchemy_transactions_total", "/hold", outcome="commit"
    ) == statuses.count(200)
    assert_balanced(registry)


async def test_random_urls_add_no_label_values(
    engine: Engine, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> None:
    import random
    import string

    app = build_app(engine).app
    SessionLocal = sessionmaker(engine)

    @app.middleware("http")
    async def touch_db(request: Any, call_next: Any) -> Any:
        # An auth-style lookup before routing, on every request, matched or not.
        with SessionLocal() as session:
            session.execute(text("SELECT 1"))
        return await call_next(request)

    make_monitor(engine, registry=registry).instrument_app(app)
    rng = random.Random(7)
    methods = ["GET", "POST", "PURGE", "BREW", "get"]
    async with client(app) as http:
        for _ in range(1000):
            path = "/" + "/".join(
                "".join(
                    rng.choices(string.ascii_letters + string.digits + "%._-", k=rng.randint(1, 12))
                )
                for _ in range(rng.randint(1, 4))
            )
            await http.request(rng.choice(methods), path)
    label_sets = {
        (s.labels["route"], s.labels["method"])
        for metric in registry.collect()
        for s in metric.samples
        if s.name == "sqlalchemy_sessions_opened_total"
    }
    assert label_sets <= {(UNMATCHED_ROUTE, m) for m in ("GET", "POST", "OTHER")}
    assert total(registry, "sqlalchemy_sessions_opened_total") == 1000
    assert_balanced(registry)


async def test_listener_failure_is_counted_and_the_request_succeeds(
    engine: Engine,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from session_monitor.exporters.multiprocess import PrometheusMetrics

    class Broken(PrometheusMetrics):  # an observer with a bug in one event
        def session_opened(self, session: Any) -> None:
            raise RuntimeError("observer bug")

    app = build_app(engine).app
    broken = Broken(registry=None)
    monitor = make_monitor(engine, registry=registry, observers=[broken])
    monitor.instrument_app(app)
    async with client(app) as http:
        for n in range(3):
            assert (await http.post("/items", params={"name": f"n{n}"})).status_code == 200
    assert sample(registry, "session_monitor_internal_errors_total", listener="session_opened") == 3
    assert total(registry, "session_monitor_internal_errors_total") == 3
    failures = [r for r in caplog.records if "listener 'session_opened' failed" in r.getMessage()]
    assert len(failures) == 1  # logged once, counted every time
    # Neither the Prometheus observer nor the monitor's own state suffered.
    assert route_count(registry, "sqlalchemy_sessions_opened_total", "/items") == 3
    assert route_count(registry, "sqlalchemy_transactions_total", "/items", outcome="commit") == 6
    assert_balanced(registry)


async def test_scrape_time_collector_equals_prometheus_client_metrics(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    """The default exporter and the multiprocess one print the same series for the same events."""
    from fastapi import Request
    from fastapi.responses import PlainTextResponse
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    from session_monitor.exporters.multiprocess import PrometheusMetrics

    engine = make_engine(sqlite_url, pool_size=2, max_overflow=0, pool_timeout=0.3)
    test_app = build_app(engine)
    app = test_app.app

    @app.exception_handler(PoolTimeout)
    async def pool_timeout(request: Request, exc: PoolTimeout) -> PlainTextResponse:
        return PlainTextResponse("pool exhausted", status_code=503)

    pushed = CollectorRegistry()
    monitor = make_monitor(engine, registry=registry, observers=[PrometheusMetrics(pushed)])
    monitor.instrument_app(app)
    async with client(app) as http:
        for n in range(3):
            await http.post("/items", params={"name": f"n{n}"})
        await http.post("/items/fail", params={"name": "x"})
        await http.get("/core")
        await http.get("/leak")
        await asyncio.gather(*(http.get("/hold", params={"seconds": 0.5}) for _ in range(4)))
    for session in test_app.leaked:
        session.close()

    def series(source: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for metric in source.collect()
            for s in metric.samples
            # The peak since the previous scrape exists at scrape time only (multiprocess.py).
            if not s.name.endswith("_created") and s.name != "sqlalchemy_pool_used_peak"
        }

    collected, by_client = series(registry), series(pushed)
    assert collected.keys() == by_client.keys()
    for key, value in collected.items():
        assert value == pytest.approx(by_client[key], rel=1e-9, abs=1e-12), key
    assert total(registry, "db_client_connection_timeouts_total") >= 1
    assert total(registry, "sqlalchemy_sessions_leaked_total") == 1


def test_a_checkout_past_the_engine_is_counted_on_neither_side(
    make_engine: Callable[..., Engine],
    make_monitor: Callable[..., SessionMonitor],
    registry: CollectorRegistry,
    sqlite_url: str,
) -> None:
    # Checkouts are counted in the Engine.raw_connection hook (no pool checkout listener):
    # engine.pool.connect() bypasses it, so its checkin must not be counted either, or
    # checkouts = checkins + used would break.
    engine = make_engine(sqlite_url)
    make_monitor(engine, registry=registry)
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    counts = (
        "db_client_connection_wait_time_seconds_count",
        "db_client_connection_use_time_seconds_count",
    )
    before = [total(registry, name) for name in counts]
    assert before == [1, 1]
    direct = engine.pool.connect()
    direct.close()
    assert [total(registry, name) for name in counts] == before
    assert total(registry, "db_client_connection_count", db_client_connection_state="used") == 0
    assert total(registry, "db_client_connection_count", db_client_connection_state="idle") == 1
    assert total(registry, "session_monitor_internal_errors_total") == 0


def test_two_monitors_on_one_engine_each_count_everything(
    engine: Engine, make_monitor: Callable[..., SessionMonitor]
) -> None:
    # Both keep their checkout on the same connection record (a chain) and neither finds its
    # session in the other's acquiring record: each counts every session, checkout, checkin and
    # transaction once, and a raw DBAPI connection as a checkout only.
    registries = [CollectorRegistry(), CollectorRegistry()]
    monitors = [make_monitor(engine, registry=registry) for registry in registries]
    factory = sessionmaker(bind=engine)
    for _ in range(3):
        with factory() as session:
            session.execute(text("select 1"))
            session.commit()
        with engine.connect() as connection:
            connection.execute(text("select 1"))
            connection.rollback()
        engine.raw_connection().close()
    for registry in registries:
        assert_balanced(registry)
        assert total(registry, "sqlalchemy_sessions_opened_total") == 6
        assert total(registry, "sqlalchemy_sessions_closed_total") == 6
        assert total(registry, "db_client_connection_wait_time_seconds_count") == 9
        assert total(registry, "db_client_connection_use_time_seconds_count") == 9
        assert total(registry, "sqlalchemy_transactions_total", outcome="commit") == 3
        assert total(registry, "sqlalchemy_transactions_total", outcome="rollback") == 3
    monitors[0].uninstrument()  # the other goes on counting alone
    with factory() as session:
        session.execute(text("select 1"))
        session.commit()
    assert total(registries[1], "sqlalchemy_sessions_opened_total") == 7
    assert total(registries[1], "sqlalchemy_transactions_total", outcome="commit") == 4
    assert_balanced(registries[1])
