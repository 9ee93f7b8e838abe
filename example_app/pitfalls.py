"""`/demo/pitfall`: the tutorials' pitfalls, committed on purpose, one endpoint each.

| endpoint                          | the pitfall (docs/pitfalls.md)                   |
| --------------------------------- | ------------------------------------------------- |
| `GET /demo/pitfall/shared`        | `shared_session`: one session for every request    |
| `GET /demo/pitfall/blocking`      | `blocking_event_loop`: sync session in `async def` |
| `GET /demo/pitfall/forgot-commit` | `uncommitted_changes`: an item never committed     |
| `GET /demo/pitfall/nested`        | `nested_checkout`: a second connection at once     |

(`GET /demo/leak-on-error` is the fifth: a dependency without try/finally.) Nothing here is a
pattern to copy; each docstring says what the correct code is.
"""

from __future__ import annotations

import threading
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from example_app.db import Database, Item, get_database, get_db

router = APIRouter(prefix="/demo/pitfall", tags=["demo: the tutorials' pitfalls"])

_shared_lock = threading.Lock()


def _shared_session(request: Request) -> Session:
    # The bug: one session for the whole app, made once and handed to every request.
    with _shared_lock:
        session: Session | None = getattr(request.app.state, "shared_session", None)
        if session is None:
            session = get_database(request).SessionLocal()
            request.app.state.shared_session = session
        return session


@router.get("/shared")
def shared(request: Request) -> dict[str, int]:
    """Correct: a `get_db` dependency that yields a new session per request."""
    session = _shared_session(request)
    with _shared_lock:  # the app even serialises it; it is still someone else's session
        count = session.scalar(select(func.count()).select_from(Item)) or 0
        session.commit()
    return {"items": count}


@router.get("/blocking")
async def blocking(database: Annotated[Database, Depends(get_database)]) -> dict[str, int]:
    """Correct: a plain `def` endpoint (run in a thread pool), or AsyncSession."""
    with database.SessionLocal() as session:  # sync I/O on the event loop's thread
        count = session.scalar(select(func.count()).select_from(Item)) or 0
    return {"items": count}


@router.get("/forgot-commit")
def forgot_commit(database: Annotated[Database, Depends(get_database)]) -> dict[str, bool]:
    """Correct: `with database.SessionLocal.begin() as session:`, or session.commit()."""
    with database.SessionLocal() as session:
        session.add(Item(name="never committed"))
        session.flush()
    return {"committed": False}


@router.get("/nested")
def nested(
    db: Annotated[Session, Depends(get_db)],
    database: Annotated[Database, Depends(get_database)],
) -> dict[str, int]:
    """Correct: run the second query on `db`, the request's session."""
    db.execute(text("select 1"))
    with database.engine.connect() as connection:  # a second connection from the same pool
        count = connection.scalar(select(func.count()).select_from(Item)) or 0
    return {"items": count}
