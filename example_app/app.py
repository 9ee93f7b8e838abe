"""The example FastAPI application: an items CRUD, the `/demo` failures, and session_monitor.

Run it with `python -m example_app` or `uvicorn example_app.app:app`; build more instances with
`create_app(database_url=..., registry=...)`.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlalchemy.orm import Session

from example_app import db as db_module
from example_app.db import Base, Database, Item, get_db
from example_app.demo import DemoError, LeakedSessions
from example_app.demo import router as demo_router
from example_app.pitfalls import router as pitfall_router
from session_monitor import SessionMonitor

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from prometheus_client import CollectorRegistry

logger = logging.getLogger(__name__)

# The live diagnostics page (who holds the pool), and its JSON at DIAGNOSTICS_PATH + "/json".
# It answers loopback clients only, as no diagnostics_token is configured.
DIAGNOSTICS_PATH = "/_session_monitor"


class ItemCreate(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    description: str | None = Field(default=None, max_length=500)


class ItemRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    description: str | None


DbSession = Annotated[Session, Depends(get_db)]


router = APIRouter(prefix="/items", tags=["items"])


@router.get("", response_model=list[ItemRead])
def list_items(
    db: DbSession,
    skip: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Sequence[Item]:
    return db.scalars(select(Item).order_by(Item.id).offset(skip).limit(limit)).all()


@router.post("", response_model=ItemRead, status_code=status.HTTP_201_CREATED)
def create_item(item: ItemCreate, db: DbSession) -> Item:
    row = Item(name=item.name, description=item.description)
    db.add(row)
    # Flush, not commit: get_db commits once the endpoint has returned, and the response needs
    # the id now.
    db.flush()
    return row


@router.get("/{item_id}", response_model=ItemRead)
def read_item(item_id: int, db: DbSession) -> Item:
    row = db.get(Item, item_id)
    if row is None:
        raise HTTPException(status_code=404, detail=f"item {item_id} not found")
    return row


def create_app(
    database_url: str | None = None,
    *,
    registry: CollectorRegistry | None = None,
    leak_threshold: float = 30.0,
    pool_size: int = db_module.POOL_SIZE,
    max_overflow: int = db_module.MAX_OVERFLOW,
    pool_timeout: float = db_module.POOL_TIMEOUT,
) -> FastAPI:
    """Build the app on `database_url`, monitored into `registry` (default: the global one).

    Without `database_url` the app uses `example_app.db`'s engine, and the pool options (which
    size an engine built from `database_url`) do not apply.
    """
    if database_url is None:
        database = Database(db_module.engine, db_module.SessionLocal)
    else:
        engine = db_module.create_db_engine(
            database_url,
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=pool_timeout,
        )
        database = Database(engine, db_module.create_session_factory(engine))
    tracer_provider = _tracer_provider_from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # In a worker thread: sync database I/O on the event loop would be the very pitfall
        # (blocking_event_loop) the monitor reports.
        await run_in_threadpool(Base.metadata.create_all, database.engine)
        try:
            yield
        finally:
            app.state.leaked_sessions.release_all()
            shared = getattr(app.state, "shared_session", None)  # /demo/pitfall/shared's
            if shared is not None:
                shared.close()
            if tracer_provider is not None:
                tracer_provider.shutdown()

    app = FastAPI(
        title="session_monitor example",
        description="An items API with a `/demo` router that reproduces session and pool failures.",
        lifespan=lifespan,
    )
    app.state.database = database
    app.state.leaked_sessions = LeakedSessions()
    app.include_router(router)
    app.include_router(demo_router)
    app.include_router(pitfall_router)
    app.add_exception_handler(sa_exc.TimeoutError, _pool_timeout_handler)
    app.add_exception_handler(sa_exc.IntegrityError, _integrity_error_handler)
    app.add_exception_handler(DemoError, _demo_error_handler)

    options: dict[str, Any] = {
        "leak_threshold": leak_threshold,
        "diagnostics_path": DIAGNOSTICS_PATH,
    }
    # Passing registry=None would mean "register nowhere" by prometheus_client's convention;
    # leave it out so the library falls back to the global registry.
    if registry is not None:
        options["registry"] = registry
    if tracer_provider is not None:
        options["tracer_provider"] = tracer_provider

    monitor = SessionMonitor(database.engine, **options)
    monitor.instrument_app(app)
    app.state.monitor = monitor
    return app


def _pool_timeout_handler(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(
        {"detail": "no database connection free in time; the pool is exhausted"},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": "1"},
    )


def _integrity_error_handler(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(
        {"detail": "the write violates a database constraint and was rolled back"},
        status_code=status.HTTP_409_CONFLICT,
    )


def _demo_error_handler(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=500)


def _tracer_provider_from_env() -> TracerProvider | None:
    """Export spans over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, else return None."""
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint:
        return None
    if "tracer_provider" not in inspect.signature(SessionMonitor).parameters:
        logger.warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set, but this version of session_monitor takes no "
            "tracer_provider: exporting no spans"
        )
        return None
    # Imported here so that the app runs with no OpenTelemetry package installed.
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as error:
        logger.warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set, but %s: install session-monitor[otel] to "
            "export spans; exporting none",
            error,
        )
        return None

    service_name = os.environ.get("OTEL_SERVICE_NAME", "session-monitor-example")
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    # The exporter reads the endpoint (appending /v1/traces) and headers from the environment.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    logger.info("exporting session spans over OTLP/HTTP to %s", endpoint)
    return provider


app = create_app()
