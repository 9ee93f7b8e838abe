"""The database's view on a real PostgreSQL: holders joined with pg_stat_activity (running, lock
wait and behind whom, idle in transaction), the pool-timeout report, failures that leave the rest
of the report, tagging, and connections the pool lost."""

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
from _apps import closing_get_db
from conftest import line_of, total
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.orm import Session, sessionmaker

from session_monitor import SessionMonitor
from session_monitor.findings.server_holders import IDLE_IN_TRANSACTION, LOCK_WAIT, RUNNING

pytestmark = pytest.mark.postgres
HERE = Path(__file__)
WAITERS = 10


def _admin(postgres_url: str) -> Any:
    import psycopg

    url = make_url(postgres_url).set(drivername="postgresql")
    return psycopg.connect(url.render_as_string(False), autocommit=True)


@pytest.fixture
def locked_row(postgres_url: str) -> Iterator[str]:
    """A table of its own with one row that the tests fight over."""
    table = f"sm_lock_{uuid.uuid4().hex[:10]}"
    with _admin(postgres_url) as admin:
        admin.execute(f"create table {table} (id int primary key, n int not null)")
        admin.execute(f"insert into {table} values (1, 0)")
    yield table
    with _admin(postgres_url) as admin:
        admin.execute(f"drop table if exists {table}")


@contextlib.contextmanager
def login_role(postgres_url: str, *, limit: int = -1, tables: tuple[str, ...] = ()) -> Iterator[str]:
    """A login role of its own (with a CONNECTION LIMIT, rights on `tables`), dropped after:
    yields the URL that connects as it."""
    role = f"sm_role_{uuid.uuid4().hex[:8]}"
    with _admin(postgres_url) as admin:
        admin.execute(f"create role {role} login connection limit {int(limit)}")
        for table in tables:
            admin.execute(f"grant all on {table} to {role}")
    try:
        yield make_url(postgres_url).set(username=role, password=None).render_as_string(False)
    finally:
        with _admin(postgres_url) as admin:
            admin.execute(f"drop owned by {role}")
            admin.execute(f"drop role if exists {role}")


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def build_app(engine: Engine, table: str, release: threading.Event) -> FastAPI:
    app = FastAPI()
    get_db = closing_get_db(sessionmaker(engine))

    @app.get("/reports/{report_id}")
    def report(report_id: int, db: Annotated[Session, Depends(get_db)]) -> dict[str, int]:
        db.execute(text(f"select n from {table} where id = 1 for update"))  # report-locks
        release.wait(30)  # its transaction stays open, idle, holding the row
        db.commit()
        return {"id": report_id}

    @app.post("/orders")
    def order(db: Annotated[Session, Depends(get_db)]) -> dict[str, bool]:
        db.execute(text(f"update {table} set n = n + 1 where id = 1"))  # order-waits
        db.commit()
        return {"ok": True}

    @app.get("/slow")
    def slow(db: Annotated[Session, Depends(get_db)]) -> dict[str, bool]:
        db.execute(text("select pg_sleep(3)"))  # slow-runs
        return {"ok": True}

    @app.get("/ping")
    def ping(db: Annotated[Session, Depends(get_db)]) -> dict[str, bool]:
        db.execute(text("select 1"))
        return {"ok": True}

    return app


def _exhausted(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if "The server's view" in r.getMessage()
    ]


def test_a_row_lock_held_idle_in_transaction_names_its_holder_for_every_waiter(
    postgres_url: str,
    locked_row: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    size = WAITERS + 1
    engine = create_engine(postgres_url, pool_size=size, max_overflow=0, pool_timeout=1)
    monitor = make_monitor(
        engine, registry=registry, server_view_interval=0.01, tracer_provider=provider
    )
    release = threading.Event()
    app = build_app(engine, locked_row, release)
    monitor.instrument_app(app)
    client = TestClient(app, raise_server_exceptions=False)
    threads = [threading.Thread(target=client.get, args=("/reports/7",))]
    threads += [threading.Thread(target=client.post, args=("/orders",)) for _ in range(WAITERS)]
    try:
        with caplog.at_level(logging.WARNING, logger="session_monitor"):
            threads[0].start()
            wait_until(lambda: monitor.tracked_checkouts == 1)
            for thread in threads[1:]:
                thread.start()
            wait_until(
                lambda: sum(
                    h.server is not None and h.server.status == LOCK_WAIT
                    for h in monitor.holders(server_view=True)
                )
                == WAITERS
            )
            assert client.get("/ping").status_code == 500  # the pool times out
            wait_until(lambda: bool(_exhausted(caplog)))
            holders = monitor.holders(server_view=True)
            report = monitor.database_report()
    finally:
        release.set()
        for thread in threads:
            if thread.ident is not None:
                thread.join(30)
        engine.dispose()

    (message,) = _exhausted(caplog)
    locker = f"{HERE}:{line_of(HERE, 'report-locks')}"
    waiter = f"{HERE}:{line_of(HERE, 'order-waits')}"
    (lock_holder,) = [h for h in holders if h.route == "/reports/{report_id}"]
    assert lock_holder.server is not None and lock_holder.server.status == IDLE_IN_TRANSACTION
    blocker = f"held by backend {lock_holder.backend_pid} = GET /reports/{{report_id}} opened at"
    assert f"{WAITERS} of {size} held by POST /orders, opened at" in message
    assert waiter in message and locker in message
    assert blocker in message and "idle in transaction for" in message
    waiting = [h for h in holders if h.route == "/orders"]
    assert len(waiting) == WAITERS
    for holder in waiting:
        # Directly behind the holder, or queued behind the first waiter: the head is the same.
        assert holder.server is not None and holder.server.status == LOCK_WAIT
        head = holder.server.root
        assert head is not None and head.pid == lock_holder.backend_pid
        assert head.holder is not None and head.holder.route == "/reports/{report_id}"
    assert sum(h.server.blockers[0].pid == lock_holder.backend_pid for h in waiting if h.server) >= 1
    assert len({h.backend_pid for h in holders}) == size  # each its own backend, all known
    (pool,) = report
    assert pool["available"] and pool["error"] is None
    assert any(line.startswith(f"{WAITERS} of {size} held by POST /orders") for line in pool["holders"])
    assert any("too small" in verdict for verdict in pool["advice"])  # a checkout timed out
    assert total(registry, "session_monitor_server_view_failures_total") == 0
    # OpenTelemetry: one span for the timeout's reading, an event per holder, in the
    # PostgreSQL receiver's attribute names.
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "session_monitor.server_view"]
    events = {e.attributes["postgresql.pid"]: e.attributes for e in span.events}  # type: ignore[index]
    assert len(events) == size
    held = events[lock_holder.backend_pid]
    assert held["postgresql.state"] == "idle in transaction"
    assert held["http.route"] == "/reports/{report_id}"
    for holder in waiting:
        assert events[holder.backend_pid]["postgresql.wait_event_type"] == "Lock"
        assert events[holder.backend_pid]["postgresql.blocking.pids"]


def test_a_blocker_outside_the_process_is_named_as_such(
    postgres_url: str,
    locked_row: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    engine = create_engine(postgres_url, pool_size=3, max_overflow=0)
    monitor = make_monitor(
        engine,
        registry=registry,
        server_view_interval=0.01,
        diagnostics_path="/_sm",
        diagnostics_token="a-token-of-16-characters",
    )
    release = threading.Event()
    app = build_app(engine, locked_row, release)
    monitor.instrument_app(app)
    client = TestClient(app)
    import psycopg

    url = make_url(postgres_url).set(drivername="postgresql")
    outsider = psycopg.connect(url.render_as_string(False), application_name="psql")
    outsider.execute(f"select n from {locked_row} where id = 1 for update")
    outsider_pid = outsider.info.backend_pid
    threads = [threading.Thread(target=client.post, args=("/orders",)) for _ in range(2)]
    threads.append(threading.Thread(target=client.get, args=("/slow",)))
    try:
        for thread in threads:
            thread.start()
        wait_until(lambda: monitor.tracked_checkouts == 3)
        wait_until(
            lambda: sum(
                h.server is not None and h.server.status in (LOCK_WAIT, RUNNING)
                for h in monitor.holders(server_view=True)
            )
            == 3
        )
        holders = monitor.holders(server_view=True)
        (pool,) = monitor.database_report()
        answer = client.get("/_sm/json", headers={"X-Session-Monitor-Token": "a-token-of-16-characters"})
        (page,) = answer.json()["database"]  # the diagnostics page's section
    finally:
        outsider.rollback()
        outsider.close()
        for thread in threads:
            if thread.ident is not None:
                thread.join(30)
        engine.dispose()
    orders = [h for h in holders if h.route == "/orders"]
    (slow,) = [h for h in holders if h.route == "/slow"]
    assert slow.server is not None and slow.server.status == RUNNING  # not a lock wait
    assert slow.server.backend is not None and slow.server.backend.query == "select pg_sleep(?)"
    for holder in orders:
        assert holder.server is not None and holder.server.status == LOCK_WAIT
        head = holder.server.root
        assert head is not None and head.pid == outsider_pid and head.holder is None
    lines = "\n".join(pool["holders"])
    assert f"held by backend {outsider_pid} outside this process (application_name 'psql'), idle in transaction for" in lines
    assert "1 of 3 held by GET /slow" in lines and "running a statement" in lines
    assert page["pool_name"] == pool["pool_name"] and page["available"] and page["error"] is None
    assert any(f"held by backend {outsider_pid} outside this process" in line for line in page["holders"])


@pytest.mark.anyio
async def test_asyncpg_holders_are_joined_and_the_report_comes_off_the_event_loop(
    postgres_url: str,
    locked_row: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
    caplog: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("asyncpg")
    import httpx
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

    url = make_url(postgres_url).set(drivername="postgresql+asyncpg")
    engine = create_async_engine(url, pool_size=3, max_overflow=0, pool_timeout=1)
    monitor = make_monitor(engine, registry=registry, server_view_interval=0.01)
    factory = async_sessionmaker(engine)
    release = asyncio.Event()
    app = FastAPI()

    async def get_db() -> Any:
        async with factory() as db:
            yield db

    @app.get("/reports/{report_id}")
    async def report(report_id: int, db: Annotated[AsyncSession, Depends(get_db)]) -> dict[str, int]:
        await db.execute(text(f"select n from {locked_row} where id = 1 for update"))  # a-locks
        await release.wait()
        await db.commit()
        return {"id": report_id}

    @app.post("/orders")
    async def order(db: Annotated[AsyncSession, Depends(get_db)]) -> dict[str, bool]:
        await db.execute(text(f"update {locked_row} set n = n + 1 where id = 1"))  # a-waits
        await db.commit()
        return {"ok": True}

    monitor.instrument_app(app)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        tasks = [asyncio.create_task(client.get("/reports/3"))]
        for _ in range(500):
            if monitor.tracked_checkouts:
                break
            await asyncio.sleep(0.02)
        tasks += [asyncio.create_task(client.post("/orders")) for _ in range(2)]
        with caplog.at_level(logging.WARNING, logger="session_monitor"):
            for _ in range(300):
                holders = await asyncio.to_thread(monitor.holders, server_view=True)
                if sum(h.server is not None and h.server.status == LOCK_WAIT for h in holders) == 2:
                    break
                await asyncio.sleep(0.05)
            with pytest.raises(RuntimeError, match="off the event loop"):
                monitor.holders(server_view=True)
            # A fourth request waits 1 s and times out; the report is read on its own thread.
            async with factory() as extra:
                with pytest.raises(Exception, match="QueuePool limit"):
                    await extra.execute(text("select 1"))
            for _ in range(300):
                if _exhausted(caplog):
                    break
                await asyncio.sleep(0.05)
        release.set()
        await asyncio.gather(*tasks)
    await engine.dispose()
    (lock_holder,) = [h for h in holders if h.route == "/reports/{report_id}"]
    assert lock_holder.server is not None and lock_holder.server.status == IDLE_IN_TRANSACTION
    for holder in [h for h in holders if h.route == "/orders"]:
        assert holder.server is not None and holder.server.status == LOCK_WAIT
        head = holder.server.root
        assert head is not None and head.holder is not None
        assert head.holder.route == "/reports/{report_id}"
    (message,) = _exhausted(caplog)
    assert (
        f"2 of 3 held by POST /orders, opened at {HERE}:{line_of(HERE, 'a-waits')} in order, "
        "are waiting on a lock held by backend"
    ) in message
    assert f"opened at {HERE}:{line_of(HERE, 'a-locks')} in report, idle in transaction for" in message


def test_a_server_without_a_free_slot_leaves_the_rest_of_the_report(
    postgres_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with login_role(postgres_url, limit=2) as url:
        engine = create_engine(url, pool_size=2, max_overflow=0, pool_timeout=0.5)
        try:
            with caplog.at_level(logging.INFO, logger="session_monitor"):
                monitor = make_monitor(engine, registry=registry)
                with engine.connect() as first:  # held-first
                    first.execute(text("select 1"))
                    # The startup check found the role's limit: 2 allowed, 2 may be opened.
                    wait_until(lambda: any("fits" in r.getMessage() for r in caplog.records))
                    with engine.connect() as second:
                        second.execute(text("select 1"))
                        with pytest.raises(Exception, match="QueuePool limit"):
                            engine.connect()
                        wait_until(lambda: bool(_exhausted(caplog)))
                        (pool,) = monitor.database_report()
        finally:
            engine.dispose()
        role = make_url(url).username
    (message,) = _exhausted(caplog)
    assert f"opened at {HERE}:{line_of(HERE, 'held-first')}" in message  # the app side
    assert "unavailable: no free connection slot at the server" in message
    server_part = message.split("The server's view:")[1]
    assert role and role not in server_part and "127.0.0.1" not in server_part  # not the driver's words
    assert pool["error"].startswith("no free connection slot")
    # One read failed: the report reused it (a server with no free slot is not asked again
    # within server_view_interval).
    assert total(registry, "session_monitor_server_view_failures_total", reason="connect") == 1
    assert total(registry, "session_monitor_server_connections_allowed") == 2


def test_sqlite_says_the_server_view_is_unavailable_and_changes_nothing_else(
    sqlite_url: str, make_engine: Callable[..., Engine], make_monitor: Callable[..., SessionMonitor]
) -> None:
    engine = make_engine(sqlite_url)
    monitor = make_monitor(engine, registry=CollectorRegistry())
    with engine.connect() as connection:
        connection.execute(text("select 1"))
        (holder,) = monitor.holders(server_view=True)
        assert holder.server is None and holder.backend_pid is None
        (pool,) = monitor.database_report()
    assert pool["available"] is False
    assert pool["error"] == "available for PostgreSQL only; this pool's database is sqlite"


def test_tagged_connections_carry_the_process_name_and_the_apps_own_name_is_kept(
    postgres_url: str, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> None:
    tagged = create_engine(postgres_url)
    own = create_engine(make_url(postgres_url).update_query_dict({"application_name": "mine"}))
    make_monitor(tagged, own, registry=registry, application_name="orders")
    try:
        with tagged.connect() as connection:
            name = connection.exec_driver_sql("show application_name").scalar_one()
        with own.connect() as connection:
            kept = connection.exec_driver_sql("show application_name").scalar_one()
    finally:
        tagged.dispose()
        own.dispose()
    assert name == f"orders:{socket.gethostname()}:{os.getpid()}"[-63:]
    assert kept == "mine"


@pytest.mark.anyio
async def test_asyncpg_connections_are_tagged_through_server_settings(
    postgres_url: str, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> None:
    pytest.importorskip("asyncpg")
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(make_url(postgres_url).set(drivername="postgresql+asyncpg"))
    make_monitor(engine, registry=registry, application_name="orders")
    try:
        async with engine.connect() as connection:
            name = (await connection.exec_driver_sql("show application_name")).scalar_one()
    finally:
        await engine.dispose()
    assert name == f"orders:{socket.gethostname()}:{os.getpid()}"[-63:]


def test_connections_the_pool_lost_are_listed(
    postgres_url: str, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> None:
    # reset_on_return=None: a raw connection goes back with its transaction still open.
    engine = create_engine(postgres_url, pool_size=2, pool_reset_on_return=None)
    monitor = make_monitor(engine, registry=registry, application_name="lost-test")
    try:
        detached = engine.connect()
        detached_pid = detached.exec_driver_sql("select pg_backend_pid()").scalar_one()
        detached.detach()  # the pool forgets it; its backend stays
        (pool,) = monitor.database_report()
        assert any(f"backend {detached_pid}: opened by this process" in line for line in pool["lost"])
        raw = engine.raw_connection()
        cursor = raw.cursor()
        cursor.execute("select pg_backend_pid()")
        (idle_pid,) = cursor.fetchone()  # type: ignore[misc]
        cursor.close()
        raw.close()  # checked in, its transaction open at the server
        (pool,) = monitor.database_report()
        detached.close()
    finally:
        engine.dispose()
    lost = "\n".join(pool["lost"])
    assert f"backend {detached_pid}: opened by this process, known to no live pool" in lost
    assert f"backend {idle_pid}: idle in the pool, but idle in transaction for" in lost
    assert len(pool["lost"]) == 2, pool["lost"]


def test_a_role_without_pg_read_all_stats_still_classifies_its_own_holders(
    postgres_url: str,
    locked_row: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    with login_role(postgres_url, tables=(locked_row,)) as url:
        engine = create_engine(url, pool_size=2)
        monitor = make_monitor(engine, registry=registry, server_view_interval=0.01)
        outsider = _admin(postgres_url)  # a superuser's session: hidden from the role
        outsider.autocommit = False
        outsider.execute(f"select n from {locked_row} where id = 1 for update")

        def order() -> None:
            with Session(engine) as db:
                db.execute(text(f"update {locked_row} set n = n + 1 where id = 1"))
                db.commit()

        waiter = threading.Thread(target=order)
        try:
            waiter.start()
            wait_until(
                lambda: any(
                    h.server is not None and h.server.status == LOCK_WAIT
                    for h in monitor.holders(server_view=True)
                )
            )
            (holder,) = monitor.holders(server_view=True)
            (pool,) = monitor.database_report()
        finally:
            outsider.rollback()
            outsider.close()
            waiter.join(30)
            engine.dispose()
    assert holder.server is not None and holder.server.root is not None
    assert holder.server.root.backend is not None and holder.server.root.backend.state is None
    assert "state not visible to this role" in "\n".join(pool["holders"])
    assert total(registry, "session_monitor_server_view_failures_total") == 0


def _timeout_report(engine: Engine, caplog: pytest.LogCaptureFixture) -> str:
    """Hold the pool's one connection, time out a second checkout, return the WARNING."""
    with (
        caplog.at_level(logging.WARNING, logger="session_monitor"),
        engine.connect() as held,  # held-here
    ):
        held.execute(text("select 1"))
        with pytest.raises(Exception, match="QueuePool limit"):
            engine.connect()
        wait_until(lambda: bool(_exhausted(caplog)))
    (message,) = _exhausted(caplog)
    assert f"opened at {HERE}:{line_of(HERE, 'held-here')}" in message  # the app side, as ever
    return message.split("The server's view:")[1]


def test_a_driver_without_backend_pids_says_so(
    postgres_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
    caplog: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("pg8000")
    url = make_url(postgres_url).set(drivername="postgresql+pg8000")
    engine = create_engine(url, pool_size=1, max_overflow=0, pool_timeout=0.3)
    make_monitor(engine, registry=registry)
    try:
        server_part = _timeout_report(engine, caplog)
    finally:
        engine.dispose()
    assert "1 of 1 held by outside any request" in server_part
    assert "of unknown backend: the driver gave no backend PID" in server_part
    assert total(registry, "session_monitor_server_view_failures_total") == 0


@pytest.fixture
def pgbouncer(postgres_url: str) -> Iterator[str]:
    """A PgBouncer in session mode in front of the test server, on a port of its own."""
    import pwd
    import shutil
    import subprocess
    import tempfile

    executable = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.path.exists(executable):
        pytest.skip("pgbouncer is not installed (Debian package pgbouncer; .ci/run installs it)")
    server = make_url(postgres_url)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # PgBouncer refuses to run as root: it runs as the server's own user, in a folder it owns
    # (pytest's own temporary folders are closed to other users).
    folder = Path(tempfile.mkdtemp(prefix="session-monitor-pgbouncer-"))
    user = pwd.getpwnam("postgres")
    folder.chmod(0o755)
    (folder / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={server.host or '127.0.0.1'} port={server.port or 5432} "
        f"user={server.username or 'postgres'}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = any\npool_mode = session\n"
        f"unix_socket_dir = {folder}\nlogfile = {folder}/pgbouncer.log\n"
        "ignore_startup_parameters = extra_float_digits,options\n"
    )
    os.chown(folder, user.pw_uid, user.pw_gid)
    process = subprocess.Popen(
        [executable, "-u", "postgres", str(folder / "pgbouncer.ini")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail(f"pgbouncer did not start: {(folder / 'pgbouncer.log').read_text()}")
                time.sleep(0.1)
        yield server.set(host="127.0.0.1", port=port).render_as_string(False)
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def test_pgbouncer_in_front_is_said_and_the_rest_of_the_report_stands(
    pgbouncer: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = create_engine(pgbouncer, pool_size=1, max_overflow=0, pool_timeout=0.3)
    make_monitor(engine, registry=registry)
    try:
        server_part = _timeout_report(engine, caplog)
    finally:
        engine.dispose()
    # The driver has no PID of the server's: PgBouncer hands it 0, or a key of its own that the
    # server does not know (which one depends on the moment). Either way the report says why,
    # and the read itself, through PgBouncer too, worked.
    assert "1 of 1 held by outside any request" in server_part
    assert (
        "of unknown backend: the driver gave no backend PID (a driver without one, such as "
        "pg8000, or a pooler such as PgBouncer in front)" in server_part
        or "none of the pool's backends is at the server: a pooler (PgBouncer) in front"
        in server_part
    )
    assert total(registry, "session_monitor_server_view_failures_total") == 0


def test_the_page_and_holders_share_one_reading_per_interval(
    postgres_url: str, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> None:
    engine = create_engine(postgres_url, pool_size=2)
    monitor = make_monitor(engine, registry=registry, server_view_interval=0.5)
    try:
        with engine.connect() as connection:
            connection.execute(text("select 1"))
            first = [pool["read_at"] for pool in monitor.database_report()]
            monitor.holders(server_view=True)
            again = [pool["read_at"] for pool in monitor.database_report()]
            time.sleep(0.6)
            later = [pool["read_at"] for pool in monitor.database_report()]
    finally:
        engine.dispose()
    assert first == again  # one read served both, and holders() between them
    assert later[0] > first[0]


def test_an_over_subscribed_pool_is_said_at_startup_and_its_limit_is_a_gauge(
    postgres_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with login_role(postgres_url, limit=3) as url:
        engine = create_engine(url)
        try:
            with caplog.at_level(logging.INFO, logger="session_monitor"):
                make_monitor(engine, registry=registry)
                with engine.connect() as connection:  # the pool's first connection: the check
                    connection.execute(text("select 1"))
                    wait_until(
                        lambda: any("over-subscribed" in r.getMessage() for r in caplog.records)
                    )
        finally:
            engine.dispose()
    (record,) = [r for r in caplog.records if "over-subscribed" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "1 worker x (5 + 10) = 15 connections may be opened; the server allows 3 (" in record.getMessage()
    assert "the role's limit 3)" in record.getMessage()
    assert total(registry, "session_monitor_server_connections_allowed") == 3


def test_tagged_processes_of_a_service_count_as_its_workers(
    postgres_url: str, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> None:
    import subprocess
    import sys

    service = f"svc{uuid.uuid4().hex[:6]}"
    # Another process of the same service, holding a connection: a second worker.
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from sqlalchemy import create_engine, text\n"
            "from prometheus_client import CollectorRegistry\n"
            "from session_monitor import SessionMonitor\n"
            "engine = create_engine(sys.argv[1])\n"
            "SessionMonitor(engine, registry=CollectorRegistry(), application_name=sys.argv[2])\n"
            "with engine.connect() as c:\n"
            "    c.execute(text('select 1')); print('ready', flush=True); time.sleep(60)\n",
            postgres_url,
            service,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    engine = create_engine(postgres_url)
    monitor = make_monitor(
        engine, registry=registry, application_name=service, server_view_interval=0.01
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        with engine.connect() as connection:
            connection.execute(text("select 1"))
            time.sleep(0.05)  # older than server_view_interval: the report reads again
            (pool,) = monitor.database_report()
    finally:
        child.kill()
        child.wait()
        engine.dispose()
    assert pool["sizing"].startswith(
        "2 workers (processes of this service connected to the server); pool_size 5 + "
        "max_overflow 10; 30 may be opened"
    )
