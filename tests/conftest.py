"""Shared fixtures: real engines only, a fresh registry per test, monitors always removed."""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, create_engine, make_url
from sqlalchemy.pool import QueuePool

from session_monitor import SessionMonitor

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_ENV = "SESSION_MONITOR_TEST_POSTGRES_URL"
SUITE_UNAVAILABLE = 3  # a bed's exit code when its suite cannot be fetched (tests/sdist_suite/)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'app.db'}"


@pytest.fixture
def postgres_url() -> str:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(
            f"{POSTGRES_ENV} is not set: no PostgreSQL server configured "
            "(for example postgresql+psycopg://postgres@127.0.0.1:5432/<database>)"
        )
    return url


@pytest.fixture(params=["aiosqlite", pytest.param("asyncpg", marks=pytest.mark.postgres)])
def async_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An async driver's URL, for each: aiosqlite on a file, asyncpg on the PostgreSQL server."""
    pytest.importorskip(request.param)
    if request.param == "aiosqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'async.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return make_url(url).set(drivername="postgresql+asyncpg").render_as_string(False)


@pytest.fixture
def make_engine() -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(url: str, **kw: Any) -> Engine:
        if url.startswith("sqlite"):
            kw.setdefault("poolclass", QueuePool)
            kw.setdefault("connect_args", {"check_same_thread": False})
        engine = create_engine(url, **kw)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


@pytest.fixture
def make_monitor() -> Iterator[Callable[..., SessionMonitor]]:
    monitors: list[SessionMonitor] = []

    def make(*engines: Any, **kw: Any) -> SessionMonitor:
        monitor = SessionMonitor(*engines, **kw)
        monitors.append(monitor)
        return monitor

    yield make
    for monitor in monitors:
        monitor.uninstrument()
    gc.collect()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's value, 0.0 when the series does not exist (yet)."""
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def line_of(path: Path, marker: str) -> int:
    """The number of the line of `path` that ends with `# <marker>`: a test names a line of its
    own code without writing its number."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.rstrip().endswith(f"# {marker}"):
            return number
    raise AssertionError(marker)


def total(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """Sum of every sample of `name` whose labels include `labels`."""
    found = 0.0
    for metric in registry.collect():
        for s in metric.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                found += s.value
    return found


def run_bed(tmp_path: Path, module: str, *args: str, timeout: float, suite: str) -> None:
    """Run a bed (``python -m <module>``: a project's own test suite without and with the
    monitor, tests/sdist_suite/) in a subprocess, so no hook of the monitor touches this process.
    Skips when `suite` could not be obtained (no network), fails with the bed's report."""
    summary_path = tmp_path / "summary.json"
    command = [sys.executable, "-m", module, "--summary-json", str(summary_path), *args]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode == SUITE_UNAVAILABLE:
        pytest.skip(f"{suite} could not be obtained: {done.stderr.strip()}")
    if done.returncode == 0:
        return
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        pytest.fail("\n".join(summary["report"]), pytrace=False)
    output = (done.stdout + done.stderr).strip().splitlines()
    pytest.fail(
        f"{' '.join(command)} exited {done.returncode}:\n" + "\n".join(output[-30:]),
        pytrace=False,
    )


CHILD_TIMEOUT = 10.0  # a forked child's whole work in these tests takes well under a second


def in_child(work: Callable[[], dict[str, Any]], timeout: float = CHILD_TIMEOUT) -> dict[str, Any]:
    """Fork; the child runs `work` and sends back what it returns. A child that does not finish
    within `timeout` is killed and the test fails: it hangs."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.close(read)
            try:
                numbers = work()
            except BaseException:
                numbers = {"error": traceback.format_exc()}
            os.write(write, json.dumps(numbers).encode())
        finally:
            os._exit(0)
    os.close(write)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(f"the forked child did not finish within {timeout:g}s: it hangs")
            chunk = os.read(read, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    child: dict[str, Any] = json.loads(b"".join(chunks))
    assert "error" not in child, child["error"]
    return child
