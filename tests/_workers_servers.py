"""A server of three workers running tests/_it_workers_app.py, and the requests that load it.

    running = start_server("uvicorn", tmp_path, servers)   # ready: every worker answers
    leaks = spread(running.url, "/leak", running.workers())  # pid -> requests it served
    data = page(running.url)                                 # the diagnostics page's JSON

Used by tests/test_workers.py and the browser test of the page.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from _e2e_servers import HOST, Servers, eventually, free_port, workers_of

from session_monitor.web.workers import SOCKET_DIRECTORY

WORKERS = 3
PAGE = "/_session_monitor"
STARTUP = 30.0
MAX_REQUESTS = 150  # sent to one path, at most, before every worker has had its share
MAX_HOLDS = 40

SERVERS = {
    "uvicorn": ["-m", "uvicorn", "--workers", str(WORKERS), "--no-access-log"],
    "gunicorn": ["-m", "gunicorn", "-k", "uvicorn.workers.UvicornWorker", "-w", str(WORKERS)],
    "gunicorn --preload": [
        "-m", "gunicorn", "-k", "uvicorn.workers.UvicornWorker", "-w", str(WORKERS), "--preload"
    ],
}


@dataclass
class Running:
    url: str
    supervisor: int
    sockets: Path  # PROMETHEUS_MULTIPROC_DIR/session_monitor
    markers: Path

    def workers(self) -> set[int]:
        return set(workers_of(self.supervisor))


def require_gunicorn(kind: str) -> None:
    if kind.startswith("gunicorn") and shutil.which("gunicorn", path=Path(sys.executable).parent) is None:
        pytest.skip("gunicorn is not installed (the test extra installs it)")


def page(url: str, **params: str) -> dict[str, Any]:
    # A new connection each time: any worker whose event loop runs may serve it.
    response = httpx.get(
        f"{url}{PAGE}/json", params=params, timeout=10, headers={"Connection": "close"}
    )
    response.raise_for_status()
    data: dict[str, Any] = response.json()
    return data


def statuses(data: dict[str, Any]) -> dict[int, str]:
    return {worker["pid"]: worker["status"] for worker in data["workers"]}


def everyone_answers(data: dict[str, Any], pids: set[int]) -> bool:
    return set(statuses(data)) == pids and sorted(statuses(data).values()) == [
        "answered"
    ] * (len(pids) - 1) + ["this worker"]


def start_server(kind: str, tmp_path: Path, servers: Servers) -> Running:
    """Start `kind` (a key of SERVERS) on a free port; return once every worker answers."""
    require_gunicorn(kind)
    multiprocess = tmp_path / "prometheus"
    markers = tmp_path / "markers"
    multiprocess.mkdir()
    markers.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "OTEL_EXPORTER_OTLP_ENDPOINT"}
    env |= {
        "PROMETHEUS_MULTIPROC_DIR": str(multiprocess),
        "SESSION_MONITOR_IT_DATABASE_URL": f"sqlite:///{tmp_path / 'workers.db'}",
        "SESSION_MONITOR_IT_MARKERS": str(markers),
        "PYTHONUNBUFFERED": "1",
    }
    arguments = [*SERVERS[kind], "tests._it_workers_app:app"]
    if kind == "uvicorn":
        arguments += ["--host", HOST, "--port", str(port), "--log-level", "warning"]
    else:
        arguments += ["-b", f"{HOST}:{port}", "--log-level", "warning"]
    server = servers.start(kind.replace(" ", ""), [sys.executable, *arguments], port=port, env=env)
    running = Running(server.url, server.process.pid, multiprocess / SOCKET_DIRECTORY, markers)
    deadline = time.monotonic() + STARTUP
    # Ready when every worker answers on the page (each listens once its lifespan started).
    while True:
        assert server.process.poll() is None, server.describe()
        assert time.monotonic() < deadline, f"workers never all answered: {server.describe()}"
        pids = running.workers()
        with contextlib.suppress(httpx.HTTPError):
            if len(pids) == WORKERS and everyone_answers(page(running.url), pids):
                return running
        time.sleep(0.2)


def spread(url: str, path: str, pids: set[int], per_worker: int = 1) -> Counter[int]:
    """POST `path` until every worker served it `per_worker` times; how often each did."""
    served: Counter[int] = Counter()

    def post(_: int) -> int:
        response = httpx.post(f"{url}{path}", timeout=10, headers={"Connection": "close"})
        response.raise_for_status()
        pid: int = response.json()["pid"]
        return pid

    with ThreadPoolExecutor(WORKERS) as pool:  # concurrent, so that every worker takes some
        while min(served[pid] for pid in pids) < per_worker:
            assert served.total() < MAX_REQUESTS, f"{path}: only {dict(served)} ever answered"
            served.update(pool.map(post, range(WORKERS)))
    assert set(served) == pids
    return served


def marked(markers: Path, token: str) -> int | None:
    """The pid of the worker whose request `token` holds a connection now, once it does."""
    found = list(markers.glob(f"{token}.*"))
    return int(found[0].suffix[1:]) if found else None


def request_in_thread(url: str, path: str, answers: list[int]) -> threading.Thread:
    def run() -> None:
        response = httpx.get(f"{url}{path}", timeout=70, headers={"Connection": "close"})
        answers.append(response.json()["pid"])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@dataclass
class Holds:
    """/hold requests in flight until `release()`: how many each worker holds."""

    running: Running
    by_worker: Counter[int] = field(default_factory=Counter)
    answers: list[int] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def until_every_worker_holds(self, pids: set[int]) -> None:
        while min(self.by_worker[pid] for pid in pids) < 1:
            assert len(self.threads) < MAX_HOLDS, f"only {set(self.by_worker)} took a /hold"
            token = f"hold{len(self.threads)}"
            path = f"/hold?token={token}"
            self.threads.append(request_in_thread(self.running.url, path, self.answers))
            assert eventually(
                lambda: marked(self.running.markers, token) is not None,  # noqa: B023
                timeout=10,
                interval=0.02,
            ), "a /hold never took its connection"
            self.by_worker[marked(self.running.markers, token)] += 1  # type: ignore[index]

    def release(self) -> None:
        (self.running.markers / "release").touch()
        for thread in self.threads:
            thread.join(timeout=30)
