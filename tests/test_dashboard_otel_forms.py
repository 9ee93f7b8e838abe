"""The Pool row on pools that OpenTelemetry exports to Prometheus, end to end.

A service instrumented with the OpenTelemetry SDK, whose pool metrics follow the semantic
conventions (`db.client.connection.*`) and are exposed by OpenTelemetry's own Prometheus exporter
(opentelemetry-exporter-prometheus's PrometheusMetricReader), beside a session_monitor in the same
Prometheus: a real Prometheus scrapes both, and then

- the exporter's names and labels are what the dashboard expects (the same metric names as
  session_monitor's, but `db_client_connection_pool_name` / `db_client_connection_state` where
  session_monitor says `pool_name` / `state`);
- the Pool variable's query finds the pools of both forms;
- every query of the Pool row and the Overview that reads a semantic-convention metric answers for
  the exporter's pool alone, and what reads only session_monitor's own metrics is the list below;
- with every pool selected (the variable's All), no pool is counted twice or lost.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import yaml
from _e2e_servers import (
    HOST,
    PrometheusAPI,
    Servers,
    eventually,
    free_port,
    require_prometheus,
    wait_for_http,
)
from dashboard_queries import iter_panels, metric_names, substitute
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, start_http_server
from sqlalchemy import create_engine, text
from sqlalchemy.pool import QueuePool

from session_monitor import SessionMonitor

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_PATH = ROOT / "grafana" / "dashboards" / "session_monitor.json"

OTEL_POOL = "orders-db:5432/orders"
OWN_POOL = "app"
JOB = "pools"
# The semantic conventions' pool metrics as OpenTelemetry's exporter names them: the unit `s`
# becomes `_seconds`, `{connection}`-style annotations add nothing, a Counter gets `_total`, and the
# UpDownCounters become gauges. Exactly session_monitor's names (tests/test_dashboard.py).
EXPORTED_NAMES = {
    "db_client_connection_count",
    "db_client_connection_max",
    "db_client_connection_pending_requests",
    "db_client_connection_timeouts_total",
    *(
        f"db_client_connection_{kind}_seconds_{part}"
        for kind in ("wait_time", "use_time", "create_time")
        for part in ("bucket", "sum", "count")
    ),
}
# Panels (and refIds) that read only session_monitor's own sqlalchemy_pool_* metrics: empty for
# any other source's pools, as their descriptions say.
OWN_ONLY = {
    ("Connection invalidations", "A"),
    ("Checkouts that waited", "A"),
    ("Cancelled checkout waits", "A"),
    ("Peak connections in use vs max", "A"),
}
IDLE, USED, MAX, PENDING = 3, 2, 10, 1
STARTUP_TIMEOUT = 30.0
ANSWER_TIMEOUT = 30.0
TICK = 0.1

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def serve(registry: CollectorRegistry) -> tuple[int, Callable[[], None]]:
    """Serve `registry` over HTTP on a free port; return the port and how to stop it."""
    port = free_port()
    server, thread = start_http_server(port, addr=HOST, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return port, stop


@pytest.fixture(scope="module")
def otel_service() -> Iterator[int]:
    """A service's pool, instrumented as the conventions say and exported by OpenTelemetry's
    Prometheus exporter; its checkouts and timeouts go on until the test ends. Yields the port."""
    registry = CollectorRegistry()
    reader = PrometheusMetricReader(registry=registry)
    provider = MeterProvider(
        metric_readers=[reader], resource=Resource.create({"service.name": "orders"})
    )
    meter = provider.get_meter("orders.db.pool")
    pool = {"db.client.connection.pool.name": OTEL_POOL}
    count = meter.create_up_down_counter("db.client.connection.count", unit="{connection}")
    count.add(IDLE, {**pool, "db.client.connection.state": "idle"})
    count.add(USED, {**pool, "db.client.connection.state": "used"})
    meter.create_up_down_counter("db.client.connection.max", unit="{connection}").add(MAX, pool)
    pending = meter.create_up_down_counter(
        "db.client.connection.pending_requests", unit="{request}"
    )
    pending.add(PENDING, pool)
    timeouts = meter.create_counter("db.client.connection.timeouts", unit="{timeout}")
    wait_time = meter.create_histogram("db.client.connection.wait_time", unit="s")
    use_time = meter.create_histogram("db.client.connection.use_time", unit="s")
    create_time = meter.create_histogram("db.client.connection.create_time", unit="s")

    stopping = threading.Event()

    def traffic() -> None:
        while not stopping.wait(TICK):
            wait_time.record(0.002, pool)
            use_time.record(0.05, pool)
            create_time.record(0.01, pool)
            timeouts.add(1, pool)

    worker = threading.Thread(target=traffic, name="otel-pool-traffic", daemon=True)
    worker.start()
    port, stop = serve(registry)
    try:
        yield port
    finally:
        stopping.set()
        worker.join(timeout=5)
        stop()
        provider.shutdown()


@pytest.fixture(scope="module")
def own_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """session_monitor's own form of the same metrics, one connection held; yields the port."""
    registry = CollectorRegistry()
    database = tmp_path_factory.mktemp("own") / "app.db"
    engine = create_engine(
        f"sqlite:///{database}",
        poolclass=QueuePool,
        pool_size=2,
        max_overflow=1,
        connect_args={"check_same_thread": False},
    )
    monitor = SessionMonitor(engine, registry=registry, pool_name=OWN_POOL)
    port, stop = serve(registry)
    try:
        with engine.connect() as warm:
            warm.execute(text("SELECT 1"))
        with engine.connect() as held:
            held.execute(text("SELECT 1"))
            yield port
    finally:
        stop()
        monitor.uninstrument()
        engine.dispose()


@pytest.fixture(scope="module")
def prometheus_api(
    otel_service: int, own_service: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusAPI]:
    """A real Prometheus scraping both services every second."""
    binary = require_prometheus()
    tmp_path = tmp_path_factory.mktemp("prometheus")
    config = tmp_path / "prometheus.yml"
    targets = [f"{HOST}:{otel_service}", f"{HOST}:{own_service}"]
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": targets}]}],
            }
        ),
        encoding="utf-8",
    )
    servers = Servers(tmp_path)
    port = free_port()
    prometheus = servers.start(
        "prometheus",
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
            f"--web.listen-address={HOST}:{port}",
        ],
        port=port,
        env=os.environ,
    )
    try:
        wait_for_http(prometheus, "/-/ready", timeout=STARTUP_TIMEOUT)
        with closing(PrometheusAPI(prometheus.url)) as api:
            assert eventually(
                lambda: sum(t["health"] == "up" for t in api.targets()) == 2,
                timeout=STARTUP_TIMEOUT,
            ), f"Prometheus did not scrape both services: {api.targets()}\n{prometheus.describe()}"
            yield api
    finally:
        leftovers = servers.stop_all()
        assert not leftovers, leftovers


def load_dashboard() -> dict[str, Any]:
    with DASHBOARD_PATH.open(encoding="utf-8") as f:
        dashboard: dict[str, Any] = json.load(f)
    return dashboard


def pool_targets(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(title, refId, expr) of every target of the Pool row and the Overview's pool panels."""
    found = []
    row = None
    for panel in iter_panels(dashboard):
        if panel.get("type") == "row":
            row = panel["title"]
            continue
        for target in panel.get("targets", []):
            names = metric_names(target["expr"])
            if row == "Pool" or any(n.startswith("db_client_connection_") for n in names):
                found.append((panel["title"], target["refId"], target["expr"]))
    return found


def variables(pool: str) -> dict[str, str]:
    return {
        "job": JOB,
        "instance": ".*",
        "pool_name": pool,
        "route": ".*",
        "__rate_interval": "30s",
        "__range": "5m",
        "__interval": "1s",
    }


def test_the_exporters_form(prometheus_api: PrometheusAPI) -> None:
    """What OpenTelemetry's Prometheus exporter makes of the conventions: the same names as
    session_monitor's, labels named after the attributes."""
    selector = (
        f'{{__name__=~"db_client_connection_.+",db_client_connection_pool_name="{OTEL_POOL}"}}'
    )
    seen: list[dict[str, Any]] = []

    def all_there() -> bool:
        seen[:] = prometheus_api.query(selector)
        return {s["metric"]["__name__"] for s in seen} >= EXPORTED_NAMES

    assert eventually(all_there, timeout=ANSWER_TIMEOUT), sorted(
        {s["metric"]["__name__"] for s in seen}
    )
    assert {s["metric"]["__name__"] for s in seen} == EXPORTED_NAMES
    for sample in seen:
        assert "pool_name" not in sample["metric"], sample["metric"]
        assert "state" not in sample["metric"], sample["metric"]
    states = {
        s["metric"]["db_client_connection_state"]: float(s["value"][1])
        for s in seen
        if s["metric"]["__name__"] == "db_client_connection_count"
    }
    assert states == {"idle": IDLE, "used": USED}


def test_the_pool_variable_finds_both_forms(prometheus_api: PrometheusAPI) -> None:
    (variable,) = [v for v in load_dashboard()["templating"]["list"] if v["name"] == "pool_name"]
    match = re.fullmatch(r"query_result\((.+)\)", variable["query"]["query"])
    assert match, variable["query"]
    query = substitute(match.group(1), variables(variable["allValue"]))
    pattern = re.compile(variable["regex"].strip("/"))
    pools: set[str] = set()

    def both_found() -> bool:
        # Grafana matches the regex against query_result's lines: {labels} value timestamp.
        lines = [
            "{"
            + ",".join(f'{k}="{v}"' for k, v in s["metric"].items())
            + f"}} {s['value'][1]} {int(s['value'][0] * 1000)}"
            for s in prometheus_api.query(query)
        ]
        pools.clear()
        pools.update(m.group(1) for line in lines if (m := pattern.search(line)))
        return pools == {OTEL_POOL, OWN_POOL}

    assert eventually(both_found, timeout=ANSWER_TIMEOUT), pools


def test_every_semconv_query_answers_for_the_exporters_pool(
    prometheus_api: PrometheusAPI,
) -> None:
    targets = pool_targets(load_dashboard())
    own_only = {
        (title, ref)
        for title, ref, expr in targets
        if all(n.startswith("sqlalchemy_pool_") for n in metric_names(expr))
    }
    assert own_only == OWN_ONLY
    # Only the exporter's pool selected: session_monitor's series cannot answer for it.
    queries = [
        (f"{title} {ref}", substitute(expr, variables(OTEL_POOL)))
        for title, ref, expr in targets
        if (title, ref) not in OWN_ONLY
    ]
    empty = list(queries)

    def every_query_answers() -> bool:
        empty[:] = [(name, expr) for name, expr in empty if not prometheus_api.query(expr)]
        return not empty

    assert eventually(every_query_answers, timeout=ANSWER_TIMEOUT, interval=1.0), (
        f"{len(empty)} of {len(queries)} queries came back empty for {OTEL_POOL}:\n"
        + "\n".join(f"  {name}: {expr}" for name, expr in empty)
    )
    # The stat answers in any case (`or vector(0)`): it must count the exporter's timeouts.
    (last_hour,) = [e for t, _, e in targets if t == "Checkout timeouts (last 1h)"]
    counted = prometheus_api.value(substitute(last_hour, variables(OTEL_POOL)))
    assert counted is not None and counted > 0, counted
    for title, ref, expr in targets:
        if (title, ref) in OWN_ONLY:
            assert not prometheus_api.query(substitute(expr, variables(OTEL_POOL)))


def test_all_pools_each_counted_once(prometheus_api: PrometheusAPI) -> None:
    """The variable's All: both forms side by side, no pool counted twice, none without a name."""
    dashboard = load_dashboard()
    (all_value,) = [
        v["allValue"] for v in dashboard["templating"]["list"] if v["name"] == "pool_name"
    ]
    exprs = {(title, ref): expr for title, ref, expr in pool_targets(dashboard)}

    def query(title: str, ref: str = "A") -> dict[tuple[str, ...], float]:
        result = prometheus_api.query(substitute(exprs[title, ref], variables(all_value)))
        return {
            tuple(f"{k}={v}" for k, v in sorted(s["metric"].items())): float(s["value"][1])
            for s in result
        }

    def settled() -> bool:
        return len(query("Connections: used / idle vs max")) == 4

    assert eventually(settled, timeout=ANSWER_TIMEOUT), query("Connections: used / idle vs max")
    connections = query("Connections: used / idle vs max")
    assert set(connections) == {
        (f"pool_name={pool}", f"state={state}")
        for pool in (OTEL_POOL, OWN_POOL)
        for state in ("idle", "used")
    }
    assert connections[(f"pool_name={OTEL_POOL}", "state=idle")] == IDLE
    assert connections[(f"pool_name={OTEL_POOL}", "state=used")] == USED
    assert connections[(f"pool_name={OWN_POOL}", "state=used")] == 1
    maximum = query("Connections: used / idle vs max", "B")
    assert maximum == {(f"pool_name={OTEL_POOL}",): MAX, (f"pool_name={OWN_POOL}",): 3}
    utilisation = query("Pool utilisation")
    assert utilisation == {
        (f"pool_name={OTEL_POOL}",): USED / MAX,
        (f"pool_name={OWN_POOL}",): 1 / 3,
    }
    assert query("Pending checkout requests") == {
        (f"pool_name={OTEL_POOL}",): PENDING,
        (f"pool_name={OWN_POOL}",): 0,
    }
    # Every series of every pool query names one of the two pools: none counted a second time
    # without one (which is what `.*` for All would do).
    for (title, ref), expr in exprs.items():
        if re.search(r"\bby \([^)]*\bpool_name\b", expr):
            for labels in query(title, ref):
                pools = [label for label in labels if label.startswith("pool_name=")]
                assert pools in ([f"pool_name={OTEL_POOL}"], [f"pool_name={OWN_POOL}"]), (
                    f"{title} {ref}: {labels}"
                )
