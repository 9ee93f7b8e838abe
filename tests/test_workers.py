"""One diagnostics page for every worker: real servers with three workers, real Unix sockets.

`tests/_it_workers_app.py` runs under `uvicorn --workers 3` and gunicorn's UvicornWorker (with and
without --preload) with PROMETHEUS_MULTIPROC_DIR set (`tests/_workers_servers.py`). Requests are
sent until every worker has leaked sessions, holds connections, timed out on a pool and fallen
into pitfalls; the pids the app reports are the truth. One `/json` request, to whichever worker,
must list all of it for every worker. A stopped worker (SIGSTOP) is listed as not answering and
the page still comes back; a worker whose event loop is blocked still answers; a killed worker
drops out and its replacement appears.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _e2e_servers import Servers, eventually
from _workers_servers import (
    PAGE,
    SERVERS,
    WORKERS,
    Holds,
    Running,
    everyone_answers,
    marked,
    page,
    request_in_thread,
    spread,
    start_server,
    statuses,
)
from conftest import in_child
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from session_monitor import SessionMonitor
from session_monitor.web.workers import SOCKET_DIRECTORY, ask_workers

RECENT = 20  # the leaks, pitfalls and pool events each worker keeps for the page
# The page's keys in one process, as before workers were shown.
# The page of one process: what it had before several workers, and the database's view.
ONE_PROCESS_KEYS = {
    "generated_at", "pools", "holders", "groups", "leaks", "pitfalls", "pool_events", "database"
}


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    started = Servers(tmp_path)
    yield started
    leftovers = started.stop_all()
    assert not leftovers, f"still running after the test: {leftovers}"


@pytest.fixture(params=list(SERVERS))
def server(request: pytest.FixtureRequest, tmp_path: Path, servers: Servers) -> Running:
    return start_server(request.param, tmp_path, servers)


@pytest.fixture(params=["uvicorn", "gunicorn"])
def plain_server(request: pytest.FixtureRequest, tmp_path: Path, servers: Servers) -> Running:
    return start_server(request.param, tmp_path, servers)


@pytest.mark.e2e
@pytest.mark.slow
def test_one_page_lists_every_holder_of_every_worker(server: Running) -> None:
    pids = server.workers()
    leaks = spread(server.url, "/leak", pids, per_worker=2)
    timeouts = spread(server.url, "/exhaust", pids)
    holds = Holds(server)
    try:
        holds.until_every_worker_holds(pids)
        data = page(server.url)  # one request, whichever worker serves it
    finally:
        holds.release()
    assert Counter(holds.answers) == holds.by_worker  # the markers told who held

    assert everyone_answers(data, pids), data["workers"]
    assert data["note"] is None
    held = Counter((holder["pid"], holder["route"]) for holder in data["holders"])
    assert held == Counter(
        {**{(pid, "/leak"): n for pid, n in leaks.items()},
         **{(pid, "/hold"): n for pid, n in holds.by_worker.items()}}
    )
    assert {h["activity"] for h in data["holders"] if h["route"] == "/leak"} == {"leaked"}
    assert Counter(leak["pid"] for leak in data["leaks"]) == {
        pid: min(n, RECENT) for pid, n in leaks.items()
    }
    # Each /exhaust: one timeout, and two pitfalls (a sync session on the event loop, and a
    # second checkout while the first is held).
    assert Counter((e["pid"], e["kind"]) for e in data["pool_events"]) == {
        (pid, "timeout"): min(n, RECENT) for pid, n in timeouts.items()
    }
    assert Counter((p["pid"], p["kind"]) for p in data["pitfalls"]) == {
        (pid, kind): min(n, RECENT // 2)
        for pid, n in timeouts.items()
        for kind in ("blocking_event_loop", "nested_checkout")
    }
    totals = {total["name"]: total for total in data["pool_totals"]}
    assert {name: (t["used"], t["workers"]) for name, t in totals.items()} == {
        "workers.db": (leaks.total() + holds.by_worker.total(), WORKERS),
        "workers-small.db": (0, WORKERS),
    }
    assert totals["workers.db"]["maximum"] == WORKERS * 100
    assert sum(p["used"] for p in data["pools"] if p["name"] == "workers.db") == leaks.total() + (
        holds.by_worker.total()
    )
    by_route: Counter[str] = Counter()
    for group in data["groups"]:
        by_route[group["route"]] += group["count"]
    assert by_route == {"/leak": leaks.total(), "/hold": holds.by_worker.total()}

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
