"""SQLAlchemy 2.1 no longer installs greenlet, and FastAPI's SQL tutorial runs without it: every
checkout must be counted exactly, with no internal error, where greenlet cannot be imported.

The app runs in a subprocess whose first statement makes greenlet unimportable the way an
absent package is (``sys.modules["greenlet"] = None``: ``import greenlet`` raises ImportError),
before SQLAlchemy, FastAPI or the monitor is imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).parent

# The tutorial's app (tests/_apps.py: a sync engine, a get_db dependency yielding a Session),
# served by TestClient; the pool's own checkout/checkin events count what the monitor should.
NO_GREENLET_APP = """
import sys

sys.modules["greenlet"] = None  # what a missing package looks like to `import greenlet`

import asyncio
import json

sys.path.insert(0, TESTS_DIR)
from _apps import build_app
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, event
from sqlalchemy.pool import QueuePool

from session_monitor import SessionMonitor

if URL.startswith("sqlite"):
    engine = create_engine(
        URL, poolclass=QueuePool, connect_args={"check_same_thread": False}
    )
else:
    engine = create_engine(URL)
built = build_app(engine)
registry = CollectorRegistry()
monitor = SessionMonitor(engine, registry=registry)
monitor.instrument_app(built.app)

pool = {"checkouts": 0, "checkins": 0, "on_the_loop": 0}


@event.listens_for(engine, "checkout")
def checked_out(dbapi_connection, record, proxy):
    pool["checkouts"] += 1
    if asyncio._get_running_loop() is not None:  # a sync session on the event loop's thread
        pool["on_the_loop"] += 1


@event.listens_for(engine, "checkin")
def checked_in(dbapi_connection, record):
    pool["checkins"] += 1


statuses = []
with TestClient(built.app) as client:
    ids = []
    for n in range(3):
        response = client.post("/items", params={"name": f"{PREFIX}-{n}"})
        statuses.append(response.status_code)
        ids.append(response.json()["id"])
    for item_id in ids:
        statuses.append(client.get(f"/items/{item_id}").status_code)
    # The path that asks whether a checkout runs inside SQLAlchemy's greenlet: a sync session
    # used on the event loop's thread (an async def endpoint, an async dependency).
    for item_id in ids:
        statuses.append(client.get(f"/async-items/{item_id}").status_code)
    statuses.append(client.get("/async-dep").status_code)
    statuses.append(client.get("/core").status_code)

def total(name, **labels):
    return sum(
        s.value
        for metric in registry.collect()
        for s in metric.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )

try:
    from sqlalchemy.util.concurrency import in_greenlet

    in_greenlet()
    sqlalchemy_in_greenlet = "answers"
except (ImportError, ValueError):  # ImportError on 2.1, ValueError on 2.0
    sqlalchemy_in_greenlet = "raises"

counted = {
    "internal_errors": total("session_monitor_internal_errors_total"),
    "wait_count": total("db_client_connection_wait_time_seconds_count"),
    "use_count": total("db_client_connection_use_time_seconds_count"),
    "used": total("db_client_connection_count", db_client_connection_state="used"),
    "opened": total("sqlalchemy_sessions_opened_total"),
    "closed": total("sqlalchemy_sessions_closed_total"),
    "active": total("sqlalchemy_sessions_active"),
    "blocking": total("sqlalchemy_session_pitfalls_total", kind="blocking_event_loop"),
}
monitor.uninstrument()
engine.dispose()
print(json.dumps({
    "greenlet_importable": sys.modules.get("greenlet") is not None,
    "sqlalchemy_in_greenlet": sqlalchemy_in_greenlet,
    "statuses": statuses,
    "pool": pool,
    **counted,
}))
"""


def run_without_greenlet(url: str, prefix: str) -> dict[str, object]:
    prelude = f"TESTS_DIR = {str(TESTS_DIR)!r}\nURL = {url!r}\nPREFIX = {prefix!r}\n"
    done = subprocess.run(
        [sys.executable, "-c", prelude + NO_GREENLET_APP],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


def assert_counted_exactly(result: dict[str, object]) -> None:
    # The condition is real: greenlet cannot be imported, and SQLAlchemy's own helper raises.
    assert result["greenlet_importable"] is False
    assert result["sqlalchemy_in_greenlet"] == "raises"
    statuses = result["statuses"]
    assert isinstance(statuses, list) and set(statuses) == {200}, statuses
    pool = result["pool"]
    assert isinstance(pool, dict)
    assert pool["on_the_loop"] > 0, "no checkout took the path that asks about greenlet"
    assert result["internal_errors"] == 0
    # Every checkout the pool made is in the wait histogram, every checkin in the use one.
    assert result["wait_count"] == pool["checkouts"]
    assert result["use_count"] == pool["checkins"]
    assert result["used"] == 0
    assert result["opened"] == result["closed"] and result["active"] == 0
    # Outside any greenlet, a sync session on the loop's thread blocks it: the pitfall is seen.
    assert result["blocking"] == pool["on_the_loop"]


def test_tutorial_app_without_greenlet_counts_every_checkout(sqlite_url: str) -> None:
    assert_counted_exactly(run_without_greenlet(sqlite_url, "item"))


@pytest.mark.postgres
def test_tutorial_app_without_greenlet_on_postgres(postgres_url: str) -> None:
    # The items table outlives the run on a kept database: names unique to this run.
    assert_counted_exactly(run_without_greenlet(postgres_url, f"no-greenlet-{uuid.uuid4()}"))
