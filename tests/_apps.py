"""FastAPI apps in the shapes users write them, for the core tests.

No `from __future__ import annotations` here: FastAPI must resolve the local `Db` alias.
"""

import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from sqlalchemy import Engine, String, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)


@dataclass
class TestApp:
    app: FastAPI
    leaked: list[Session]  # where leaking endpoints keep what they leak
    get_db: Callable[[], Iterator[Session]]


def closing_get_db(SessionLocal: sessionmaker[Session]) -> Callable[[], Iterator[Session]]:
    """FastAPI's SQL tutorial's dependency: a session per request, closed in `finally`; the
    endpoints commit what they write."""

    def get_db() -> Iterator[Session]:
        db = SessionLocal()
        try:
            yield db
        finally:
            db.close()

    return get_db


def build_app(engine: Engine) -> TestApp:
    """The tutorial app, plus endpoints for every other way of making a session."""
    Base.metadata.create_all(engine)
    SessionLocal = sessionmaker(engine)
    leaked: list[Session] = []
    app = FastAPI()

    def get_db() -> Iterator[Session]:
        db = SessionLocal()
        try:
            yield db
            db.commit()
        except Exception:
            db.rollback()
            raise
        finally:
            db.close()

    def get_db_plain() -> Iterator[Session]:
        with Session(engine) as session:
            yield session

    async def get_db_async_dep() -> AsyncIterator[Session]:
        db = SessionLocal()
        try:
            yield db
        finally:
            db.close()

    Db = Annotated[Session, Depends(get_db)]

    @app.get("/items/{item_id}")
    def read_item(item_id: int, db: Db) -> dict[str, Any]:
        item = db.get(Item, item_id)
        if item is None:
            raise HTTPException(404)
        return {"id": item.id, "name": item.name}

    @app.post("/items")
    def create_item(name: str, db: Db) -> dict[str, Any]:
        item = Item(name=name)
        db.add(item)
        db.commit()
        db.refresh(item)  # the tutorial's refresh: a second transaction on the same session
        return {"id": item.id}

    @app.post("/items/fail")
    def create_and_fail(name: str, db: Db) -> None:
        db.add(Item(name=name))
        db.flush()
        raise HTTPException(409, "refused after a write")

    @app.get("/async-items/{item_id}")
    async def read_item_async(item_id: int, db: Db) -> dict[str, Any]:
        item = db.get(Item, item_id)
        return {"found": item is not None}

    @app.get("/plain")
    def plain(db: Annotated[Session, Depends(get_db_plain)]) -> int:
        return len(db.scalars(select(Item)).all())

    @app.get("/async-dep")
    async def async_dep(db: Annotated[Session, Depends(get_db_async_dep)]) -> int:
        return db.execute(text("SELECT 1")).scalar_one()

    @app.get("/core")
    def core() -> int:
        with engine.connect() as connection:
            return connection.execute(text("SELECT 2")).scalar_one()

    @app.post("/core/commit")
    def core_commit() -> int:
        with engine.begin() as connection:
            return connection.execute(text("SELECT 3")).scalar_one()

    @app.get("/leak")
    def leak() -> int:
        session = SessionLocal()
        leaked.append(session)
        return session.execute(text("SELECT 1")).scalar_one()

    @app.get("/leak/core")
    def leak_core() -> int:
        connection = engine.connect()
        leaked.append(connection)  # type: ignore[arg-type]
        return connection.execute(text("SELECT 1")).scalar_one()

    @app.get("/gc-leak")
    def gc_leak() -> int:
        session = SessionLocal()
        return session.execute(text("SELECT 1")).scalar_one()

    @app.get("/idle-unclosed")
    def idle_unclosed() -> int:
        # Committed, so it holds nothing at request end; but it is never closed.
        session = SessionLocal()
        value = session.execute(text("SELECT 1")).scalar_one()
        session.commit()
        leaked.append(session)
        return value

    @app.get("/stream")
    def stream(db: Db) -> StreamingResponse:
        def rows() -> Iterator[bytes]:
            for n in range(3):
                yield str(db.execute(text(f"SELECT {n}")).scalar_one()).encode()

        return StreamingResponse(rows())

    @app.get("/background")
    def background(tasks: BackgroundTasks) -> str:
        def work() -> None:
            with SessionLocal() as session, session.begin():
                session.execute(text("SELECT 1"))

        tasks.add_task(work)
        return "queued"

    @app.get("/hold")
    def hold(seconds: float, db: Db) -> int:
        # Sync, so FastAPI runs it in a worker thread: waiting callers block threads, not the loop.
        db.execute(text("SELECT 1"))
        time.sleep(seconds)
        return 1

    @app.get("/nothing")
    def nothing(db: Db) -> str:
        return "a session that never touches the database"

    return TestApp(app, leaked, get_db)


def dependencies_exit_before_streaming() -> bool:
    """Whether this FastAPI ends yield dependencies before a StreamingResponse's body runs."""
    order: list[str] = []
    app = FastAPI()

    def dependency() -> Iterator[None]:
        yield
        order.append("dependency exit")

    @app.get("/")
    def endpoint(_: Annotated[None, Depends(dependency)]) -> StreamingResponse:
        def body() -> Iterator[bytes]:
            order.append("body")
            yield b""

        return StreamingResponse(body())

    with TestClient(app) as http:
        http.get("/")
    return order[0] == "dependency exit"
