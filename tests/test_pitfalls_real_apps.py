"""The pitfalls and transaction outcomes on apps written the way FastAPI's and SQLAlchemy's docs
write them (issue 17): silent on correct code, still caught on the mistakes, outcomes as an
operator reads them. SQLite and PostgreSQL; aiosqlite and asyncpg where the code is async."""

# No `from __future__ import annotations`: FastAPI must resolve endpoints' local annotations.

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
from _apps import build_app, closing_get_db
from conftest import total
from fastapi import Depends, FastAPI, HTTPException
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, insert, select, text
from sqlalchemy.exc import IntegrityError, NoResultFound
from sqlalchemy.orm import Session, sessionmaker
from test_pitfalls import Note, PitfallRecorder, client, pitfalls
from test_pitfalls import engine as engine  # the fixture: SQLite and PostgreSQL (psycopg)

from session_monitor import SessionMonitor

pytestmark = pytest.mark.anyio

notes = Note.__table__


@pytest.fixture
async def async_engine(async_url: str) -> AsyncIterator[Any]:
    from sqlalchemy.ext.asyncio import create_async_engine

    made = create_async_engine(async_url)
    async with made.begin() as connection:
        await connection.run_sync(notes.create)
    yield made
    async with made.begin() as connection:
        await connection.run_sync(notes.drop)
    await made.dispose()


def outcomes(registry: CollectorRegistry) -> dict[str, float]:
    found = {
        outcome: total(registry, "sqlalchemy_transactions_total", outcome=outcome)
        for outcome in ("commit", "rollback", "close")
    }
    return {outcome: n for outcome, n in found.items() if n}


# -- 5. silent on correct code -------------------------------------------------------------------


async def test_async_get_db_with_async_with_is_silent_when_the_endpoint_raises_after_a_flush(
    async_engine: Any, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    monitor = make_monitor(async_engine, registry=registry)
    Maker = async_sessionmaker(async_engine, expire_on_commit=False)
    app = FastAPI()

    async def get_db() -> AsyncIterator[AsyncSession]:
        async with Maker() as session:
            yield session

    async def get_db_finally() -> AsyncIterator[AsyncSession]:
        db = Maker()
        try:
            yield db
        finally:
            await db.close()

    Db = Annotated[AsyncSession, Depends(get_db)]

    @app.post("/notes/finally/conflict")
    async def conflict_finally(db: Annotated[AsyncSession, Depends(get_db_finally)]) -> None:
        db.add(Note(text="e"))
        await db.flush()
        raise HTTPException(409, "refused after a write")

    @app.post("/notes/conflict")
    async def conflict(db: Db) -> None:
        db.add(Note(text="a"))
        await db.flush()
        raise HTTPException(409, "refused after a write")  # the rollback is the point

    @app.post("/notes/crash")
    async def crash(db: Db) -> None:
        db.add(Note(text="b"))
        await db.flush()
        raise ValueError("a bug after a write")

    @app.post("/notes")
    async def create(db: Db) -> int:
        note = Note(text="c")
        db.add(note)
        await db.commit()
        return note.id

    @app.post("/notes/forgot")
    async def forgot(db: Db) -> int:
        note = Note(text="d")
        db.add(note)
        await db.flush()
        return note.id  # no commit: the async with rolls the note back

    monitor.instrument_app(app)
    async with client(app) as http:
        for _ in range(2):
            assert (await http.post("/notes/conflict")).status_code == 409
            assert (await http.post("/notes/finally/conflict")).status_code == 409
            with pytest.raises(ValueError, match="a bug after a write"):
                await http.post("/notes/crash")
            assert (await http.post("/notes")).status_code == 200
    assert pitfalls(registry) == 0
    async with client(app) as http:
        assert (await http.post("/notes/forgot")).status_code == 200
    assert pitfalls(registry, kind="uncommitted_changes", route="/notes/forgot") == 1
    assert pitfalls(registry) == 1


def notes_app(engine: Engine) -> tuple[FastAPI, Callable[[], Iterator[Session]]]:
    """FastAPI's SQL tutorial: a get_db dependency, endpoints that commit what they write."""
    SessionLocal = sessionmaker(engine)
    app = FastAPI()

    get_db = closing_get_db(SessionLocal)

    Db = Annotated[Session, Depends(get_db)]

    @app.post("/notes")
    def create(text_: str, db: Db) -> int:
        note = Note(text=text_)
        db.add(note)
        db.commit()
        db.refresh(note)
        return note.id

    @app.get("/notes")
    def count(db: Db) -> int:
        return len(db.scalars(select(Note)).all())

    return app, get_db


def test_a_test_session_on_an_outer_connection_is_neither_shared_nor_uncommitted(
    engine: Engine, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> None:
    monitor = make_monitor(engine, registry=registry)
    app, get_db = notes_app(engine)
    monitor.instrument_app(app)
    # SQLAlchemy's recipe for a test suite: the test owns the connection and its transaction,
    # and the session it hands to every request of the test only joins it, in savepoints.
    with engine.connect() as connection:
        outer = connection.begin()
        session = Session(bind=connection, join_transaction_mode="create_savepoint")

        def override_get_db() -> Iterator[Session]:
            yield session

        app.dependency_overrides[get_db] = override_get_db
        with TestClient(app) as http:
            for n in range(3):
                assert http.post("/notes", params={"text_": f"n{n}"}).status_code == 200
            assert http.get("/notes").json() == 3
        assert len(session.scalars(select(Note)).all()) == 3  # the test's own check
        session.close()
        outer.rollback()  # the test's data goes away: the fixture's point
    assert pitfalls(registry) == 0
    assert total(registry, "sqlalchemy_sessions_leaked_total") == 0


def test_the_shared_session_and_the_forgotten_commit_on_an_apps_own_connection_still_count(
    engine: Engine, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> None:
    monitor = make_monitor(engine, registry=registry)
    app, get_db = notes_app(engine)
    shared = sessionmaker(engine)()  # one module-level session for every request

    def shared_db() -> Iterator[Session]:
        yield shared

    app.dependency_overrides[get_db] = shared_db
    monitor.instrument_app(app)
    with TestClient(app) as http:
        for n in range(3):
            assert http.post("/notes", params={"text_": f"s{n}"}).status_code == 200
    shared.close()
    # The first request opened it; it began a new transaction in each of the two others.
    assert pitfalls(registry, kind="shared_session", route="/notes") == 2
    # A connection with no transaction of its own yet: the session begins it, and owns it.
    with engine.connect() as connection:
        session = Session(bind=connection)
        session.add(Note(text="t"))
        session.flush()
        session.close()  # never committed: rolled back
    assert pitfalls(registry, kind="uncommitted_changes") == 1
    assert pitfalls(registry) == 3


def test_merge_of_an_unchanged_object_is_no_uncommitted_change(
    engine: Engine, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> None:
    with Session(engine) as session, session.begin():
        session.add(Note(id=1, text="same"))
    monitor = make_monitor(engine, registry=registry)
    app, get_db = notes_app(engine)
    Db = Annotated[Session, Depends(get_db)]

    @app.put("/notes/{note_id}")
    def put(note_id: int, text_: str, db: Db) -> str:
        db.merge(Note(id=note_id, text=text_))
        return "ok"  # no commit: right only while nothing changed

    @app.patch("/notes/{note_id}")
    def touch(note_id: int, text_: str, db: Db) -> str:
        note = db.get(Note, note_id)
        assert note is not None
        note.text = text_  # Session.dirty now has it, changed or not
        return "ok"

    monitor.instrument_app(app)
    with TestClient(app) as http:
        for _ in range(2):
            assert http.put("/notes/1", params={"text_": "same"}).status_code == 200
            assert http.patch("/notes/1", params={"text_": "same"}).status_code == 200
        assert pitfalls(registry) == 0
        # A real change, never committed, is still the forgotten commit.
        assert http.put("/notes/1", params={"text_": "changed"}).status_code == 200
        assert http.patch("/notes/1", params={"text_": "changed"}).status_code == 200
    assert pitfalls(registry, kind="uncommitted_changes", route="/notes/{note_id}") == 2
    assert pitfalls(registry) == 2


async def test_a_leaked_session_is_reported_as_a_leak_not_also_as_idle_in_transaction(
    sqlite_url: str,
    make_engine: Callable[..., Engine],
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = make_engine(sqlite_url)
    monitor = make_monitor(engine, registry=registry, idle_in_transaction_threshold=0.1)
    built = build_app(engine)
    monitor.instrument_app(built.app)
    try:
        async with client(built.app) as http:
            # Holding its transaction while it sleeps: idle in transaction, and no leak.
            assert (await http.get("/hold", params={"seconds": 0.6})).status_code == 200
            assert total(registry, "sqlalchemy_sessions_idle_in_transaction_total") == 1
            # Never closed: a leak when its request ends, and nothing else afterwards.
            assert (await http.get("/leak")).status_code == 200
            await asyncio.sleep(0.6)
        assert total(registry, "sqlalchemy_sessions_leaked_total", reason="request_end") == 1
        assert total(registry, "sqlalchemy_sessions_leaked_total") == 1
        assert total(registry, "sqlalchemy_sessions_idle_in_transaction_total") == 1
        idle = [r.getMessage() for r in caplog.records if "idle in transaction" in r.getMessage()]
        assert len(idle) == 1 and "/hold" in idle[0], idle
    finally:
        for leaked in built.leaked:
            leaked.close()


# -- 6. caught where the exception is handled ----------------------------------------------------


def get_or_create_app(engine: Engine) -> FastAPI:
    SessionLocal = sessionmaker(engine)
    app = FastAPI()

    @app.post("/tags/forgot")
    def forgot(name: str) -> int:
        try:
            with SessionLocal() as session:
                return session.scalars(select(Note).where(Note.text == name)).one().id
        except NoResultFound:
            with SessionLocal() as session:
                note = Note(text=name)
                session.add(note)
                session.flush()
                return note.id  # never committed: the exception is handled, not leaving

    @app.post("/tags")
    def get_or_create(name: str) -> int:
        try:
            with SessionLocal() as session:
                return session.scalars(select(Note).where(Note.text == name)).one().id
        except NoResultFound:
            with SessionLocal.begin() as session:
                note = Note(text=name)
                session.add(note)
                session.flush()
                return note.id

    @app.post("/tags/refused")
    def refused(name: str) -> int:
        try:
            with SessionLocal() as session:
                return session.scalars(select(Note).where(Note.text == name)).one().id
        except NoResultFound:
            with SessionLocal() as session:
                session.add(Note(text=name))
                session.flush()
                raise HTTPException(409, "not allowed to create it") from None

    return app


async def test_a_forgotten_commit_in_an_except_block_is_caught(
    engine: Engine, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> None:
    seen = PitfallRecorder()
    monitor = make_monitor(engine, registry=registry, observers=[seen])
    app = get_or_create_app(engine)
    monitor.instrument_app(app)
    async with client(app) as http:
        assert (await http.post("/tags", params={"name": "kept"})).status_code == 200
        assert (await http.post("/tags", params={"name": "kept"})).status_code == 200
        assert (await http.post("/tags/refused", params={"name": "r"})).status_code == 409
        assert pitfalls(registry) == 0
        assert (await http.post("/tags/forgot", params={"name": "lost"})).status_code == 200
    assert pitfalls(registry, kind="uncommitted_changes", route="/tags/forgot") == 1
    assert pitfalls(registry) == 1
    ((kind, (file, _, function)),) = seen.seen
    assert (kind, file, function) == ("uncommitted_changes", __file__, "forgot")


# -- 7. outcomes ---------------------------------------------------------------------------------


async def test_a_failed_core_insert_closed_by_async_with_is_a_rollback(
    async_engine: Any, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> None:
    monitor = make_monitor(async_engine, registry=registry)
    app = FastAPI()

    @app.post("/notes/{note_id}")
    async def create(note_id: int) -> str:
        async with async_engine.connect() as connection:
            await connection.execute(insert(notes).values(id=note_id, text="x"))
            await connection.commit()
        return "ok"

    @app.put("/notes/{note_id}")
    async def create_if_absent(note_id: int) -> str:
        async with async_engine.connect() as connection:
            try:
                await connection.execute(insert(notes).values(id=note_id, text="y"))
            except IntegrityError:
                return "exists"  # handled; the transaction it failed in is rolled back
            await connection.commit()
        return "created"

    @app.get("/notes")
    async def count() -> int:
        async with async_engine.connect() as connection:  # the normal read path
            return len((await connection.execute(select(notes))).all())

    monitor.instrument_app(app)
    async with client(app) as http:
        assert (await http.post("/notes/1")).status_code == 200
        with pytest.raises(IntegrityError):
            await http.post("/notes/1")
        assert (await http.put("/notes/1")).json() == "exists"
        assert (await http.get("/notes")).json() == 1
    assert outcomes(registry) == {"commit": 1, "rollback": 2, "close": 1}
    assert total(registry, "sqlalchemy_transactions_total", route="/notes", outcome="close") == 1


def test_a_failed_core_insert_closed_by_with_is_a_rollback(
    engine: Engine, registry: CollectorRegistry, make_monitor: Callable[..., SessionMonitor]
) -> None:
    make_monitor(engine, registry=registry)
    with engine.begin() as connection:
        connection.execute(insert(notes).values(id=1, text="x"))
    with pytest.raises(IntegrityError), engine.connect() as connection:
        connection.execute(insert(notes).values(id=1, text="x"))
    connection = engine.connect()
    try:
        connection.execute(insert(notes).values(id=1, text="x"))
    except IntegrityError:
        connection.close()  # handled, then closed: still the transaction it failed in
    with engine.connect() as connection:
        connection.execute(text("select 1"))
    assert outcomes(registry) == {"commit": 1, "rollback": 2, "close": 1}


ASYNC_AFTER_MONITOR = """
import asyncio, sys
from prometheus_client import CollectorRegistry
from session_monitor import SessionMonitor

registry = CollectorRegistry()
monitor = SessionMonitor(registry=registry)  # every engine, built before any asyncio import
assert "sqlalchemy.ext.asyncio" not in sys.modules

from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

class Base(DeclarativeBase):
    pass

class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)

async def main():
    engine = create_async_engine(sys.argv[1])
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    Maker = async_sessionmaker(engine)
    for exception_leaves in (True, False):
        try:
            async with Maker() as session:
                session.add(Note())
                await session.flush()
                if exception_leaves:
                    raise LookupError("refused after a write: the rollback is the point")
        except LookupError:
            pass
    await engine.dispose()

asyncio.run(main())
value = registry.get_sample_value(
    "sqlalchemy_session_pitfalls_total",
    {"kind": "uncommitted_changes", "route": "<none>", "method": "<none>"},
)
print(value)
"""


def test_an_async_session_closed_by_an_exception_is_silent_with_a_monitor_built_first(
    tmp_path: Path,
) -> None:
    # A monitor for every engine built before the app imports SQLAlchemy's asyncio extension
    # still learns how an AsyncSession's async with ended: the hook comes with the first
    # AsyncEngine. A fresh interpreter, since this one imported the extension long ago.
    url = f"sqlite+aiosqlite:///{tmp_path / 'notes.db'}"
    done = subprocess.run(
        [sys.executable, "-c", ASYNC_AFTER_MONITOR, url],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    # The forgotten commit (no exception) is caught, the block an exception left is not.
    assert float(done.stdout.strip().splitlines()[-1]) == 1, done.stdout + done.stderr
