"""FastAPI apps for the integration tests: the classic `get_db`, its async twin, and misuse.

Every app is built on engines and a table the test gives it, so that each test has its own.
Tables get a unique name because a PostgreSQL database may be shared with other test runs.
"""

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker


class Conflict(Exception):
    """Raised by an endpoint after a write: get_db rolls back, the app answers 409."""


def items_table(prefix: str = "it_items") -> Table:
    return Table(
        f"{prefix}_{uuid.uuid4().hex[:10]}",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("name", String(50), nullable=False),
    )


def add_error_handlers(app: FastAPI) -> None:
    async def pool_timeout(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"error": "pool_timeout"}, status_code=503)

    async def database_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, sa_exc.DBAPIError)
        body = {"error": "database", "connection_invalidated": error.connection_invalidated}
        return JSONResponse(body, status_code=503)

    async def conflict(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"error": "conflict"}, status_code=409)

    app.add_exception_handler(sa_exc.TimeoutError, pool_timeout)
    app.add_exception_handler(sa_exc.DBAPIError, database_error)
    app.add_exception_handler(Conflict, conflict)


@dataclass
class Leaks:
    """Sessions an endpoint opened and never closed, kept referenced until the test lets go."""

    sessions: list[Any] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, session: Any) -> int:
        with self.lock:
            self.sessions.append(session)
            return len(self.sessions)

    def take(self) -> list[Any]:
        with self.lock:
            taken, self.sessions = self.sessions, []
        return taken

    def close_all(self) -> int:
        sessions = self.take()
        for session in sessions:
            session.close()
        return len(sessions)

    async def aclose_all(self) -> int:
        sessions = self.take()
        for session in sessions:
            await session.close()
        return len(sessions)


@dataclass
class ItemsApp:
    app: FastAPI
    table: Table
    leaks: Leaks


def build_sync_app(engine: Engine, table: Table) -> ItemsApp:
    """The FastAPI SQL tutorial's shape: a sessionmaker and `get_db` that commits or rolls back."""
    session_factory = sessionmaker(bind=engine, expire_on_commit=False)
    leaks = Leaks()

    def get_db() -> Iterator[Session]:
        db = session_factory()
        try:
            yield db
            db.commit()
        except Exception:
            db.rollback()
            raise
        finally:
            db.close()

    Db = Annotated[Session, Depends(get_db)]
    app = FastAPI()
    add_error_handlers(app)

    @app.post("/items")
    def create_item(name: str, db: Db) -> dict[str, Any]:
        return {"id": db.scalar(insert(table).values(name=name).returning(table.c.id))}

    @app.get("/items/{item_id}")
    def read_item(item_id: int, db: Db) -> dict[str, Any]:
        name = db.scalar(select(table.c.name).where(table.c.id == item_id))
        if name is None:
            raise HTTPException(404)
        return {"id": item_id, "name": name}

    @app.post("/items/{item_id}/rename")
    def rename_then_fail(item_id: int, name: str, db: Db) -> None:
        db.execute(update(table).where(table.c.id == item_id).values(name=name))
        raise Conflict

    @app.post("/leak")
    def leak() -> dict[str, int]:
        db = session_factory()
        count = db.scalar(select(func.count()).select_from(table)) or 0
        leaks.add(db)
        return {"count": count}

    @app.get("/nodb")
    def no_db(db: Db) -> dict[str, bool]:
        return {"ok": True}

    @app.get("/hold")
    def hold(seconds: float, db: Db) -> dict[str, bool]:
        db.execute(text("SELECT 1"))
        time.sleep(seconds)
        return {"ok": True}

    @app.get("/ping")
    def ping(db: Db) -> dict[str, int]:
        return {"one": db.scalar(text("SELECT 1")) or 0}

    return ItemsApp(app, table, leaks)


def build_async_app(engine: AsyncEngine, table: Table) -> ItemsApp:
    """`build_sync_app` with async_sessionmaker and AsyncSession: the same routes, async."""
    session_factory = async_sessionmaker(bind=engine, expire_on_commit=False)
    leaks = Leaks()

    async def get_db() -> AsyncIterator[AsyncSession]:
        db = session_factory()
        try:
            yield db
            await db.commit()
        except Exception:
            await db.rollback()
            raise
        finally:
            await db.close()

    Db = Annotated[AsyncSession, Depends(get_db)]
    app = FastAPI()
    add_error_handlers(app)

    @app.post("/items")
    async def create_item(name: str, db: Db) -> dict[str, Any]:
        return {"id": await db.scalar(insert(table).values(name=name).returning(table.c.id))}

    @app.get("/items/{item_id}")
    async def read_item(item_id: int, db: Db) -> dict[str, Any]:
        name = await db.scalar(select(table.c.name).where(table.c.id == item_id))
        if name is None:
            raise HTTPException(404)
        return {"id": item_id, "name": name}

    @app.post("/items/{item_id}/rename")
    async def rename_then_fail(item_id: int, name: str, db: Db) -> None:
        await db.execute(update(table).where(table.c.id == item_id).values(name=name))
        raise Conflict

    @app.post("/leak")
    async def leak() -> dict[str, int]:
        db = session_factory()
        count = await db.scalar(select(func.count()).select_from(table)) or 0
        leaks.add(db)
        return {"count": count}

    @app.get("/nodb")
    async def no_db(db: Db) -> dict[str, bool]:
        return {"ok": True}

    @app.get("/hold")
    async def hold(seconds: float, db: Db) -> dict[str, bool]:
        await db.execute(text("SELECT 1"))
        await asyncio.sleep(seconds)
        return {"ok": True}

    @app.get("/ping")
    async def ping(db: Db) -> dict[str, int]:
        return {"one": await db.scalar(text("SELECT 1")) or 0}

    return ItemsApp(app, table, leaks)


# The routes of build_mixed_app: (method, path, kind) with kind commit, rollback, core or nodb.
MIXED_ROUTES: tuple[tuple[str, str, str], ...] = (
    ("POST", "/sync/commit", "commit"),
    ("POST", "/sync/rollback", "rollback"),
    ("POST", "/async/commit", "commit"),
    ("POST", "/async/rollback", "rollback"),
    ("GET", "/mixed/read", "commit"),
    ("GET", "/core/sync", "commit"),
    ("GET", "/core/async", "commit"),
    ("GET", "/nodb/sync", "nodb"),
    ("GET", "/nodb/async", "nodb"),
)


def build_mixed_app(
    engine: Engine,
    async_engine: AsyncEngine,
    sync_table: Table,
    async_table: Table,
    *,
    hold: float = 0.003,
) -> FastAPI:
    """Sync and async endpoints on sync and async dependencies, each holding its connection."""
    sync_factory = sessionmaker(bind=engine)
    async_factory = async_sessionmaker(bind=async_engine)

    def get_db() -> Iterator[Session]:
        db = sync_factory()
        try:
            yield db
            db.commit()
        except Exception:
            db.rollback()
            raise
        finally:
            db.close()

    async def get_async_db() -> AsyncIterator[AsyncSession]:
        async with async_factory() as db:
            try:
                yield db
                await db.commit()
            except Exception:
                await db.rollback()
                raise

    Db = Annotated[Session, Depends(get_db)]
    AsyncDb = Annotated[AsyncSession, Depends(get_async_db)]
    app = FastAPI()
    add_error_handlers(app)

    @app.post("/sync/commit")
    def sync_commit(db: Db) -> None:
        db.execute(insert(sync_table).values(name="sync"))
        time.sleep(hold)

    @app.post("/sync/rollback")
    def sync_rollback(db: Db) -> None:
        db.execute(insert(sync_table).values(name="sync-rolled-back"))
        time.sleep(hold)
        raise Conflict

    @app.post("/async/commit")
    async def async_commit(db: AsyncDb) -> None:
        await db.execute(insert(async_table).values(name="async"))
        await asyncio.sleep(hold)

    @app.post("/async/rollback")
    async def async_rollback(db: AsyncDb) -> None:
        await db.execute(insert(async_table).values(name="async-rolled-back"))
        await asyncio.sleep(hold)
        raise Conflict

    @app.get("/mixed/read")
    async def async_endpoint_sync_session(db: Db) -> dict[str, int]:
        # A sync session in an async endpoint must not wait for a pooled connection on the event
        # loop (the holders need the loop to give theirs back): it runs its calls in a thread.
        count = await run_in_threadpool(db.scalar, select(func.count()).select_from(sync_table))
        await asyncio.sleep(hold)
        return {"count": count or 0}

    @app.get("/core/sync")
    def core_sync() -> None:
        with engine.connect() as connection:
            connection.execute(select(func.count()).select_from(sync_table))
            time.sleep(hold)
            connection.commit()

    @app.get("/core/async")
    async def core_async() -> None:
        async with async_engine.connect() as connection:
            await connection.execute(select(func.count()).select_from(async_table))
            await asyncio.sleep(hold)
            await connection.commit()

    @app.get("/nodb/sync")
    def nodb_sync(db: Db) -> None:
        time.sleep(hold)

    @app.get("/nodb/async")
    async def nodb_async(db: AsyncDb) -> None:
        await asyncio.sleep(hold)

    return app


@dataclass
class DisconnectApp:
    app: FastAPI
    leaks: Leaks
    # Set by each endpoint once its own code has finished (its finally ran, or it returned).
    finished: dict[str, threading.Event]
    # Chunks each streaming endpoint produced before it stopped.
    chunks_sent: dict[str, int]


def build_disconnect_app(engine: Engine, table: Table, *, chunks: int = 500) -> DisconnectApp:
    """Slow responses that hold a session while the client may go away."""
    session_factory = sessionmaker(bind=engine)
    leaks = Leaks()
    finished = {name: threading.Event() for name in ("closing", "leaky", "sleepy")}
    chunks_sent = {"closing": 0, "leaky": 0}

    def get_db() -> Iterator[Session]:
        db = session_factory()
        try:
            yield db
            db.commit()
        except Exception:
            db.rollback()
            raise
        finally:
            db.close()

    app = FastAPI()

    @app.get("/stream/closing")
    async def stream_closing() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            db = session_factory()
            try:
                count = db.scalar(select(func.count()).select_from(table))
                for _ in range(chunks):
                    yield f"{count}\n".encode()
                    chunks_sent["closing"] += 1
                    await asyncio.sleep(0.01)
            finally:
                db.close()
                finished["closing"].set()

        return StreamingResponse(body(), media_type="text/plain")

    @app.get("/stream/leaky")
    async def stream_leaky() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            # The bug: nothing closes the session, and the app keeps a reference to it.
            db = session_factory()
            leaks.add(db)
            count = db.scalar(select(func.count()).select_from(table))
            try:
                for _ in range(chunks):
                    yield f"{count}\n".encode()
                    chunks_sent["leaky"] += 1
                    await asyncio.sleep(0.01)
            finally:
                finished["leaky"].set()

        return StreamingResponse(body(), media_type="text/plain")

    @app.get("/sleepy")
    def sleepy(seconds: float, db: Annotated[Session, Depends(get_db)]) -> dict[str, int]:
        count = db.scalar(select(func.count()).select_from(table)) or 0
        time.sleep(seconds)
        finished["sleepy"].set()
        return {"count": count}

    @app.get("/ping")
    def ping(db: Annotated[Session, Depends(get_db)]) -> dict[str, int]:
        return {"count": db.scalar(select(func.count()).select_from(table)) or 0}

    return DisconnectApp(app, leaks, finished, chunks_sent)
