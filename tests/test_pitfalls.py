"""The tutorials' pitfalls: each one caught exactly once per occurrence, with its route and line,
and none on the canonical, correct patterns — on SQLite and PostgreSQL (psycopg and asyncpg)."""

# No `from __future__ import annotations`: FastAPI must resolve endpoints' local annotations.

import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from _apps import closing_get_db
from conftest import line_of, total
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, String, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from session_monitor import SessionMonitor

pytestmark = pytest.mark.anyio

HERE = Path(__file__).resolve()


class Base(DeclarativeBase):
    pass


class Note(Base):
    # A name of its own per run: the PostgreSQL database may be shared.
    __tablename__ = f"pitfall_notes_{uuid.uuid4().hex[:10]}"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(50))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def engine(
    request: pytest.FixtureRequest, make_engine: Callable[..., Engine], sqlite_url: str
) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = sqlite_url
    else:
        pg: str = request.getfixturevalue("postgres_url")
        url = make_url(pg).set(drivername="postgresql+psycopg").render_as_string(False)
    made = make_engine(url)
    Base.metadata.create_all(made)
    yield made
    Base.metadata.drop_all(made)


def pitfalls(registry: CollectorRegistry, **labels: str) -> float:
    return total(registry, "sqlalchemy_session_pitfalls_total", **labels)


class PitfallRecorder:
    """An observer that keeps each pitfall's kind and the application line it names."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []

    def session_pitfall(self, session: Any, kind: str, location: Any) -> None:
        self.seen.append((kind, location))


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def correct_app(engine: Engine) -> FastAPI:
    """Every canonical pattern the bar names, none of them a pitfall."""
    SessionLocal = sessionmaker(engine)
    app = FastAPI()

    get_db = closing_get_db(SessionLocal)

    Db = Annotated[Session, Depends(get_db)]

    @app.post("/notes")
    def create(db: Db) -> int:
        note = Note(text="a")
        db.add(note)
        db.commit()
        return note.id

    @app.post("/begin")
    def begin() -> str:
        with SessionLocal.begin() as session:
            session.add(Note(text="b"))
        return "ok"

    @app.get("/read")
    def read(db: Db) -> int:
        return len(db.scalars(select(Note)).all())  # a read needs no commit

    @app.post("/conflict")
    def conflict(db: Db) -> None:
        db.add(Note(text="c"))
        db.flush()
        raise HTTPException(409, "conflict")  # the rollback after an exception is the point

    @app.post("/discard")
    def discard(db: Db) -> str:
        db.add(Note(text="d"))
        db.rollback()  # asked for
        return "ok"

    def record(text_: str) -> None:
        with SessionLocal.begin() as session:
            session.add(Note(text=text_))

    @app.post("/background")
    def background(db: Db, tasks: BackgroundTasks) -> int:
        tasks.add_task(record, "e")
        return len(db.scalars(select(Note)).all())

    @app.get("/stream")
    def stream() -> StreamingResponse:
        def rows() -> Iterator[bytes]:
            with SessionLocal() as session:
                for note in session.scalars(select(Note)):
                    yield f"{note.id}\n".encode()

        return StreamingResponse(rows())

    @app.get("/threadpool")
    async def threadpool() -> int:
        def count() -> int:
            with SessionLocal() as session:
                return len(session.scalars(select(Note)).all())

        return await run_in_threadpool(count)

    return app


async def test_no_pitfall_on_the_canonical_patterns(
    engine: Engine, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> None:
    monitor = make_monitor(engine, registry=registry)
    app = correct_app(engine)
    monitor.instrument_app(app)
    async with client(app) as http:
        for _ in range(2):
            assert (await http.post("/notes")).status_code == 200
            assert (await http.post("/begin")).status_code == 200
            assert (await http.get("/read")).status_code == 200
            assert (await http.post("/conflict")).status_code == 409
            assert (await http.post("/discard")).status_code == 200
            assert (await http.post("/background")).status_code == 200
            assert (await http.get("/stream")).status_code == 200
            assert (await http.get("/threadpool")).status_code == 200
    found = {
        s.labels["kind"] + " " + s.labels["route"]: s.value
        for m in registry.collect()
        for s in m.samples
        if s.name == "sqlalchemy_session_pitfalls_total"
    }
    assert found == {}
    assert total(registry, "sqlalchemy_sessions_leaked_total") == 0


def test_no_pitfall_for_a_session_bound_to_a_fixtures_outer_connection(
    engine: Engine, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> None:
    make_monitor(engine, registry=registry)
    with engine.connect() as connection:
        outer = connection.begin()
        for _ in range(2):  # two "tests" sharing the fixture's connection
            session = Session(bind=connection, join_transaction_mode="create_savepoint")
            session.add(Note(text="f"))
            session.commit()
            session.close()
        outer.rollback()
    assert pitfalls(registry) == 0


async def test_no_pitfall_for_async_sessions(
    async_url: str, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

    engine = create_async_engine(async_url)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    monitor = make_monitor(engine, registry=registry)
    SessionLocal = async_sessionmaker(engine, expire_on_commit=False)
    app = FastAPI()

    async def get_db() -> AsyncIterator[AsyncSession]:
        async with SessionLocal() as session:
            yield session

    @app.post("/notes")
    async def create(db: Annotated[AsyncSession, Depends(get_db)]) -> int:
        note = Note(text="g")
        db.add(note)
        await db.commit()
        return note.id

    monitor.instrument_app(app)
    try:
        async with client(app) as http:
            for _ in range(3):
                assert (await http.post("/notes")).status_code == 200
        assert pitfalls(registry) == 0
    finally:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.drop_all)
        await engine.dispose()


def pitfall_app(engine: Engine) -> tuple[FastAPI, list[Session]]:
    SessionLocal = sessionmaker(engine)
    shared = SessionLocal()  # one session for every request: the pitfall
    kept: list[Session] = []
    app = FastAPI()

    get_db = closing_get_db(SessionLocal)

    def get_db_without_finally() -> Iterator[Session]:
        db = SessionLocal()
        kept.append(db)
        yield db
        db.close()  # skipped when the endpoint raises

    @app.get("/shared")
    def use_shared() -> int:
        count = len(shared.scalars(select(Note)).all())  # shared-use
        shared.commit()
        return count

    @app.get("/blocking")
    async def blocking() -> int:
        with SessionLocal() as session:
            return int(session.execute(text("select 1")).scalar_one())  # blocking-use

    @app.post("/forgot")
    def forgot(db: Annotated[Session, Depends(get_db)]) -> str:
        db.add(Note(text="h"))
        db.flush()
        db.close()  # forgot-commit
        return "ok"

    @app.get("/nested")
    def nested(db: Annotated[Session, Depends(get_db)]) -> int:
        db.execute(text("select 1"))
        with engine.connect() as connection:  # nested-checkout
            return int(connection.execute(text("select 2")).scalar_one())

    @app.get("/no-finally")
    def no_finally(db: Annotated[Session, Depends(get_db_without_finally)]) -> None:
        db.execute(text("select 1"))
        raise HTTPException(404, "not found")

    kept.append(shared)
    return app, kept


async def test_each_pitfall_once_per_occurrence_with_its_route_and_line(
    engine: Engine,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monitor = make_monitor(engine, registry=registry)
    app, kept = pitfall_app(engine)
    monitor.instrument_app(app)
    with caplog.at_level(logging.WARNING, logger="session_monitor"):
        async with client(app) as http:
            for _ in range(3):
                assert (await http.get("/shared")).status_code == 200
                assert (await http.get("/blocking")).status_code == 200
                assert (await http.post("/forgot")).status_code == 200
                assert (await http.get("/nested")).status_code == 200
                assert (await http.get("/no-finally")).status_code == 404
    try:
        # The first request opened the shared session: the two others used someone else's.
        assert pitfalls(registry, kind="shared_session", route="/shared", method="GET") == 2
        assert pitfalls(registry, kind="blocking_event_loop", route="/blocking") == 3
        assert pitfalls(registry, kind="uncommitted_changes", route="/forgot") == 3
        assert pitfalls(registry, kind="nested_checkout", route="/nested") == 3
        assert pitfalls(registry) == 11
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Pitfall")]
        # One WARNING per (kind, line), each naming the line and the fix.
        assert len(said) == 4
        for kind, marker in [
            ("shared_session", "shared-use"),
            ("blocking_event_loop", "blocking-use"),
            ("uncommitted_changes", "forgot-commit"),
            ("nested_checkout", "nested-checkout"),
        ]:
            (message,) = [m for m in said if m.startswith(f"Pitfall ({kind})")]
            assert f"{HERE}:{line_of(HERE, marker)}" in message, message
        leaks = [r.getMessage() for r in caplog.records if "Leaked session" in r.getMessage()]
        assert len(leaks) == 3
        assert all("answered 404" in m and "finally:" in m for m in leaks)
    finally:
        for session in kept:
            session.close()


def test_the_forgotten_commit_outside_a_request_and_its_exceptions(
    engine: Engine, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> None:
    make_monitor(engine, registry=registry)
    with Session(engine) as session:
        session.add(Note(text="i"))  # added, never flushed, never committed
    assert pitfalls(registry, kind="uncommitted_changes") == 1

    session = Session(engine)
    session.execute(text("select 1"))
    session.close()  # nothing to commit

    def fail_halfway() -> None:
        with Session(engine) as session:
            session.add(Note(text="j"))
            session.flush()
            _ = 1 / 0  # the exception on its way out rolls back, on purpose

    with pytest.raises(ZeroDivisionError):
        fail_halfway()
    assert pitfalls(registry) == 1


def test_pitfalls_reach_observers_too(
    engine: Engine, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> None:
    recorder = PitfallRecorder()
    make_monitor(engine, registry=registry, observers=[recorder])
    with Session(engine) as session:
        session.add(Note(text="k"))
        session.flush()
    assert [kind for kind, _ in recorder.seen] == ["uncommitted_changes"]
    # Where the session was closed: the end of the with block.
    file, _, function = recorder.seen[0][1]
    assert (file, function) == (str(HERE), "test_pitfalls_reach_observers_too")


def test_a_session_dropped_with_flushed_changes_is_the_forgotten_commit_too(
    engine: Engine, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> None:
    import gc

    make_monitor(engine, registry=registry)

    def drop() -> None:
        session = Session(engine)
        session.add(Note(text="l"))
        session.flush()  # dropped-with-writes

    drop()
    gc.collect()
    assert pitfalls(registry, kind="uncommitted_changes") == 1
    assert total(registry, "sqlalchemy_sessions_leaked_total", reason="gc") == 1


async def test_an_async_session_used_by_two_tasks_at_once_is_shared(
    tmp_path: Path, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> None:
    import asyncio

    pytest.importorskip("aiosqlite")
    from sqlalchemy import exc
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'c.db'}")
    make_monitor(engine, registry=registry)
    session = AsyncSession(engine)
    try:
        # asyncio.gather over one session: the tutorials' async version of sharing it. Both
        # run to their end; SQLAlchemy refuses the second while the first connects.
        results = await asyncio.gather(
            session.execute(text("select 1")),
            session.execute(text("select 2")),
            return_exceptions=True,
        )
        refused = [r for r in results if isinstance(r, exc.InvalidRequestError)]
        assert len(refused) == 1 and "concurrent operations" in str(refused[0])
        assert pitfalls(registry, kind="shared_session") == 1
        assert total(registry, "sqlalchemy_sessions_opened_total") == 1
    finally:
        await session.close()
        await engine.dispose()
