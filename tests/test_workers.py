"""One diagnostics page for every worker: real servers with three workers, real Unix sockets.

`tests/_it_workers_app.py` runs under `uvicorn --workers 3` and gunicorn's UvicornWorker (with and
without --preload) with PROMETHEUS_MULTIPROC_DIR set. Requests are sent until every worker has
leaked sessions and holds connections; the pids the app reports are the truth. One `/json`
request, to whichever worker, must list every holder of every worker. A stopped worker (SIGSTOP)
is listed as not answering and the page still comes back; a worker whose event loop is blocked
still answers; a killed worker drops out and its replacement appears.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from _e2e_servers import HOST, Servers, eventually, free_port, workers_of
from conftest import in_child
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from session_monitor import SessionMonitor
from session_monitor.workers import SOCKET_DIRECTORY, ask_workers

WORKERS = 3
PAGE = "/_session_monitor"
LEAKS_PER_WORKER = 2
MAX_REQUESTS = 150  # leak requests sent, at most, before every worker has had its share
MAX_HOLDS = 40
RECENT_LEAKS = 20  # the leaks each worker keeps for the page
STARTUP = 30.0
# The page's keys in one process, as before workers were shown.
ONE_PROCESS_KEYS = {"generated_at", "pools", "holders", "groups", "leaks", "pitfalls", "pool_events"}

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


def page(url: str) -> dict[str, Any]:
    # A new connection each time: any worker whose event loop runs may serve it.
    response = httpx.get(f"{url}{PAGE}/json", timeout=10, headers={"Connection": "close"})
    response.raise_for_status()
    data: dict[str, Any] = response.json()
    return data


def statuses(data: dict[str, Any]) -> dict[int, str]:
    return {worker["pid"]: worker["status"] for worker in data["workers"]}


def everyone_answers(data: dict[str, Any], pids: set[int]) -> bool:
    return sorted(statuses(data).values()) == ["answered"] * (len(pids) - 1) + [
        "this worker"
    ] and set(statuses(data)) == pids


def start_server(kind: str, tmp_path: Path, servers: Servers) -> Running:
    multiprocess = tmp_path / "prometheus"
    markers = tmp_path / "markers"
    multiprocess.mkdir()
    markers.mkdir()
    port = free_port()
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("OTEL_EXPORTER_OTLP_ENDPOINT",)
    }
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


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    started = Servers(tmp_path)
    yield started
    leftovers = started.stop_all()
    assert not leftovers, f"still running after the test: {leftovers}"


def require_gunicorn(kind: str) -> None:
    if kind.startswith("gunicorn") and shutil.which("gunicorn", path=Path(sys.executable).parent) is None:
        pytest.skip("gunicorn is not installed (the test extra installs it)")


@pytest.fixture(params=list(SERVERS))
def server(request: pytest.FixtureRequest, tmp_path: Path, servers: Servers) -> Running:
    require_gunicorn(request.param)
    return start_server(request.param, tmp_path, servers)


@pytest.fixture(params=["uvicorn", "gunicorn"])
def plain_server(request: pytest.FixtureRequest, tmp_path: Path, servers: Servers) -> Running:
    require_gunicorn(request.param)
    return start_server(request.param, tmp_path, servers)


def leak_until_every_worker_leaked(url: str, pids: set[int]) -> Counter[int]:
    leaks: Counter[int] = Counter()

    def leak(_: int) -> int:
        response = httpx.post(f"{url}/leak", timeout=10, headers={"Connection": "close"})
        response.raise_for_status()
        pid: int = response.json()["pid"]
        return pid

    with ThreadPoolExecutor(WORKERS) as pool:  # concurrent, so that every worker takes some
        while min(leaks[pid] for pid in pids) < LEAKS_PER_WORKER:
            assert sum(leaks.values()) < MAX_REQUESTS, f"only {dict(leaks)} ever answered"
            leaks.update(pool.map(leak, range(WORKERS)))
    assert set(leaks) == pids
    return leaks


def marked(markers: Path, token: str) -> int | None:
    found = list(markers.glob(f"{token}.*"))
    return int(found[0].suffix[1:]) if found else None


def request_in_thread(url: str, path: str, answers: list[int]) -> threading.Thread:
    def run() -> None:
        response = httpx.get(f"{url}{path}", timeout=70, headers={"Connection": "close"})
        answers.append(response.json()["pid"])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.e2e
@pytest.mark.slow
def test_one_page_lists_every_holder_of_every_worker(server: Running) -> None:
    pids = server.workers()
    leaks = leak_until_every_worker_leaked(server.url, pids)
    holds: Counter[int] = Counter()
    answers: list[int] = []
    threads = []
    while min(holds[pid] for pid in pids) < 1:
        assert len(threads) < MAX_HOLDS, f"only workers {set(holds)} ever took a /hold"
        token = f"hold{len(threads)}"
        threads.append(request_in_thread(server.url, f"/hold?token={token}", answers))
        assert eventually(
            lambda: marked(server.markers, token) is not None, timeout=10, interval=0.02  # noqa: B023
        ), "a /hold never took its connection"
        holds[marked(server.markers, token)] += 1  # type: ignore[index]
    try:
        data = page(server.url)  # one request, whichever worker serves it
    finally:
        (server.markers / "release").touch()
        for thread in threads:
            thread.join(timeout=30)
    assert Counter(answers) == holds  # the markers told the truth about who held

    assert everyone_answers(data, pids), data["workers"]
    assert data["note"] is None
    held = Counter((holder["pid"], holder["route"]) for holder in data["holders"])
    assert held == Counter(
        {**{(pid, "/leak"): n for pid, n in leaks.items()},
         **{(pid, "/hold"): n for pid, n in holds.items()}}
    )
    assert {holder["activity"] for holder in data["holders"] if holder["route"] == "/leak"} == {
        "leaked"
    }
    assert Counter(leak["pid"] for leak in data["leaks"]) == {
        pid: min(n, RECENT_LEAKS) for pid, n in leaks.items()
    }
    (total,) = data["pool_totals"]
    assert (total["used"], total["workers"]) == (leaks.total() + holds.total(), WORKERS)
    assert sum(pool["used"] for pool in data["pools"]) == total["used"]
    by_route = Counter()
    for group in data["groups"]:
        by_route[group["route"]] += group["count"]
    assert by_route == {"/leak": leaks.total(), "/hold": holds.total()}

    # Only the server's user may connect: the directory is 0700, each socket 0600.
    assert stat.S_IMODE(server.sockets.stat().st_mode) == 0o700
    assert sorted(path.name for path in server.sockets.iterdir()) == sorted(
        f"{pid}.sock" for pid in pids
    )
    for path in server.sockets.iterdir():
        assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.e2e
@pytest.mark.slow
def test_a_stopped_worker_is_not_answering_and_the_page_comes_back(plain_server: Running) -> None:
    pids = plain_server.workers()
    victim = min(pids)
    os.kill(victim, signal.SIGSTOP)
    try:
        started = time.monotonic()
        data = page(plain_server.url)
        took = time.monotonic() - started
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGCONT)
    assert statuses(data)[victim] == "not answering", data["workers"]
    assert sorted(status for pid, status in statuses(data).items() if pid != victim) == [
        "answered", "this worker"
    ]
    assert f"This page shows 2 of 3 workers: pid {victim} is not answering" in data["note"]
    assert took < 10  # bounded by the deadline (1 s), not by the stopped worker
    # Running again, it answers again.
    assert eventually(lambda: everyone_answers(page(plain_server.url), pids), timeout=10)


@pytest.mark.e2e
@pytest.mark.slow
def test_a_worker_whose_event_loop_is_blocked_still_answers(plain_server: Running) -> None:
    answers: list[int] = []
    blocking = request_in_thread(plain_server.url, "/block?token=block&seconds=4", answers)
    assert eventually(
        lambda: marked(plain_server.markers, "block") is not None, timeout=10, interval=0.02
    ), "/block never started"
    blocked = marked(plain_server.markers, "block")
    data = page(plain_server.url)  # served by another worker: the blocked one accepts nothing
    blocking.join(timeout=30)
    assert answers == [blocked]
    assert statuses(data)[blocked] == "answered"
    (holder,) = [holder for holder in data["holders"] if holder["pid"] == blocked]
    assert holder["route"] == "/block"
    # Its pitfall, caught when the session closed, is on the page labelled with its worker.
    pitfalls = [(p["pid"], p["kind"], p["route"]) for p in page(plain_server.url)["pitfalls"]]
    assert pitfalls == [(blocked, "blocking_event_loop", "/block")]


@pytest.mark.e2e
@pytest.mark.slow
def test_a_killed_worker_drops_out_and_its_replacement_appears(plain_server: Running) -> None:
    before = plain_server.workers()
    victim = min(before)
    os.kill(victim, signal.SIGKILL)  # no shutdown runs: its socket file stays behind
    assert (plain_server.sockets / f"{victim}.sock").exists()
    assert eventually(
        lambda: len(plain_server.workers() - before) == 1 and victim not in plain_server.workers(),
        timeout=30,
    ), "no replacement worker"
    now = plain_server.workers()
    assert eventually(lambda: everyone_answers(page(plain_server.url), now), timeout=30)
    shown = statuses(page(plain_server.url))
    assert victim not in shown and set(shown) == now
    assert not (plain_server.sockets / f"{victim}.sock").exists()


# -- in one process: no server, the same sockets ----------------------------------------------


def client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 51000))
    return httpx.AsyncClient(transport=transport, base_url="http://t")


def leaky_app(engine: Engine, kept: list[Session]) -> FastAPI:
    app = FastAPI()

    @app.get("/leak")
    def leak() -> None:
        session = Session(engine)
        session.execute(text("select 1"))
        kept.append(session)

    return app


@pytest.mark.anyio
async def test_one_process_keeps_the_page_as_it_was(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    make_monitor: Callable[..., SessionMonitor],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    engine = make_engine(sqlite_url)
    monitor = make_monitor(engine, registry=CollectorRegistry(), diagnostics_path=PAGE)
    kept: list[Session] = []
    app = leaky_app(engine, kept)
    monitor.instrument_app(app)
    async with client(app) as http:
        await http.get("/leak")
        data = (await http.get(f"{PAGE}/json")).json()
    assert set(data) == ONE_PROCESS_KEYS
    assert "pid" not in data["holders"][0]
    for session in kept:
        session.close()


@pytest.mark.anyio
async def test_a_directory_open_to_others_is_not_used_and_the_page_says_so(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    make_monitor: Callable[..., SessionMonitor],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    planted = tmp_path / SOCKET_DIRECTORY
    planted.mkdir()
    planted.chmod(0o777)  # anyone could put a socket there, or connect
    monitor = make_monitor(
        make_engine(sqlite_url), registry=None, diagnostics_path=PAGE, log_leaks=False
    )
    app = FastAPI()
    monitor.instrument_app(app)
    async with client(app) as http:
        data = (await http.get(f"{PAGE}/json")).json()
    assert data["note"].startswith(f"This page shows only this worker (pid {os.getpid()})")
    assert "mode 0700" in data["note"]
    ((worker),) = data["workers"]
    assert worker["status"] == "this worker" and "cannot listen" in worker["detail"]
    assert list(planted.iterdir()) == []


def test_a_forked_child_does_not_answer_for_its_parent(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    make_monitor: Callable[..., SessionMonitor],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monitor = make_monitor(
        make_engine(sqlite_url), registry=None, diagnostics_path=PAGE, log_leaks=False
    )
    monitor._serving(True)  # what the app's lifespan does at startup
    parent = os.getpid()
    try:

        def ask() -> dict[str, Any]:
            listening = monitor._worker_socket is not None and monitor._worker_socket.listening
            answers = ask_workers(str(tmp_path), 5.0)
            return {
                "listening": listening,
                "answers": [(a.pid, a.status, a.data and a.data["pid"]) for a in answers],
                "files": sorted(os.listdir(tmp_path / SOCKET_DIRECTORY)),
            }

        first = in_child(ask)
        # The child closed its copy of the socket: the parent still answers, a second child too.
        second = in_child(ask)
    finally:
        monitor._serving(False)
    for child in (first, second):
        assert child == {
            "listening": False,
            "answers": [[parent, "answered", parent]],
            "files": [f"{parent}.sock"],
        }
    assert list((tmp_path / SOCKET_DIRECTORY).iterdir()) == []  # stopped: removed
