"""The app test_workers runs under `uvicorn --workers 3` and gunicorn, with the diagnostics page on.

Configured by the environment the test sets: SESSION_MONITOR_IT_DATABASE_URL (a SQLite file),
SESSION_MONITOR_IT_MARKERS (a directory) and PROMETHEUS_MULTIPROC_DIR. Each endpoint answers
with the pid of the worker that served it. `/hold` and `/block` hold a connection until they
return; each first writes `<markers>/<token>.<pid>`, so the test knows which worker holds it
while it is held. `/hold` returns once `<markers>/release` exists. `/exhaust` times out on a pool of one
connection, from an async endpoint that uses a sync session (a pitfall).
"""

import os
import time
from pathlib import Path

from fastapi import FastAPI
from sqlalchemy import create_engine, exc, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool

from session_monitor import SessionMonitor

PAGE = "/_session_monitor"
MARKERS = Path(os.environ["SESSION_MONITOR_IT_MARKERS"])

engine = create_engine(
    os.environ["SESSION_MONITOR_IT_DATABASE_URL"],
    poolclass=QueuePool,
    pool_size=100,  # more than the test ever holds in one worker: nothing waits
    max_overflow=0,
    connect_args={"check_same_thread": False},
)
# One connection, given up after 0.2 s: /exhaust times out on it.
small = create_engine(
    os.environ["SESSION_MONITOR_IT_DATABASE_URL"].replace(".db", "-small.db"),
    poolclass=QueuePool,
    pool_size=1,
    max_overflow=0,
    pool_timeout=0.2,
    connect_args={"check_same_thread": False},
)
SessionLocal = sessionmaker(bind=engine)
monitor = SessionMonitor(engine, small, diagnostics_path=PAGE, log_leaks=False)
app = FastAPI()
monitor.instrument_app(app)
# Sessions /leak opened and never closed; kept alive until the worker exits.
leaked: list[Session] = []


def mark(token: str) -> None:
    (MARKERS / f"{token}.{os.getpid()}").touch()


@app.post("/leak")
def leak() -> dict[str, int]:
    db = SessionLocal()
    db.execute(text("select 1"))
    leaked.append(db)
    return {"pid": os.getpid()}


@app.get("/hold")
def hold(token: str) -> dict[str, int]:
    with SessionLocal() as db:
        db.execute(text("select 1"))
        mark(token)
        deadline = time.monotonic() + 60
        while not (MARKERS / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return {"pid": os.getpid()}


@app.get("/block")
async def block(token: str, seconds: float) -> dict[str, int]:
    with SessionLocal() as db:
        db.execute(text("select 1"))
        mark(token)
        time.sleep(seconds)  # noqa: ASYNC251 (the point: its event loop serves nothing meanwhile)
    return {"pid": os.getpid()}


@app.post("/exhaust")
async def exhaust() -> dict[str, int]:
    # A sync session on the event loop (a pitfall), and a second one that times out waiting
    # for the small pool's one connection.
    with Session(small) as first:
        first.execute(text("select 1"))
        with Session(small) as second:
            try:
                second.execute(text("select 1"))
            except exc.TimeoutError:
                return {"pid": os.getpid()}
    raise RuntimeError("the small pool did not time out")
