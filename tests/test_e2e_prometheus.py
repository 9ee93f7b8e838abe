"""End to end: the example app under uvicorn, a real Prometheus with the project's rules, the dashboard.

On SQLite and on PostgreSQL: start the example app with a pool small enough to run out, start
Prometheus scraping it every second with `prometheus/rules/` loaded, drive the load generator with
every failure (leaks, pool-exhausting bursts), then ask Prometheus for every panel's query of
`grafana/dashboards/session_monitor.json` and require an answer for each, require the leak and
checkout-timeout alerts to fire, and require Prometheus's leak and timeout counts to equal the
app's own. Nothing is installed here: `prometheus` comes from the PATH (`.ci/run` installs it).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from _e2e_servers import (
    HOST,
    PrometheusAPI,
    Server,
    Servers,
    app_metric_total,
    eventually,
    free_port,
    require_prometheus,
    wait_for_http,
    write_prometheus_config,
)
from dashboard_queries import panel_queries
from psycopg import sql
from sqlalchemy import make_url

from example_app.loadgen import NO_RESPONSE, LoadSummary, run_load

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_PATH = ROOT / "grafana" / "dashboards" / "session_monitor.json"

# 3 + 2 connections, given up after 0.5 s: the loadgen's /demo/hold bursts (capacity + 4 requests
# holding a connection for 3 s each) make checkouts time out, and leaks eat into the rest.
POOL_ENV = {"POOL_SIZE": "3", "MAX_OVERFLOW": "2", "POOL_TIMEOUT": "0.5"}
LOAD_SECONDS = 8.0
LOAD_ROUNDS = 3
STARTUP_TIMEOUT = 30.0
SETTLE_TIMEOUT = 30.0
PANEL_TIMEOUT = 30.0
ALERT_TIMEOUT = 30.0
ALERTS = ("SQLAlchemySessionLeaked", "SQLAlchemyPoolCheckoutTimeouts")
LEAK_METRIC = "sqlalchemy_sessions_leaked_total"
TIMEOUT_METRIC = "db_client_connection_timeouts_total"
# Responses that leaked exactly one session each (see example_app/demo.py).
LEAKING_RESPONSES = (
    ("GET /demo/leak", 200),
    ("GET /demo/leak-on-error", 500),
    ("GET /demo/gc-leak", 200),
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def prometheus() -> str:
    return require_prometheus()


@contextmanager
def temporary_postgres_database(url: str) -> Iterator[str]:
    """Create a database of its own for one test and drop it after; yield its SQLAlchemy URL."""
    server = make_url(url)
    admin = server.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"session_monitor_e2e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        # The example app is synchronous: psycopg, whatever driver the URL names.
        app_url = server.set(drivername="postgresql+psycopg", database=name)
        yield app_url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'e2e.db'}"
        return
    with temporary_postgres_database(request.getfixturevalue("postgres_url")) as url:
        yield url


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    # Requested after database_url, so torn down first: the app is gone before its database.
    started = Servers(tmp_path)
    yield started
    leftovers = started.stop_all()
    assert not leftovers, f"still running after the test: {leftovers}"


def start_app(servers: Servers, database_url: str) -> Server:
    port = free_port()
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("PROMETHEUS_MULTIPROC_DIR", "OTEL_EXPORTER_OTLP_ENDPOINT")
    }
    env |= {"DATABASE_URL": database_url, "PYTHONUNBUFFERED": "1", **POOL_ENV}
    command = [sys.executable, "-m", "uvicorn", "example_app.app:app"]
    command += ["--host", HOST, "--port", str(port), "--no-access-log"]
    app = servers.start("uvicorn", command, port=port, env=env)
    wait_for_http(app, "/metrics", timeout=STARTUP_TIMEOUT)
    return app


def start_prometheus(
    servers: Servers, binary: str, directory: Path, app: Server
) -> tuple[Server, str]:
    """Start Prometheus scraping `app`; return it and the job name its series carry."""
    config = directory / "prometheus.yml"
    job = write_prometheus_config(config, target=f"{HOST}:{app.port}")
    port = free_port()
    command = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={directory / 'prometheus-data'}",
        f"--web.listen-address={HOST}:{port}",
    ]
    prometheus = servers.start("prometheus", command, port=port, env=os.environ)
    wait_for_http(prometheus, "/-/ready", timeout=STARTUP_TIMEOUT)
    return prometheus, job


def answered(summaries: list[LoadSummary], endpoint: str, status: int) -> int:
    return sum(s.endpoints[endpoint].statuses[status] for s in summaries if endpoint in s.endpoints)


def drive_load(app_url: str) -> list[LoadSummary]:
    """Run the load generator until a round has had a leak and a pool-exhausting burst."""
    summaries: list[LoadSummary] = []
    for seed in range(LOAD_ROUNDS):
        summary = asyncio.run(
            run_load(app_url, duration=LOAD_SECONDS, concurrency=8, seed=seed, failures=True)
        )
        summaries.append(summary)
        assert not summary.lost_connection, summary.render()
        assert summary.metrics is not None, summary.render()
        leaked = sum(answered([summary], *response) for response in LEAKING_RESPONSES)
        if leaked and answered([summary], "GET /demo/hold", 503):
            break
    return summaries


def describe_alerts(alerts: list[dict[str, Any]]) -> str:
    return (
        "\n".join(
            f"  {a['labels'].get('alertname')} {a['state']} {a['labels']} value={a.get('value')}"
            for a in alerts
        )
        or "  (none)"
    )


def test_every_panel_answers_and_the_alerts_fire(
    prometheus: str, database_url: str, servers: Servers, tmp_path: Path
) -> None:
    app = start_app(servers, database_url)
    prometheus_server, job = start_prometheus(servers, prometheus, tmp_path, app)
    instance = f"{HOST}:{app.port}"
    selector = f'{{job="{job}",instance="{instance}"}}'

    with closing(PrometheusAPI(prometheus_server.url)) as api:
        rules = {rule["name"] for group in api.rule_groups() for rule in group["rules"]}
        assert set(ALERTS) <= rules, f"the project's rules were not loaded: {sorted(rules)}"
        assert eventually(
            lambda: any(t["health"] == "up" for t in api.targets()), timeout=STARTUP_TIMEOUT
        ), f"Prometheus never scraped the app: {api.targets()}\n{prometheus_server.describe()}"

        summaries = drive_load(app.url)
        report = "\n\n".join(s.render() for s in summaries)
        leaking_responses = sum(answered(summaries, *response) for response in LEAKING_RESPONSES)
        timed_out = sum(s.statuses()[503] for s in summaries)
        assert sum(s.statuses()[NO_RESPONSE] for s in summaries) == 0, report
        assert answered(summaries, "GET /demo/hold", 200), f"no /demo/hold burst ran:\n{report}"
        assert leaking_responses > 0, f"no leak in {len(summaries)} rounds:\n{report}"
        assert timed_out > 0, f"no checkout timed out in {len(summaries)} rounds:\n{report}"
        leaked_per_summaries = sum(
            sum(s.metrics.sessions_leaked.values()) for s in summaries if s.metrics
        )
        assert leaked_per_summaries >= leaking_responses, report
        # Every 503 is a pool timeout and every pool timeout a 503.
        assert sum(s.metrics.connection_timeouts for s in summaries if s.metrics) == timed_out

        # Ground truth: the app's own counters, read again until Prometheus has scraped the same
        # values (a "gc" leak may still be counted after the load generator's last scrape).
        seen: dict[str, tuple[float, float | None]] = {}

        def scraped_the_end() -> bool:
            for metric in (LEAK_METRIC, TIMEOUT_METRIC):
                in_app = app_metric_total(app.url, metric)
                seen[metric] = (in_app, api.value(f"sum({metric}{selector})"))
            return all(in_app == in_prometheus for in_app, in_prometheus in seen.values())

        assert eventually(scraped_the_end, timeout=SETTLE_TIMEOUT), (
            f"Prometheus never caught up with the app's /metrics, (app, Prometheus): {seen}"
        )
        assert seen[LEAK_METRIC][0] >= leaked_per_summaries, (seen, report)
        assert seen[TIMEOUT_METRIC][0] == timed_out, (seen, report)
        # Failures inside the monitor are swallowed and counted: under all this there must be none.
        assert app_metric_total(app.url, "session_monitor_internal_errors_total") == 0, (
            app.describe()
        )

        with DASHBOARD_PATH.open(encoding="utf-8") as f:
            dashboard = json.load(f)
        variables = {
            "job": job,
            "instance": instance,
            "pool_name": ".*",
            "route": ".*",
            "__rate_interval": "30s",
            "__range": "5m",
            "__interval": "1s",
        }
        queries = panel_queries(dashboard, variables)
        assert queries, "the dashboard has no queries"
        if database_url.startswith("sqlite"):
            # What the server allows is PostgreSQL's to say (docs/database.md): no series here.
            queries = [q for q in queries if "session_monitor_server_connections_allowed" not in q[1]]
        empty = list(queries)

        def every_panel_answers() -> bool:
            empty[:] = [(title, expr) for title, expr in empty if not api.query(expr)]
            return not empty

        assert eventually(every_panel_answers, timeout=PANEL_TIMEOUT, interval=1.0), (
            f"{len(empty)} of {len(queries)} dashboard queries came back empty:\n"
            + "\n".join(f"  {title}: {expr}" for title, expr in empty)
            + f"\n\nload:\n{report}"
        )

        alerts: list[dict[str, Any]] = []

        def alerts_fire() -> bool:
            alerts[:] = api.alerts()
            firing = {a["labels"].get("alertname") for a in alerts if a["state"] == "firing"}
            return set(ALERTS) <= firing

        assert eventually(alerts_fire, timeout=ALERT_TIMEOUT), (
            f"expected {', '.join(ALERTS)} to be firing; alerts seen:\n{describe_alerts(alerts)}"
        )
        for alert in alerts:
            if alert["labels"].get("alertname") in ALERTS:
                assert alert["labels"]["job"] == job
                assert alert["labels"]["instance"] == instance
