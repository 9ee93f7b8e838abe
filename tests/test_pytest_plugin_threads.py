"""The pytest plugin and threads: background work of a wider-scoped fixture (a shared
TestClient's lifespan worker thread or task, a thread a session-scoped fixture started) is never
charged to the test running meanwhile; what a test does itself, in any thread, still is.

Each case runs a small sample suite in a subprocess, as a user's suite would run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_pytest_plugin import ENGINE_CONFTEST, erroring_tests, opening_line, teardown_errors

pytest_plugins = ["pytester"]

# The app: a lifespan starts a worker thread and a background task. Each keeps the session of
# its last job open until the next job or the shutdown, so one is open while tests end.
APP = """
import threading
from contextlib import asynccontextmanager
from queue import Queue

import anyio.to_thread
from fastapi import Depends, FastAPI
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

HELD = []


def make_app(engine):
    SessionLocal = sessionmaker(bind=engine)
    thread_jobs, task_jobs = Queue(), Queue()

    def open_session():
        session = SessionLocal()
        session.execute(text("select 1"))  # opens: background
        return session

    def worker():
        session = None
        while (job := thread_jobs.get()) is not None:
            if session is not None:
                session.close()
            session = open_session()
            job.set()
        if session is not None:
            session.close()

    async def refresher():
        # Sync work of a background task, in the event loop's worker threads: the same threads
        # that run the requests' def endpoints.
        session = None
        while (job := await anyio.to_thread.run_sync(task_jobs.get)) is not None:
            if session is not None:
                session.close()
            session = await anyio.to_thread.run_sync(open_session)
            job.set()
        if session is not None:
            session.close()

    @asynccontextmanager
    async def lifespan(app):
        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(refresher)
            yield
            thread_jobs.put(None)
            task_jobs.put(None)
        thread.join()

    app = FastAPI(lifespan=lifespan)

    def get_db():
        with SessionLocal() as db:
            yield db

    def run(jobs):
        done = threading.Event()
        jobs.put(done)
        assert done.wait(10)
        return "done"

    @app.post("/thread-job")
    def thread_job():
        return run(thread_jobs)

    @app.post("/task-job")
    def task_job():
        return run(task_jobs)

    @app.get("/count")
    def count(db: Session = Depends(get_db)):
        return db.execute(text("select count(*) from item")).scalar_one()

    @app.get("/leak")
    def leak():
        session = SessionLocal()
        session.execute(text("select 1"))  # opens: request_leak
        HELD.append(session)
        return "leaked"

    return app
"""

CONFTEST = (
    ENGINE_CONFTEST
    + """
import threading

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app import make_app


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(make_app(engine)) as client:  # the lifespan runs for the whole module
        yield client


@pytest.fixture(scope="session")
def heartbeat(engine):
    # A thread started by a session-scoped fixture: one session per beat, kept to the next.
    beats, stop = threading.Semaphore(0), threading.Event()
    beaten = threading.Event()

    def beat():
        session = None
        while beats.acquire() and not stop.is_set():
            if session is not None:
                session.close()
            session = Session(engine)
            session.execute(text("select 1"))
            beaten.set()
        if session is not None:
            session.close()

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()

    def once():
        beaten.clear()
        beats.release()
        assert beaten.wait(10)

    yield once
    stop.set()
    beats.release()
    thread.join()
"""
)

TESTS = """
import threading

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session

from app import HELD, make_app


def test_lifespan_thread_works_meanwhile(client):
    assert client.post("/thread-job").status_code == 200


def test_lifespan_task_works_meanwhile(client):
    assert client.post("/task-job").status_code == 200


def test_session_fixture_thread_works_meanwhile(heartbeat):
    heartbeat()


def test_clean_request_through_the_shared_client(client):
    assert client.get("/count").status_code == 200
    assert client.post("/thread-job").status_code == 200


def test_leak_through_the_shared_client(client):
    assert client.get("/leak").status_code == 200


def test_leak_through_its_own_client(engine):
    with TestClient(make_app(engine)) as own:
        assert own.post("/thread-job").status_code == 200  # its own app's worker: the test's
        assert own.get("/leak").status_code == 200


def test_leak_in_a_thread_it_started(engine):
    def work():
        session = Session(engine)
        session.execute(text("select 1"))  # opens: own_thread
        HELD.append(session)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()


@pytest.fixture(scope="module")
async def loop_started_by_a_module_fixture():
    yield  # anyio's test runner is created here, in a module-scoped fixture's setup


@pytest.mark.anyio
async def test_async_leak_through_the_loops_worker_threads(
    loop_started_by_a_module_fixture, engine
):
    transport = httpx.ASGITransport(app=make_app(engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        assert (await http.get("/leak")).status_code == 200


@pytest.mark.anyio
async def test_async_clean_request(loop_started_by_a_module_fixture, engine):
    transport = httpx.ASGITransport(app=make_app(engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        assert (await http.get("/count")).status_code == 200
"""

LEAKS = {
    "test_leak_through_the_shared_client": "request_leak",
    "test_leak_through_its_own_client": "request_leak",
    "test_leak_in_a_thread_it_started": "own_thread",
    "test_async_leak_through_the_loops_worker_threads": "request_leak",
}


def test_background_work_of_wider_fixtures_is_not_the_tests(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    app = pytester.makepyfile(app=APP)
    tests = pytester.makepyfile(test_threads=TESTS)

    result = pytester.runpytest_subprocess("--session-monitor", "-p", "no:cacheprovider")

    output = result.stdout.str()
    everything = TESTS.count("\ndef test_") + TESTS.count("\nasync def test_")
    result.assert_outcomes(passed=everything, errors=len(LEAKS))
    assert erroring_tests(output) == {f"test_threads.py::{name}" for name in LEAKS}, output
    sections = teardown_errors(output)
    for name, marker in LEAKS.items():
        where = app if marker == "request_leak" else tests
        opened = f"{Path(where).name}:{opening_line(where, marker)} in "
        assert opened in sections[name], sections[name]
        assert f"by test_threads.py::{name}" in sections[name], sections[name]
        # One leak each: the background sessions open meanwhile are not counted in.
        assert "left 1 database session unclosed" in sections[name], sections[name]
