"""`/demo`: endpoints that misuse sessions on purpose, one per failure the dashboard must show.

Nothing here is a pattern to copy. Each endpoint reproduces one mistake seen in real FastAPI
services, so that session_monitor's metrics can be watched reacting to it:

| endpoint                    | what goes wrong                                  | response |
| --------------------------- | ------------------------------------------------ | -------- |
| `GET /demo/leak`            | a session is never closed and keeps a connection | 200      |
| `POST /demo/leak/release`   | closes every session `/demo/leak` kept           | 200      |
| `GET /demo/leak-on-error`   | a dependency without try/finally skips `close()` | 500      |
| `GET /demo/gc-leak`         | a session is dropped unclosed; GC reclaims it    | 200      |
| `GET /demo/slow?seconds=`   | a connection is held across a slow call          | 200      |
| `GET /demo/rollback`        | a write violates a constraint and rolls back     | 409      |
| `GET /demo/hold?seconds=`   | holds a connection; a burst exhausts the pool    | 200/503  |
| `GET /demo/core`            | correct Core `engine.connect()` usage            | 200      |
| `GET /demo/invalidate`      | a connection found broken is invalidated         | 200      |

The tutorials' pitfalls (a shared session, a sync session in `async def`, a forgotten commit, a
nested checkout) have a router of their own: `example_app/pitfalls.py`.

They are all GET so that a browser or `curl` can trigger them.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from example_app.db import Database, Item, get_database, get_db

router = APIRouter(prefix="/demo", tags=["demo: deliberate failures"])


class DemoError(RuntimeError):
    """A deliberate failure; the app turns it into a 500 response."""


class LeakedSessions:
    """Sessions `/demo/leak` opened and never closed, kept alive until released."""

    def __init__(self) -> None:
        # Sync endpoints run in worker threads, so several may append at once.
        self._lock = threading.Lock()
        self._sessions: list[Session] = []

    def add(self, session: Session) -> int:
        with self._lock:
            self._sessions.append(session)
            return len(self._sessions)

    def release_all(self) -> int:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()
        return len(sessions)


def _leaked_sessions(request: Request) -> LeakedSessions:
    leaked: LeakedSessions = request.app.state.leaked_sessions
    return leaked


def get_db_without_finally(request: Request) -> Iterator[Session]:
    # The bug: when the endpoint raises, FastAPI throws the exception in at `yield`, and the
    # close() below is never reached.
    db = get_database(request).SessionLocal()
    yield db
    db.close()


@router.get("/leak")
def leak(
    database: Annotated[Database, Depends(get_database)],
    leaked: Annotated[LeakedSessions, Depends(_leaked_sessions)],
) -> dict[str, int]:
    """Open a session, use it, never close it: its connection stays checked out."""
    db = database.SessionLocal()
    db.execute(select(1))
    # Kept in a list so garbage collection cannot quietly return the connection; each call
    # takes one more connection out of the pool until /demo/leak/release.
    return {"leaked_sessions": leaked.add(db)}


# POST: it changes state (closes sessions), so no crawler, prefetch or retry may send it.
@router.post("/leak/release")
def release_leaks(
    leaked: Annotated[LeakedSessions, Depends(_leaked_sessions)],
) -> dict[str, int]:
    """Close every session /demo/leak kept, giving their connections back to the pool."""
    return {"released": leaked.release_all()}


@router.get("/leak-on-error")
def leak_on_error(db: Annotated[Session, Depends(get_db_without_finally)]) -> None:
    """Use a session, then fail: the dependency's close() is skipped."""
    db.execute(select(1))
    raise DemoError("deliberate failure after using the session: it was never closed")


@router.get("/gc-leak")
def gc_leak(database: Annotated[Database, Depends(get_database)]) -> dict[str, int]:
    """Use a session and drop it unclosed, leaving the garbage collector to reclaim it."""
    db = database.SessionLocal()
    db.execute(select(1))
    del db
    # A Session sits in reference cycles, so dropping the last name does not free it; collect
    # now so the connection goes back during this request, as it would later on its own.
    return {"collected_objects": gc.collect()}


@router.get("/slow")
def slow(
    db: Annotated[Session, Depends(get_db)],
    seconds: Annotated[float, Query(ge=0, le=30)] = 0.5,
) -> dict[str, float]:
    """Hold a checked-out connection across a slow call (an HTTP API, a big computation)."""
    db.execute(select(1))
    time.sleep(seconds)
    return {"held_seconds": seconds}


@router.get("/rollback")
def rollback(db: Annotated[Session, Depends(get_db)]) -> None:
    """Write a row, then insert a duplicate primary key: get_db rolls both back, 409."""
    row = Item(name="rollback demo", description="never committed")
    db.add(row)
    db.flush()
    # The IntegrityError propagates to get_db, which rolls back; the app maps it to 409.
    db.execute(insert(Item).values(id=row.id, name="duplicate id"))


@router.get("/hold")
def hold(
    db: Annotated[Session, Depends(get_db)],
    seconds: Annotated[float, Query(ge=0, le=30)] = 2.0,
) -> dict[str, float]:
    """Hold a connection; more concurrent calls than the pool has connections get 503."""
    # A request that finds no free connection within POOL_TIMEOUT raises here, in execute(),
    # and the app's handler for SQLAlchemy's TimeoutError answers 503.
    db.execute(select(1))
    time.sleep(seconds)
    return {"held_seconds": seconds}


@router.get("/invalidate")
def invalidate(db: Annotated[Session, Depends(get_db)]) -> dict[str, bool]:
    """Invalidate the session's connection, as SQLAlchemy does when the server drops it.

    The pool discards the DBAPI connection and opens a new one at the next checkout.
    """
    db.execute(select(1))
    db.connection().invalidate()
    # What an app does after a disconnect error: roll back, so the session can be used again.
    db.rollback()
    return {"invalidated": True}


@router.get("/core")
def core(database: Annotated[Database, Depends(get_database)]) -> dict[str, int]:
    """Count items through Core, with the connection closed by its context manager."""
    with database.engine.connect() as connection:
        count = connection.scalar(select(func.count()).select_from(Item))
    return {"items": count or 0}
