"""The app test_multiprocess runs under `uvicorn --workers 2`, monitored into the default registry.

Configured by the environment the test sets: SESSION_MONITOR_IT_DATABASE_URL (a SQLite file whose
table `it_mp_items` the test created), SESSION_MONITOR_IT_POOL_SIZE, SESSION_MONITOR_IT_MAX_OVERFLOW
and PROMETHEUS_MULTIPROC_DIR. Each endpoint answers with the pid of the worker that served it.
"""

import os
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, func, insert, select
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool

from session_monitor import SessionMonitor

items = Table(
    "it_mp_items",
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("name", String(50), nullable=False),
)

engine = create_engine(
    os.environ["SESSION_MONITOR_IT_DATABASE_URL"],
    poolclass=QueuePool,
    pool_size=int(os.environ["SESSION_MONITOR_IT_POOL_SIZE"]),
    max_overflow=int(os.environ["SESSION_MONITOR_IT_MAX_OVERFLOW"]),
    connect_args={"check_same_thread": False, "timeout": 30},
)
SessionLocal = sessionmaker(bind=engine)
monitor = SessionMonitor(engine)
app = FastAPI()
monitor.instrument_app(app)
# Sessions /leak opened and never closed; kept alive until the worker exits.
leaked: list[Session] = []


class Conflict(Exception):
    pass


async def conflict(request: Request, error: Exception) -> JSONResponse:
    return JSONResponse({"pid": os.getpid()}, status_code=409)


app.add_exception_handler(Conflict, conflict)


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


Db = Annotated[Session, Depends(get_db)]


@app.post("/commit")
def commit(db: Db) -> dict[str, int]:
    db.execute(insert(items).values(name="committed"))
    return {"pid": os.getpid()}


@app.post("/rollback")
def rollback(db: Db) -> None:
    db.execute(insert(items).values(name="rolled back"))
    raise Conflict


@app.post("/leak")
def leak() -> dict[str, int]:
    db = SessionLocal()
    # Only a read: a leaked SQLite write would lock the file for every other connection.
    db.scalar(select(func.count()).select_from(items))
    leaked.append(db)
    return {"pid": os.getpid()}
