"""Real servers for the end-to-end test: start them, wait for them, talk to them, stop them all.

    servers = Servers(tmp_path)
    app = servers.start("uvicorn", [sys.executable, "-m", "uvicorn", ...], port=port, env=env)
    wait_for_http(app, "/metrics", timeout=20)
    ...
    leftovers = servers.stop_all()      # [] when every process ended and its port is free again

Everything listens on 127.0.0.1 only, and every HTTP client here ignores proxy settings.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PROMETHEUS_CONFIG = ROOT / "prometheus" / "prometheus.yml"
HOST = "127.0.0.1"
STOP_TIMEOUT = 15.0


def require_prometheus() -> str:
    """Return the path of `prometheus`; skip without it, except on CI where that is a failure."""
    path = shutil.which("prometheus")
    if path is None:
        reason = "prometheus is not on PATH (Debian/Ubuntu: apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must install it", pytrace=False)
        pytest.skip(reason)
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
    return port


def port_is_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex((HOST, port)) == 0


def http_client(base_url: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, timeout=5.0, trust_env=False)


def eventually(check: Callable[[], bool], *, timeout: float, interval: float = 0.5) -> bool:
    """Call `check` until it returns True or `timeout` seconds have passed; return its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def workers_of(supervisor: int) -> list[int]:
    """The live worker processes of a server's supervisor (uvicorn's, gunicorn's master)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            # pid (comm) state ppid ...: comm may hold spaces, so split after its parenthesis
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[1]) == supervisor:
                command = Path(f"/proc/{entry}/cmdline").read_bytes()
                if b"resource_tracker" not in command:  # multiprocessing's helper, no worker
                    children.append(int(entry))
    return children


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def describe(self) -> str:
        return f"{self.name} (pid {self.process.pid}, {self.url}); last lines of its log:\n{self.log_tail()}"


class Servers:
    """Every process the test started; `stop_all()` ends them, newest first."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._started: list[Server] = []

    def start(
        self, name: str, command: Sequence[str], *, port: int, env: Mapping[str, str]
    ) -> Server:
        log = self._directory / f"{name}.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                list(command),
                cwd=ROOT,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        server = Server(name, process, port, log)
        self._started.append(server)
        return server

    def stop_all(self) -> list[str]:
        """Stop every process (terminate, wait, kill); return what is still running or listening."""
        leftovers: list[str] = []
        for server in reversed(self._started):
            _stop(server.process)
            if server.process.poll() is None:
                leftovers.append(f"{server.name} (pid {server.process.pid}) is still running")
            elif port_is_open(server.port):
                leftovers.append(f"something still listens on {server.name}'s port {server.port}")
        return leftovers


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)


def wait_for_http(server: Server, path: str, *, timeout: float) -> None:
    """Wait until `path` answers 200; fail with the server's log if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with http_client(server.url) as client:
        while True:
            if server.process.poll() is not None:
                pytest.fail(
                    f"{server.name} exited with {server.process.returncode} while starting: "
                    f"{server.describe()}",
                    pytrace=False,
                )
            try:
                response = client.get(path)
            except httpx.TransportError as error:
                last = repr(error)
            else:
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}"
            if time.monotonic() >= deadline:
                pytest.fail(
                    f"{server.url}{path} did not answer 200 within {timeout:.0f} s ({last}): "
                    f"{server.describe()}",
                    pytrace=False,
                )
            time.sleep(0.1)


def write_prometheus_config(path: Path, *, target: str, interval: str = "1s") -> str:
    """Write the project's Prometheus config, scraping `target` every `interval`; return the job.

    Same rule files (made absolute, as globs relative to the project's config), same job name and
    metrics path; only the intervals and the target differ.
    """
    with PROJECT_PROMETHEUS_CONFIG.open(encoding="utf-8") as f:
        config: dict[str, Any] = yaml.safe_load(f)
    (job,) = config["scrape_configs"]
    config["global"] = {"scrape_interval": interval, "evaluation_interval": interval}
    config["rule_files"] = [
        str(PROJECT_PROMETHEUS_CONFIG.parent / pattern) for pattern in config["rule_files"]
    ]
    job["scrape_interval"] = interval
    job["static_configs"] = [{"targets": [target]}]
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    name: str = job["job_name"]
    return name


class PrometheusAPI:
    """The few calls of Prometheus's HTTP API the test makes."""

    def __init__(self, base_url: str) -> None:
        self._client = http_client(base_url)

    def close(self) -> None:
        self._client.close()

    def _get(self, path: str, **params: str) -> Any:
        response = self._client.get(path, params=params)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise AssertionError(f"GET {path} {params} answered {response.status_code}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Evaluate `expr` now; a scalar or string answer comes back as one sample."""
        data = self._get("/api/v1/query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The value of a one-sample answer, None when the answer is empty."""
        result = self.query(expr)
        if not result:
            return None
        if len(result) > 1:
            raise AssertionError(f"{expr} returned {len(result)} series, expected one: {result}")
        return float(result[0]["value"][1])

    def alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = self._get("/api/v1/alerts")["alerts"]
        return alerts

    def targets(self) -> list[dict[str, Any]]:
        targets: list[dict[str, Any]] = self._get("/api/v1/targets")["activeTargets"]
        return targets

    def rule_groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = self._get("/api/v1/rules")["groups"]
        return groups


def app_metric_total(app_url: str, name: str) -> float:
    """Sum of every sample called `name` on the app's /metrics right now (0 when absent)."""
    with http_client(app_url) as client:
        response = client.get("/metrics")
    response.raise_for_status()
    total = 0.0
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and not math.isnan(sample.value):
                total += sample.value
    return total
