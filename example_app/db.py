"""Engine, session factory, model and the `get_db` dependency, as in FastAPI's SQL tutorial.

The pool is deliberately small (`POOL_SIZE` 5 + `MAX_OVERFLOW` 5, `POOL_TIMEOUT` 2 s, all
overridable by environment variables) so that a handful of leaks or a burst of slow requests
exhausts it and the dashboard has something to show.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from sqlalchemy import Engine, String, create_engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import QueuePool

# A file rather than `sqlite://` so that every pooled connection sees the same database.
DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite:///./example_app.db")
POOL_SIZE = int(os.environ.get("POOL_SIZE", "5"))
MAX_OVERFLOW = int(os.environ.get("MAX_OVERFLOW", "5"))
POOL_TIMEOUT = float(os.environ.get("POOL_TIMEOUT", "2"))


def create_db_engine(
    url: str = DATABASE_URL,
    *,
    pool_size: int = POOL_SIZE,
    max_overflow: int = MAX_OVERFLOW,
    pool_timeout: float = POOL_TIMEOUT,
) -> Engine:
    """Create an engine whose pool is small enough to run out."""
    options: dict[str, Any] = {}
    if make_url(url).get_backend_name() == "sqlite":
        # SQLAlchemy gives file databases a QueuePool already, but say so: the demo is about
        # a bounded pool, and check_same_thread would forbid handing connections across
        # FastAPI's worker threads.
        options["poolclass"] = QueuePool
        options["connect_args"] = {"check_same_thread": False}
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout,
        **options,
    )


def create_session_factory(bind: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=bind, autoflush=False, expire_on_commit=False)


engine = create_db_engine()
SessionLocal = create_session_factory(engine)


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str | None] = mapped_column(String(500), default=None)


@dataclass(frozen=True)
class Database:
    """The engine and session factory one application instance uses."""

    engine: Engine
    SessionLocal: sessionmaker[Session]


def get_database(request: Request) -> Database:
    database: Database = request.app.state.database
    return database


def get_db(request: Request) -> Iterator[Session]:
    """Yield a session for one request: commit on success, roll back on error, always close."""
    # The factory comes from the app rather than from this module's SessionLocal so that tests
    # can build several apps, each on its own database.
    db = get_database(request).SessionLocal()
    try:
        yield db
        db.commit()
    except Exception:
        db.rollback()
        raise
    finally:
        db.close()
