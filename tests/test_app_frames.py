"""The application frame is the app's own code: never a frame of an installed library (SQLModel, a
driver, a helper in a site directory), nor one of a package named by `library_packages`; while
the app's own modules, wherever they live, are the application's."""

# No `from __future__ import annotations`: FastAPI must resolve the endpoints' annotations.

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from conftest import line_of
from fastapi import Depends, FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, exc, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import AsyncAdaptedQueuePool
from test_pytest_plugin import ENGINE_CONFTEST, opening_line, teardown_errors

from session_monitor import ConfigurationError, SessionMonitor

sqlmodel = pytest.importorskip("sqlmodel")

pytestmark = pytest.mark.anyio
pytest_plugins = ["pytester"]

HERE = Path(__file__).resolve()


def here(marker: str, function: str) -> tuple[str, int, str]:
    return (str(HERE), line_of(HERE, marker), function)


class Hero(sqlmodel.SQLModel, table=True):  # type: ignore[call-arg,misc]
    id: int | None = sqlmodel.Field(default=None, primary_key=True)
    name: str


def build_sqlmodel_app(engine: Engine, leaked: list[Any]) -> FastAPI:
    """The app of FastAPI's SQL tutorial, with SQLModel's Session.exec, and one that leaks."""
    sqlmodel.SQLModel.metadata.create_all(engine)
    app = FastAPI()

    def get_session() -> Iterator[Any]:
        with sqlmodel.Session(engine) as session:
            yield session

    SessionDep = Annotated[sqlmodel.Session, Depends(get_session)]

    @app.get("/heroes")
    def read_heroes(session: SessionDep) -> list[Hero]:
        return list(session.exec(sqlmodel.select(Hero)).all())

    @app.get("/leak")
    def leak() -> int:
        session = sqlmodel.Session(engine)
        leaked.append(session)
        return len(session.exec(sqlmodel.select(Hero)).all())  # sqlmodel-leak

    return app


async def test_a_sqlmodel_leak_is_reported_at_the_apps_line(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = make_engine(sqlite_url)
    leaked: list[Any] = []
    app = build_sqlmodel_app(engine, leaked)
    monitor = make_monitor(engine, registry=registry)
    monitor.instrument_app(app)
    caplog.set_level(logging.WARNING, logger="session_monitor")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        assert (await http.get("/heroes")).status_code == 200
        assert (await http.get("/leak")).status_code == 200
    leaks = [r.getMessage() for r in caplog.records if "Leaked session" in r.getMessage()]
    assert len(leaks) == 1
    assert f"opened at {HERE}:{line_of(HERE, 'sqlmodel-leak')} in leak" in leaks[0], leaks[0]
    assert "sqlmodel" not in leaks[0]
    assert monitor.view_of(leaked[0]).location == here("sqlmodel-leak", "leak")  # type: ignore[union-attr]
    for session in leaked:
        session.close()


PLUGIN_TESTS = """
from sqlmodel import Field, Session, SQLModel, select

import db_helpers

HELD = []


class Hero(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str


def test_sqlmodel_exec_left_open(engine):
    SQLModel.metadata.create_all(engine)
    session = Session(engine)
    session.exec(select(Hero)).all()  # opens: sqlmodel_exec
    HELD.append(session)


def test_helper_left_open(engine):
    HELD.append(db_helpers.first_row(engine))  # opens: through_helper
"""

HELPERS = """
from sqlalchemy import text
from sqlalchemy.orm import Session


def first_row(engine):
    session = Session(engine)
    session.execute(text("select 1"))
    return session
"""


def test_the_pytest_plugin_names_the_tests_line(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(ENGINE_CONFTEST)
    pytester.makepyfile(db_helpers=HELPERS)
    path = pytester.makepyfile(test_sqlmodel=PLUGIN_TESTS)
    pytester.makeini("[pytest]\nsession_monitor_library_packages = db_helpers\n")

    result = pytester.runpytest_subprocess("--session-monitor", "-p", "no:cacheprovider")

    result.assert_outcomes(passed=2, errors=2)
    sections = teardown_errors(result.stdout.str())
    for name, marker in [
        ("test_sqlmodel_exec_left_open", "sqlmodel_exec"),
        ("test_helper_left_open", "through_helper"),
    ]:
        opened = f"opened at test_sqlmodel.py:{opening_line(path, marker)} in {name}, in the test"
        assert opened in sections[name], sections[name]
    assert "session.py" not in result.stdout.str()


def hold_in_thread(engine: Engine, executing: threading.Event) -> None:
    with Session(engine) as session:
        session.execute(text("select 1"))
        executing.set()
        session.execute(text("select pg_sleep(1)"))  # pg-sleep-thread


@pytest.mark.postgres
def test_a_thread_inside_psycopg_is_now_at_the_apps_line(
    make_engine: Callable[..., Engine],
    postgres_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    engine = make_engine(postgres_url)
    monitor = make_monitor(engine, registry=registry)
    executing = threading.Event()
    thread = threading.Thread(target=hold_in_thread, args=(engine, executing))
    thread.start()
    try:
        assert executing.wait(5)
        time.sleep(0.3)  # well inside pg_sleep: the thread waits in the driver
        (holder,) = monitor.holders()
        assert holder.activity == "database"
        assert holder.now_at[0] == here("pg-sleep-thread", "hold_in_thread"), holder.now_at
    finally:
        thread.join()


async def hold_in_task(engine: Any, executing: asyncio.Event) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession

    async with AsyncSession(engine) as session:
        await session.execute(text("select 1"))
        executing.set()
        await session.execute(text("select pg_sleep(1)"))  # pg-sleep-task


@pytest.mark.postgres
async def test_a_task_inside_asyncpg_is_now_at_the_apps_line(
    postgres_url: str, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> None:
    pytest.importorskip("asyncpg")
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(make_url(postgres_url).set(drivername="postgresql+asyncpg"))
    monitor = make_monitor(engine, registry=registry)
    executing = asyncio.Event()
    task = asyncio.create_task(hold_in_task(engine, executing))
    try:
        await asyncio.wait_for(executing.wait(), 5)
        await asyncio.sleep(0.3)
        (holder,) = monitor.holders()
        assert holder.holder.startswith("task ")
        assert holder.activity == "database"
        assert holder.now_at[0] == here("pg-sleep-task", "hold_in_task"), holder.now_at
    finally:
        await task
        await engine.dispose()


async def hold_the_pool(engine: Any, held: asyncio.Event, release: asyncio.Event) -> None:
    async with engine.connect() as connection:
        await connection.execute(text("select 1"))
        held.set()
        await release.wait()  # holder-awaits


def one_connection_engine(tmp_path: Path) -> Any:
    """aiosqlite with a pool of one connection, which a second caller waits 0.2 s for."""
    pytest.importorskip("aiosqlite")
    from sqlalchemy.ext.asyncio import create_async_engine

    return create_async_engine(
        f"sqlite+aiosqlite:///{tmp_path / 'a.db'}",
        poolclass=AsyncAdaptedQueuePool,  # SQLAlchemy 2.0 gives aiosqlite a NullPool otherwise
        pool_size=1,
        max_overflow=0,
        pool_timeout=0.2,
    )


async def time_out_waiting(engine: Any, caplog: pytest.LogCaptureFixture) -> str:
    """Wait for a connection of the exhausted pool until the pool times out: its WARNING."""
    with caplog.at_level(logging.WARNING, logger="session_monitor"), pytest.raises(
        exc.TimeoutError
    ):
        async with engine.connect():  # the-waiter
            pass
    (warning,) = [r.getMessage() for r in caplog.records if "exhausted" in r.getMessage()]
    return warning


async def test_an_asyncio_pool_timeout_shows_where_the_holder_is(
    tmp_path: Path,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = one_connection_engine(tmp_path)
    make_monitor(engine, registry=registry)
    held, release = asyncio.Event(), asyncio.Event()
    holder = asyncio.create_task(hold_the_pool(engine, held, release))
    try:
        await asyncio.wait_for(held.wait(), 5)
        warning = await time_out_waiting(engine, caplog)
        now = f"now at {HERE}:{line_of(HERE, 'holder-awaits')} in hold_the_pool (awaiting)"
        assert now in warning, warning
        assert f":{line_of(HERE, 'the-waiter')} " not in warning
    finally:
        release.set()
        await holder
        await engine.dispose()


async def test_a_holder_task_that_has_ended_is_not_where_the_waiter_is(
    tmp_path: Path,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = one_connection_engine(tmp_path)
    monitor = make_monitor(engine, registry=registry)
    kept = []

    async def take_and_keep() -> None:
        kept.append(await engine.connect())  # its task ends, the connection stays checked out

    await asyncio.create_task(take_and_keep())
    try:
        warning = await time_out_waiting(engine, caplog)
        assert "now at <unknown> (unknown)" in warning, warning
        assert f":{line_of(HERE, 'the-waiter')} " not in warning
        assert [h.holder for h in monitor.holders()] == ["a task that has ended"]
    finally:
        await kept[0].close()
        await engine.dispose()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


KEEPING = """
OPENED = []


def keep_first_row(engine):
    OPENED.append(first_row(engine))
"""

APP_MODULE = """
from {helpers} import first_row


def handler(engine):
    return first_row(engine)  # opens: app
"""


def test_a_site_directory_is_a_library_and_a_temporary_module_the_application(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    helpers, app = f"site_helpers_{tmp_path.name}", f"app_module_{tmp_path.name}"
    site = tmp_path / "site-packages"
    helper_file = write(site / helpers / "__init__.py", HELPERS + KEEPING)
    app_file = write(tmp_path / "app" / f"{app}.py", APP_MODULE.format(helpers=helpers))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(app_file.parent))
    engine = make_engine(sqlite_url)
    monitor = make_monitor(engine, registry=registry)
    try:
        session = __import__(app).handler(engine)
        location = monitor.view_of(session).location  # type: ignore[union-attr]
        assert location == (str(app_file), opening_line(app_file, "app"), "handler")
        session.close()
        # No frame of the app's on the stack at all: the innermost one past SQLAlchemy is kept.
        library = sys.modules[helpers]
        thread = threading.Thread(target=library.keep_first_row, args=(engine,))
        thread.start()
        thread.join()
        (session,) = library.OPENED
        location = monitor.view_of(session).location  # type: ignore[union-attr]
        assert location is not None and location[0] == str(helper_file), location
        session.close()
    finally:
        sys.modules.pop(app, None)
        sys.modules.pop(helpers, None)


def test_a_package_named_by_library_packages_is_skipped(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    helpers = f"named_helpers_{tmp_path.name}"
    write(tmp_path / f"{helpers}.py", HELPERS)  # beside the app's code: the app's by location
    monkeypatch.syspath_prepend(str(tmp_path))
    engine = make_engine(sqlite_url)
    monitor = make_monitor(engine, registry=registry, library_packages=[helpers])
    try:
        session = __import__(helpers).first_row(engine)  # through-named-helper
        location = monitor.view_of(session).location  # type: ignore[union-attr]
        assert location == here(
            "through-named-helper", "test_a_package_named_by_library_packages_is_skipped"
        )
        session.close()
    finally:
        sys.modules.pop(helpers, None)
    with pytest.raises(ConfigurationError, match=r"^library_packages takes module names.*'my-db'"):
        SessionMonitor(engine, registry=None, library_packages=["my-db"])
    with pytest.raises(ConfigurationError, match=r"^library_packages takes .*not the string"):
        SessionMonitor(engine, registry=None, library_packages="db_helpers")
