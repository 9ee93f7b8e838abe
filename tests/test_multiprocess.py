"""prometheus-client multiprocess mode: two uvicorn workers, one scrape, the sums are exact.

`tests/_it_mp_app.py` builds `SessionMonitor(engine)` on the default registry, as an application
would; uvicorn runs it with `--workers 2` and PROMETHEUS_MULTIPROC_DIR set. Whichever worker
answers `/metrics` must report what both workers did.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from _e2e_servers import workers_of
from _it_server import free_port
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from session_monitor import pool_name_for

REPO = Path(__file__).resolve().parent.parent
REQUESTS = 40
MAX_REQUESTS = 200  # sent while only one worker has answered, at most
WORKERS = 2
POOL_SIZE = 5
MAX_OVERFLOW = 20


def route_of(i: int) -> str:
    return ("/leak", "/rollback", "/commit", "/commit", "/commit")[i % 5]


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'mp.db'}"
    with create_engine(url, poolclass=NullPool).begin() as connection:
        connection.execute(
            text("CREATE TABLE it_mp_items (id INTEGER PRIMARY KEY, name VARCHAR(50) NOT NULL)")
        )
    return url


@pytest.fixture
def server(tmp_path: Path, database_url: str) -> Iterator[str]:
    multiproc_dir = tmp_path / "prometheus"
    multiproc_dir.mkdir()
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir),
        "SESSION_MONITOR_IT_DATABASE_URL": database_url,
        "SESSION_MONITOR_IT_POOL_SIZE": str(POOL_SIZE),
        "SESSION_MONITOR_IT_MAX_OVERFLOW": str(MAX_OVERFLOW),
    }
    port = free_port()
    log_path = tmp_path / "uvicorn.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "tests._it_mp_app:app",
                "--workers",
                str(WORKERS),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    SUPERVISORS[url] = process.pid
    try:
        capacity = WORKERS * (POOL_SIZE + MAX_OVERFLOW)
        deadline = time.monotonic() + 20
        # Ready when every worker has built its monitor: each one publishes its pool's capacity.
        while True:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "workers not up in 20 s:\n" + log_path.read_text()
            try:
                if summed(scrape(url), "db_client_connection_max") == capacity:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


# The uvicorn supervisor of each server fixture, by URL: its children are the workers.
SUPERVISORS: dict[str, int] = {}


def scrape(url: str) -> list[Sample]:
    # A new connection per scrape, so that any worker may answer it.
    response = httpx.get(f"{url}/metrics", timeout=5, headers={"Connection": "close"})
    response.raise_for_status()
    return [s for family in text_string_to_metric_families(response.text) for s in family.samples]


def summed(samples: list[Sample], name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.mark.e2e
def test_sums_over_workers_match_what_was_sent(server: str, database_url: str) -> None:
    sent: Counter[str] = Counter()
    pids: set[int] = set()
    with httpx.Client(
        base_url=server, timeout=10, limits=httpx.Limits(max_keepalive_connections=0)
    ) as client:
        while sum(sent.values()) < REQUESTS or len(pids) < WORKERS:
            assert sum(sent.values()) < MAX_REQUESTS, f"only workers {pids} ever answered"
            route = route_of(sum(sent.values()))
            response = client.post(route)
            assert response.status_code == (409 if route == "/rollback" else 200), route
            sent[route] += 1
            pids.add(response.json()["pid"])
    assert len(pids) == WORKERS

    opened = sum(sent.values())
    pool = pool_name_for(create_engine(database_url).url)
    expected = {
        "opened": opened,
        "closed": opened - sent["/leak"],
        "active": sent["/leak"],
        "leaked request_end": sent["/leak"],
        "commit": sent["/commit"],
        "rollback": sent["/rollback"],
        "close": 0,
        "/commit opened": sent["/commit"],
        "/rollback closed": sent["/rollback"],
        "/leak active": sent["/leak"],
        "used": sent["/leak"],
        "checkouts - checkins": sent["/leak"],
        "max": WORKERS * (POOL_SIZE + MAX_OVERFLOW),
        "pending": 0,
    }

    def observed(samples: list[Sample]) -> dict[str, float]:
        def of(name: str, **labels: str) -> float:
            return summed(samples, name, **labels)

        return {
            "opened": of("sqlalchemy_sessions_opened_total"),
            "closed": of("sqlalchemy_sessions_closed_total"),
            "active": of("sqlalchemy_sessions_active"),
            "leaked request_end": of("sqlalchemy_sessions_leaked_total", reason="request_end"),
            "commit": of("sqlalchemy_transactions_total", outcome="commit"),
            "rollback": of("sqlalchemy_transactions_total", outcome="rollback"),
            "close": of("sqlalchemy_transactions_total", outcome="close"),
            "/commit opened": of(
                "sqlalchemy_sessions_opened_total", route="/commit", method="POST"
            ),
            "/rollback closed": of(
                "sqlalchemy_sessions_closed_total", route="/rollback", method="POST"
            ),
            "/leak active": of("sqlalchemy_sessions_active", route="/leak", method="POST"),
            "used": of("db_client_connection_count", db_client_connection_pool_name=pool, db_client_connection_state="used"),
            "checkouts - checkins": of(
                "db_client_connection_wait_time_seconds_count", db_client_connection_pool_name=pool
            )
            - of("db_client_connection_use_time_seconds_count", db_client_connection_pool_name=pool),
            "max": of("db_client_connection_max", db_client_connection_pool_name=pool),
            "pending": of("db_client_connection_pending_requests", db_client_connection_pool_name=pool),
        }

    # The last response can reach the client before its worker has closed the session and
    # ended the request: wait for the numbers to settle, bounded, then scrape again.
    deadline = time.monotonic() + 10
    while observed(scrape(server)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    for _ in range(6):
        assert observed(scrape(server)) == expected

    with create_engine(database_url, poolclass=NullPool).connect() as connection:
        rows = connection.scalar(text("SELECT count(*) FROM it_mp_items"))
    assert rows == sent["/commit"]


@pytest.mark.e2e
def test_a_killed_worker_leaves_the_live_gauges(server: str, database_url: str) -> None:
    import signal

    pool = pool_name_for(create_engine(database_url).url)
    per_worker = POOL_SIZE + MAX_OVERFLOW
    supervisor = SUPERVISORS[server]
    before = set(workers_of(supervisor))
    victim = httpx.post(f"{server}/commit", headers={"Connection": "close"}).json()["pid"]
    os.kill(victim, signal.SIGKILL)  # no shutdown hook runs: as the OOM killer does it
    deadline = time.monotonic() + 30
    # uvicorn starts a replacement; once it answers, it has published its pool's capacity.
    while not set(workers_of(supervisor)) - before:
        assert time.monotonic() < deadline, "no replacement worker"
        time.sleep(0.1)
    replacement_answered = False
    while not replacement_answered:
        assert time.monotonic() < deadline, "the replacement never answered"
        try:
            pid = httpx.post(f"{server}/commit", headers={"Connection": "close"}).json()["pid"]
            replacement_answered = pid not in before
        except httpx.TransportError:
            time.sleep(0.1)
    live = workers_of(supervisor)
    assert victim not in live and len(live) == WORKERS
    # Without the cleanup the dead worker's capacity stays in the sum for good.
    maximum = summed(scrape(server), "db_client_connection_max", db_client_connection_pool_name=pool)
    assert maximum == WORKERS * per_worker
