"""The FastAPI app the HTTP benchmark loads: ``GET /items/{id}`` through a sync ``get_db``.

It mirrors example_app's request path (a sync yield dependency that commits and closes, an ORM
``get``, a pydantic response model) with nothing else on it. Environment:

- ``BENCH_VARIANT``: ``bare``, ``monitored`` (``SessionMonitor(engine,
  registry=CollectorRegistry())`` and its middleware) or ``fastapi-sqlalchemy-monitor`` (that
  package's middleware, configured as its README's quick start). Unset, ``BENCH_MONITOR``
  decides: ``1`` is ``monitored``, ``0`` (the default) ``bare``.
- ``BENCH_DATABASE_URL``: the database (default ``sqlite:///./bench_http.db``); fill it first
  with :func:`prepare_database`.

Serve it with ``uvicorn benchmarks.http_app:app``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict
from sqlalchemy import Engine, String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import QueuePool

from session_monitor import SessionMonitor

from .variants import peer_actions, peer_middleware

ITEM_ID = 1
# The apps create_app() builds.
BARE_APP = "bare"
MONITORED_APP = "monitored"
PEER_APP = "fastapi-sqlalchemy-monitor"
APP_VARIANTS = (BARE_APP, MONITORED_APP, PEER_APP)


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str | None] = mapped_column(String(500), default=None)


class ItemRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    description: str | None


def make_engine(url: str) -> Engine:
    # Pool larger than wrk's 16 connections: the benchmark measures monitoring, not queueing.
    return create_engine(
        url,
        poolclass=QueuePool,
        pool_size=20,
        max_overflow=10,
        connect_args={"check_same_thread": False},
    )


def prepare_database(url: str) -> None:
    """Create the table and the one item the benchmark reads."""
    engine = make_engine(url)
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        if session.get(Item, ITEM_ID) is None:
            session.add(Item(id=ITEM_ID, name="benchmark", description="read by wrk"))
    engine.dispose()


def get_db(request: Request) -> Iterator[Session]:
    factory: sessionmaker[Session] = request.app.state.session_factory
    db = factory()
    try:
        yield db
        db.commit()
    except Exception:
        db.rollback()
        raise
    finally:
        db.close()


def create_app(url: str, *, variant: str = BARE_APP) -> FastAPI:
    if variant not in APP_VARIANTS:
        raise ValueError(f"unknown app variant {variant!r}; choose from {APP_VARIANTS}")
    app = FastAPI()
    engine = make_engine(url)
    app.state.session_factory = sessionmaker(bind=engine, autoflush=False, expire_on_commit=False)

    @app.get("/items/{item_id}", response_model=ItemRead)
    def read_item(item_id: int, db: Annotated[Session, Depends(get_db)]) -> Item:
        row = db.get(Item, item_id)
        if row is None:
            raise HTTPException(status_code=404, detail=f"item {item_id} not found")
        return row

    if variant == MONITORED_APP:
        monitor = SessionMonitor(engine, registry=CollectorRegistry())
        monitor.instrument_app(app)
        app.state.monitor = monitor
    elif variant == PEER_APP:
        # fastapi-sqlalchemy-monitor's README quick start, word for word. Its listeners go on the
        # engine when Starlette builds the middleware stack (the first ASGI call) and stay there.
        app.add_middleware(peer_middleware(), engine=engine, actions=peer_actions())
    return app


def _variant_from_environment() -> str:
    variant = os.environ.get("BENCH_VARIANT")
    if variant:
        return variant
    return MONITORED_APP if os.environ.get("BENCH_MONITOR", "0") == "1" else BARE_APP


app = create_app(
    os.environ.get("BENCH_DATABASE_URL", "sqlite:///./bench_http.db"),
    variant=_variant_from_environment(),
)
