"""A forked child (gunicorn --preload, multiprocessing's fork start method) is a new process.

After os.fork() only the thread that forked goes on in the child. Each test forks for real and
the child reports over a pipe; a child that hangs is killed after `CHILD_TIMEOUT` and the test
fails, so a lock left held by a thread of the parent fails here instead of hanging the suite.

What a child reports (docs/counting.md, "A forked child"): every count starts from zero at the fork, as in
a new process and as prometheus_client's multiprocess mode has it; the parent's open sessions,
checked-out connections and waiting callers are the parent's: never closed, leaked nor returned
in the child. Idle connections and bounds are read from the live pools, as always.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _apps import build_app
from conftest import CHILD_TIMEOUT, in_child, total
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import Engine, exc, text
from sqlalchemy.orm import Session
from test_core import assert_balanced, client
from test_pool_identity import SQLITE_POOL, gauges
from test_tracing import otel_series

from session_monitor import SessionMonitor
from session_monitor.hooks import stacks
from session_monitor.hooks import wrappers as _hooks

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="os.fork as gunicorn uses it"),
    # Python 3.12+ warns that forking a process with threads may deadlock the child: the point.
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]



class HeldByAnotherThread:
    """A parent thread that holds `lock` until `release()`: as a thread of the app would, inside
    one of the monitor's locked sections, at the moment another thread forks."""

    def __init__(self, lock: Any) -> None:
        self._lock = lock
        self._held = threading.Event()
        self._release = threading.Event()
        self._thread = threading.Thread(target=self._hold, daemon=True)
        self._thread.start()
        assert self._held.wait(5)

    def _hold(self) -> None:
        with self._lock:
            self._held.set()
            self._release.wait(60)

    def release(self) -> None:
        self._release.set()
        self._thread.join(5)


def counts(registry: CollectorRegistry) -> dict[str, float]:
    return {
        "opened": total(registry, "sqlalchemy_sessions_opened_total"),
        "closed": total(registry, "sqlalchemy_sessions_closed_total"),
        "active": total(registry, "sqlalchemy_sessions_active"),
        "leaked": total(registry, "sqlalchemy_sessions_leaked_total"),
        "checkouts": total(registry, "db_client_connection_wait_time_seconds_count"),
        "checkins": total(registry, "db_client_connection_use_time_seconds_count"),
        "used": total(registry, "db_client_connection_count", db_client_connection_state="used"),
        "transactions": total(registry, "sqlalchemy_transactions_total"),
        "errors": total(registry, "session_monitor_internal_errors_total"),
    }


async def _requests(app: Any) -> list[int]:
    async with client(app) as http:
        created = await http.post("/items", params={"name": f"made in {os.getpid()}"})
        read = await http.get(f"/items/{created.json()['id']}")
        return [created.status_code, read.status_code]


# -- every lock of the monitor, held by another thread at the fork -----------------------------

FRESH_MODULE = '''
from sqlalchemy import text
from sqlalchemy.orm import Session


def use(engine):
    # A file the monitor sees for the first time: where the session opened is worked out anew.
    with Session(engine) as session:
        return session.execute(text("select 1")).scalar_one()
'''


@pytest.fixture
def otel() -> Iterator[tuple[InMemorySpanExporter, InMemoryMetricReader, dict[str, Any]]]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    yield exporter, reader, {"tracer_provider": tracer_provider, "meter_provider": meter_provider}
    tracer_provider.shutdown()
    meter_provider.shutdown()


def _locks(monitor: SessionMonitor, span_of_open_session: Any) -> dict[str, Any]:
    """Every lock of ours a request, a session, a pool timeout, a scrape and uninstrument() take
    (the leak and pitfall detectors share the session tracker's)."""
    return {
        "sessions": monitor._sessions.lock,
        "pool_exhaustion": monitor._pools.exhaustion._lock,
        "internal_errors": monitor._errors_lock,
        "hooks": _hooks._lock,
        "stacks": stacks._lock,
        "session_span": span_of_open_session.lock,
        "pool_engines": monitor._pools._lock,
        "pool_state": monitor._pools.states()[0].lock,
    }


LOCKS = ["sessions", "pool_exhaustion", "internal_errors", "hooks", "stacks", "session_span"]
LOCKS += ["pool_engines", "pool_state", "all"]


@pytest.mark.parametrize("held", LOCKS)
def test_a_lock_held_by_another_thread_at_the_fork_does_not_hang_the_child(
    held: str,
    tmp_path: Path,
    otel: tuple[InMemorySpanExporter, InMemoryMetricReader, dict[str, Any]],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_engine: Callable[..., Engine],
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    engine = make_engine(sqlite_url, pool_size=2, max_overflow=0, pool_timeout=0.2)
    monitor = make_monitor(engine, registry=registry, **otel[2])
    app = build_app(engine).app
    monitor.instrument_app(app)
    (tmp_path / "fresh_fork_module.py").write_text(FRESH_MODULE)
    # The forking thread's own session, open at the fork: the child's copy is the parent's.
    open_session = Session(engine)
    open_session.execute(text("select 1"))
    view = monitor.view_of(open_session)
    assert view is not None
    span = monitor._otel._spans[view.id]  # type: ignore[union-attr]
    locks = _locks(monitor, span)
    holders = [HeldByAnotherThread(lock) for name, lock in locks.items() if held in (name, "all")]

    def child() -> dict[str, Any]:
        engine.dispose(close=False)  # SQLAlchemy's recipe for a forked child
        statuses = asyncio.run(_requests(app))
        sys.path.insert(0, str(tmp_path))
        fresh = importlib.import_module("fresh_fork_module").use(engine)
        with engine.execution_options(logging_token="child").connect() as connection:
            connection.execute(text("select 1"))  # a view new in the child: a new engine entry
        held_two = [engine.connect(), engine.connect()]
        try:
            engine.connect()
            timed_out = False
        except exc.TimeoutError:
            timed_out = True
        for connection in held_two:
            connection.close()
        open_session.close()
        generate_latest(registry)
        numbers = counts(registry)
        monitor.uninstrument()
        return {"statuses": statuses, "fresh": fresh, "timed_out": timed_out, **numbers}

    try:
        numbers = in_child(child)
    finally:
        for holder in holders:
            holder.release()
    assert numbers["statuses"] == [200, 200]
    assert numbers["fresh"] == 1
    assert numbers["timed_out"]
    # The child's own: two requests, the fresh module's session, the view's and the two Core
    # connections; not the parent's open session, whose close there is not the child's.
    assert numbers["opened"] == numbers["closed"] == 6
    assert numbers["active"] == numbers["used"] == numbers["leaked"] == numbers["errors"] == 0
    assert numbers["checkouts"] == numbers["checkins"] > 0
    open_session.close()


# -- the parent's open sessions in the child ---------------------------------------------------


def test_the_parents_open_sessions_are_not_the_childs(
    sqlite_url: str,
    registry: CollectorRegistry,
    make_engine: Callable[..., Engine],
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    engine = make_engine(sqlite_url, pool_size=5, max_overflow=0, pool_timeout=5)
    monitor = make_monitor(engine, registry=registry, leak_threshold=0.3)
    app = build_app(engine).app
    monitor.instrument_app(app)
    asyncio.run(_requests(app))  # the parent's history: two requests, counted there
    # Open at the fork: an ORM session and a Core connection of the forking thread, both in a
    # transaction, and a session another thread holds.
    session = Session(engine)
    session.execute(text("select 1"))
    connection = engine.connect()
    connection.execute(text("select 1"))
    opened, release = threading.Event(), threading.Event()

    def hold() -> None:
        with Session(engine) as held:
            held.execute(text("select 1"))
            opened.set()
            release.wait(30)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert opened.wait(5)
    parent_before = counts(registry)
    assert parent_before["active"] == 3

    def child() -> dict[str, Any]:
        nonlocal session, connection
        at_fork = counts(registry)
        at_fork_gauges = gauges(registry, SQLITE_POOL)
        at_fork_idle = engine.pool.checkedin()  # type: ignore[attr-defined]
        # The child drops its copies unclosed, and the collector reclaims them.
        del session, connection
        gc.collect()
        time.sleep(0.6)  # past leak_threshold: the age watcher has had its look
        after_gc = counts(registry)
        engine.dispose(close=False)
        statuses = asyncio.run(_requests(app))
        gc.collect()
        own = counts(registry)
        live = engine.pool
        return {
            "at_fork": at_fork,
            "at_fork_gauges": at_fork_gauges,
            "at_fork_idle": at_fork_idle,
            "after_gc": after_gc,
            "statuses": statuses,
            "own": own,
            "gauges": gauges(registry, SQLITE_POOL),
            "live": [live.checkedin(), live.checkedout()],  # type: ignore[attr-defined]
            "recent_leaks": len(monitor.recent_leaks()),
            "holders": len(monitor.holders()),
            "tracked_sessions": monitor.tracked_sessions,
        }

    try:
        numbers = in_child(child)
        parent_after = counts(registry)
    finally:
        release.set()
        holder.join(5)

    zero = dict.fromkeys(parent_before, 0.0)
    # At the fork the child has counted nothing: the parent's history and its open sessions
    # are the parent's. Its idle connections are its pool's own, read from the pool.
    assert numbers["at_fork"] == zero
    assert numbers["at_fork_gauges"] == [numbers["at_fork_idle"], 0]
    # Dropping the parent's session and connection in the child is no leak (gc or age), and
    # closes nothing of the child's.
    assert numbers["after_gc"] == zero
    assert numbers["recent_leaks"] == numbers["holders"] == numbers["tracked_sessions"] == 0
    # Then its own requests, exactly.
    assert numbers["statuses"] == [200, 200]
    own = numbers["own"]
    assert own["opened"] == own["closed"] == 2
    assert own["checkouts"] == own["checkins"] > 0
    assert own["active"] == own["used"] == own["leaked"] == own["errors"] == 0
    assert numbers["gauges"] == numbers["live"]
    # The parent's numbers are its own, untouched by the child (its age watcher may have
    # reported the connections held meanwhile: that is the parent's).
    unchanged = ("opened", "closed", "active", "checkouts", "checkins", "used", "errors")
    assert {k: parent_after[k] for k in unchanged} == {k: parent_before[k] for k in unchanged}
    session.close()
    connection.close()
    assert_balanced(registry)


# -- OpenTelemetry in the child ------------------------------------------------------------------


def test_opentelemetry_in_the_child_shows_the_childs_pool_and_not_the_parents_spans(
    otel: tuple[InMemorySpanExporter, InMemoryMetricReader, dict[str, Any]],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_engine: Callable[..., Engine],
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    """With the SDK configured in the parent, fork copies its sums: the pool's sizes are
    published again in the child, and a session of the parent's never ends a span there."""
    exporter, reader, providers = otel
    engine = make_engine(sqlite_url, pool_size=5, max_overflow=0, pool_timeout=5)
    make_monitor(engine, registry=registry, **providers)
    for connection in [engine.connect() for _ in range(3)]:
        connection.execute(text("select 1"))
        connection.close()
    session = Session(engine)
    session.execute(text("select 1"))  # used at the fork, by the parent

    def otel_gauges() -> list[float]:
        series = otel_series(reader, "db.client.connection.count", "value")
        return [
            sum(v for k, v in series.items() if ("db.client.connection.state", state) in k)
            for state in ("idle", "used")
        ]

    assert otel_gauges() == list(gauges(registry, SQLITE_POOL)) == [2, 1]

    def child() -> dict[str, Any]:
        deadline = time.monotonic() + 3
        while otel_gauges() != list(gauges(registry, SQLITE_POOL)):
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        published = otel_gauges()
        idle = engine.pool.checkedin()  # type: ignore[attr-defined]
        exporter.clear()  # the parent's exported spans, copied
        session.close()  # the parent's session: its span is the parent's to end
        with Session(engine) as own:
            own.execute(text("select 1"))
        return {
            "published": published,
            "idle": idle,
            "spans": [s.name for s in exporter.get_finished_spans()],
        }

    numbers = in_child(child)
    # What the child's scrape shows, the parent's checkout not among them.
    assert numbers["published"] == [numbers["idle"], 0]
    assert numbers["spans"] == ["db.session"]  # its own session's only
    session.close()
    assert otel_gauges() == [3, 0]


# -- multiprocessing's fork start method -------------------------------------------------------


def _worker(engine: Engine, registry: CollectorRegistry, report: Any) -> None:
    engine.dispose(close=False)
    with Session(engine) as session:
        session.execute(text("select 1"))
    report.send(counts(registry))


def test_a_multiprocessing_worker_forked_while_a_thread_holds_a_lock(
    sqlite_url: str,
    registry: CollectorRegistry,
    make_engine: Callable[..., Engine],
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    engine = make_engine(sqlite_url, pool_size=2, max_overflow=0)
    monitor = make_monitor(engine, registry=registry)
    with Session(engine) as session:
        session.execute(text("select 1"))
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    holder = HeldByAnotherThread(monitor._sessions.lock)
    try:
        worker = context.Process(target=_worker, args=(engine, registry, send))
        worker.start()
        worker.join(CHILD_TIMEOUT)
        if worker.is_alive():
            worker.kill()
            worker.join()
            pytest.fail(f"the worker did not finish within {CHILD_TIMEOUT:g}s: it hangs")
    finally:
        holder.release()
    assert worker.exitcode == 0
    numbers = receive.recv()
    assert numbers["opened"] == numbers["closed"] == 1  # its own session, not the parent's
    assert numbers["active"] == numbers["leaked"] == numbers["errors"] == 0
