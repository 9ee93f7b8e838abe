"""Requests per second of the bare and the monitored app, served by uvicorn, loaded by wrk.

Both servers run side by side on free loopback ports (one uvicorn process each, one worker);
wrk runs alternate between them in pairs, the first of each pair alternating too, and each
pair gives one ratio monitored/bare. wrk and the server share the machine's cores.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .common import WHY_BOOKKEEPING, Table, Target, verdict
from .http_app import ITEM_ID, prepare_database

TARGET_RPS_RATIO = 0.97
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class HttpSettings:
    pairs: int
    duration_s: int
    warmup_s: int
    threads: int = 2
    connections: int = 16


FULL = HttpSettings(pairs=4, duration_s=5, warmup_s=2)
QUICK = HttpSettings(pairs=1, duration_s=1, warmup_s=0)


def _pinning() -> tuple[list[str], list[str]]:
    """taskset prefixes putting the server on the first CPU and wrk on the others, if possible.

    Without them wrk and the server fight for the same cores and req/s swing by tens of
    percent from run to run.
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if shutil.which("taskset") is None or len(cpus) < 2:
        return [], []
    rest = ",".join(str(cpu) for cpu in cpus[1:])
    return ["taskset", "-c", str(cpus[0])], ["taskset", "-c", rest]


@dataclass(frozen=True)
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS_MS[unit]


def parse_wrk(output: str) -> WrkResult:
    """Read requests/s, the 50th and 99th latency percentiles and errors from `wrk --latency`."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s|m)\b", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\b", output, re.MULTILINE)
    total = re.search(r"(\d+) requests in", output)
    if rps is None or p50 is None or p99 is None or total is None:
        raise RuntimeError(f"cannot read wrk's output:\n{output}")
    errors = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket_errors:
        errors += sum(int(group) for group in socket_errors.groups())
    return WrkResult(
        float(rps.group(1)),
        _ms(*p50.groups()),
        _ms(*p99.groups()),
        int(total.group(1)),
        errors,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as response:
        status: int = response.status
        return status


@contextlib.contextmanager
def _server(monitored: bool, database_url: str, log: Path, pin: list[str]) -> Iterator[str]:
    """Serve the benchmark app on a free loopback port; yield the item's URL."""
    port = _free_port()
    env = dict(os.environ, BENCH_MONITOR="1" if monitored else "0", BENCH_DATABASE_URL=database_url)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [
        *pin,
        sys.executable,
        "-m",
        "uvicorn",
        "benchmarks.http_app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    url = f"http://127.0.0.1:{port}/items/{ITEM_ID}"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log_file
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"uvicorn exited with {process.returncode}:\n{log.read_text()}"
                    )
                try:
                    if _get(url) == 200:
                        break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"uvicorn did not answer {url} within 30 s")
                time.sleep(0.1)
            for _ in range(20):
                _get(url)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wrk(url: str, settings: HttpSettings, duration_s: int, pin: list[str]) -> WrkResult:
    command = [
        *pin,
        "wrk",
        f"-t{settings.threads}",
        f"-c{settings.connections}",
        f"-d{duration_s}s",
        "--latency",
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)
    return parse_wrk(done.stdout)


def wrk_missing() -> str | None:
    if shutil.which("wrk") is None:
        return "wrk not found on PATH (install wrk to run the HTTP benchmark)"
    return None


def run(
    settings: HttpSettings, workdir: Path, progress: Callable[[str], None]
) -> tuple[list[Table], list[Target]]:
    summary = Table(
        "http",
        f"http: GET /items/{{id}}, wrk -t{settings.threads} -c{settings.connections} "
        f"-d{settings.duration_s}s, {settings.pairs} alternating pairs",
        (
            "app",
            "req/s (median)",
            "p50 ms (median)",
            "p99 ms (median)",
            "req/s ratio to bare (min-max)",
            "p99 ratio to bare",
            "target",
        ),
    )
    runs = Table(
        "http-runs",
        "http: every wrk run, in the order run",
        ("pair", "app", "req/s", "p50 ms", "p99 ms", "requests", "errors"),
    )
    missing = wrk_missing()
    if missing is not None:
        summary.add("bare", "skipped", "—", "—", "—", "—", "")
        summary.add("monitored", "skipped", "—", "—", "—", "—", "")
        summary.notes.append(f"skipped: {missing}")
        return [summary], []

    database_url = f"sqlite:///{workdir / 'http.db'}"
    prepare_database(database_url)
    results: dict[bool, list[WrkResult]] = {False: [], True: []}
    server_pin, wrk_pin = _pinning()
    with (
        _server(False, database_url, workdir / "uvicorn-bare.log", server_pin) as bare_url,
        _server(True, database_url, workdir / "uvicorn-monitored.log", server_pin) as monitored_url,
    ):
        urls = {False: bare_url, True: monitored_url}
        if settings.warmup_s > 0:
            for monitored in (False, True):
                _wrk(urls[monitored], settings, settings.warmup_s, wrk_pin)
        for pair in range(settings.pairs):
            progress(f"http pair {pair + 1}/{settings.pairs}")
            order = (False, True) if pair % 2 == 0 else (True, False)
            for monitored in order:
                result = _wrk(urls[monitored], settings, settings.duration_s, wrk_pin)
                results[monitored].append(result)
                runs.add(
                    pair + 1,
                    "monitored" if monitored else "bare",
                    f"{result.requests_per_s:.0f}",
                    f"{result.p50_ms:.2f}",
                    f"{result.p99_ms:.2f}",
                    result.requests,
                    result.errors,
                )

    rps_ratios = [
        m.requests_per_s / b.requests_per_s
        for b, m in zip(results[False], results[True], strict=True)
    ]
    p99_ratios = [m.p99_ms / b.p99_ms for b, m in zip(results[False], results[True], strict=True)]
    rps_ratio = statistics.median(rps_ratios)
    check = verdict(rps_ratio, TARGET_RPS_RATIO, at_least=True)
    for monitored in (False, True):
        measured = results[monitored]
        summary.add(
            "monitored" if monitored else "bare",
            f"{statistics.median(r.requests_per_s for r in measured):.0f}",
            f"{statistics.median(r.p50_ms for r in measured):.2f}",
            f"{statistics.median(r.p99_ms for r in measured):.2f}",
            f"{rps_ratio:.3f} ({min(rps_ratios):.3f}-{max(rps_ratios):.3f})"
            if monitored
            else "1.000",
            f"{statistics.median(p99_ratios):.3f}" if monitored else "1.000",
            check if monitored else "",
        )
    errors = sum(r.errors for measured in results.values() for r in measured)
    summary.notes.append(
        "benchmarks/http_app.py: example_app's request path (sync get_db, ORM get, pydantic "
        "response) with a switch for monitoring; one uvicorn worker per app, SQLite file "
        "database; "
        + (
            f"servers pinned to CPU {' '.join(server_pin[2:])}, wrk to CPU {' '.join(wrk_pin[2:])}."
            if server_pin
            else "wrk runs on the same cores as the server."
        )
    )
    if errors:
        summary.notes.append(f"{errors} failed requests (non-2xx or socket errors): see runs")
    inside = min(rps_ratios) <= TARGET_RPS_RATIO <= max(rps_ratios)
    target = Target(
        "HTTP req/s, monitored over bare",
        f"{rps_ratio:.3f}x ({min(rps_ratios):.3f}-{max(rps_ratios):.3f})",
        check,
        f"the bar lies inside this run's pair-to-pair range ({min(rps_ratios):.3f}-"
        f"{max(rps_ratios):.3f}): not told apart from noise; per request the monitor adds "
        "the instructions the instructions table shows"
        if inside
        else WHY_BOOKKEEPING,
    )
    return [summary, runs], [target]
