"""The dashboard's pool queries on both ways a pool reaches Prometheus, end to end.

Two services, each with a real SQLAlchemy pool, scraped by a real Prometheus:

- session_monitor's own Prometheus exporter (`SessionMonitor(engine, registry=...)`), and
- OpenTelemetry's: a service instrumented with opentelemetry-instrumentation-sqlalchemy and
  session_monitor's OpenTelemetry instruments (no Prometheus registry of the monitor's), whose
  metrics reach Prometheus only through OpenTelemetry's own Prometheus exporter
  (opentelemetry-exporter-prometheus's PrometheusMetricReader).

The semantic conventions' pool metrics (`db.client.connection.*`) come out of both with the same
names and the same labels (`db_client_connection_pool_name`, `db_client_connection_state`), so
each dashboard query has one branch: every Pool panel that reads a semantic-convention metric
answers for either pool alone, and with every pool selected each pool is counted once.
Panels that read only session_monitor's own `sqlalchemy_pool_*` metrics are the listed ones.
OpenTelemetry's SQLAlchemy instrumentation itself writes the deprecated
`db.client.connections.usage` (attributes `pool.name`, `state`), which the dashboard does not
read: test_the_sqlalchemy_instrumentations_own_metric pins it.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
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
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, start_http_server
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import QueuePool

from session_monitor import SessionMonitor
from session_monitor.exporters.metric_table import POOL_LABEL, STATE_LABEL

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_PATH = ROOT / "grafana" / "dashboards" / "session_monitor.json"

OTEL_POOL = "orders"
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
# a pool whose metrics reach Prometheus another way, as their descriptions say.
OWN_ONLY = {
    ("Connection invalidations", "A"),
    ("Checkouts that waited", "A"),
    ("Cancelled checkout waits", "A"),
    ("Peak connections in use vs max", "A"),
}
POOL_SIZE, MAX_OVERFLOW = 2, 1
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


def small_pool(database: Path) -> Engine:
    return create_engine(
        f"sqlite:///{database}",
        poolclass=QueuePool,
        pool_size=POOL_SIZE,
        max_overflow=MAX_OVERFLOW,
        pool_timeout=0.05,
        connect_args={"check_same_thread": False},
    )


def time_out_once(engine: Engine, held: int) -> None:
    """Take every connection but the `held` ones, then ask for one more: a checkout that waits
    and times out."""
    taken = [engine.connect() for _ in range(POOL_SIZE + MAX_OVERFLOW - held)]
    try:
        with pytest.raises(PoolTimeout):
            engine.connect()
    finally:
        for connection in taken:
            connection.close()


@contextmanager
def traffic(engine: Engine) -> Iterator[None]:
    """One connection held throughout; beside it checkouts every tick, and now and then one
    that waits and times out, until the block ends."""
    stopping = threading.Event()

    def run() -> None:
        rounds = 0
        while not stopping.wait(TICK):
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            rounds += 1
            if rounds % 10 == 1:
                time_out_once(engine, held=1)

    worker = threading.Thread(target=run, name="pool-traffic", daemon=True)
    with engine.connect() as held:
        held.execute(text("SELECT 1"))
        worker.start()
        try:
            yield
        finally:
            stopping.set()
            worker.join(timeout=5)


@pytest.fixture(scope="module")
def otel_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A service whose pool metrics reach Prometheus through OpenTelemetry's exporter alone:
    opentelemetry-instrumentation-sqlalchemy and session_monitor's OpenTelemetry instruments on
    one real pool, checkouts and a timeout now and then until the test ends, one connection
    held. Yields the port."""
    registry = CollectorRegistry()
    reader = PrometheusMetricReader(registry=registry)
    meters = MeterProvider(
        metric_readers=[reader], resource=Resource.create({"service.name": "orders"})
    )
    tracers = TracerProvider()
    engine = small_pool(tmp_path_factory.mktemp("otel") / "orders.db")
    instrumentor = SQLAlchemyInstrumentor()
    instrumentor.instrument(
        engine=engine, meter_provider=meters, tracer_provider=tracers, skip_dep_check=True
    )
    monitor = SessionMonitor(
        engine,
        registry=None,
        pool_name=OTEL_POOL,
        meter_provider=meters,
        tracer_provider=tracers,
        log_leaks=False,
    )
    port, stop = serve(registry)
    try:
        with traffic(engine):
            yield port
    finally:
        stop()
        monitor.uninstrument()
        instrumentor.uninstrument()
        engine.dispose()
        meters.shutdown()
        tracers.shutdown()


@pytest.fixture(scope="module")
def own_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The same pool and traffic, exported by session_monitor's own Prometheus exporter; yields
    the port."""
    registry = CollectorRegistry()
    engine = small_pool(tmp_path_factory.mktemp("own") / "app.db")
    monitor = SessionMonitor(engine, registry=registry, pool_name=OWN_POOL, log_leaks=False)
    port, stop = serve(registry)
    try:
        with traffic(engine):
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
    """What OpenTelemetry's Prometheus exporter makes of the conventions: session_monitor's
    names and labels, and the instrumentation scope's labels besides."""
    selector = f'{{__name__=~"db_client_connection_.+",{POOL_LABEL}="{OTEL_POOL}"}}'
    seen: list[dict[str, Any]] = []

    def all_there() -> bool:
        seen[:] = prometheus_api.query(selector)
        return {s["metric"]["__name__"] for s in seen} >= EXPORTED_NAMES

    assert eventually(all_there, timeout=ANSWER_TIMEOUT), sorted(
        {s["metric"]["__name__"] for s in seen}
    )
    assert {s["metric"]["__name__"] for s in seen} == EXPORTED_NAMES
    for sample in seen:
        assert sample["metric"]["otel_scope_name"] == "session_monitor", sample["metric"]
    own = prometheus_api.query(f'{{__name__=~"db_client_connection_.+",{POOL_LABEL}="{OWN_POOL}"}}')
    assert {s["metric"]["__name__"] for s in own} == EXPORTED_NAMES
    for form in (seen, own):
        counts = [
            s["metric"] for s in form if s["metric"]["__name__"] == "db_client_connection_count"
        ]
        assert {m[STATE_LABEL] for m in counts} == {"idle", "used"}


def test_the_sqlalchemy_instrumentations_own_metric(prometheus_api: PrometheusAPI) -> None:
    """opentelemetry-instrumentation-sqlalchemy writes only the deprecated connection usage
    metric, with the deprecated attributes: the dashboard reads the conventions' metrics, which
    come from session_monitor. When this fails, the instrumentation follows the current
    conventions: see whether its pool metrics can feed the Pool row."""
    usage: list[dict[str, Any]] = []

    def found() -> bool:
        usage[:] = prometheus_api.query('{__name__=~"db_client_connections_usage.*"}')
        return bool(usage)

    assert eventually(found, timeout=ANSWER_TIMEOUT)
    assert {s["metric"]["__name__"] for s in usage} == {"db_client_connections_usage_connections"}
    assert {s["metric"]["state"] for s in usage} == {"idle", "used"}
    assert all("pool_name" in s["metric"] for s in usage), usage


def test_the_pool_variable_lists_both(prometheus_api: PrometheusAPI) -> None:
    (variable,) = [v for v in load_dashboard()["templating"]["list"] if v["name"] == "pool_name"]
    query = variable["query"]["query"]
    assert query.endswith(f", {POOL_LABEL})"), query
    # label_values(<selector>, <label>): Grafana asks Prometheus for the series and lists the label.
    selector = substitute(query.removeprefix("label_values(").rsplit(",", 1)[0], variables(".*"))
    pools: set[str] = set()

    def both_found() -> bool:
        pools.clear()
        pools.update(s["metric"][POOL_LABEL] for s in prometheus_api.query(selector))
        return pools == {OTEL_POOL, OWN_POOL}

    assert eventually(both_found, timeout=ANSWER_TIMEOUT), pools


@pytest.mark.parametrize("pool", [OTEL_POOL, OWN_POOL])
def test_every_pool_query_answers_for_each_pool_alone(
    prometheus_api: PrometheusAPI, pool: str
) -> None:
    targets = pool_targets(load_dashboard())
    assert all("label_replace" not in expr for _, _, expr in targets)
    own_only = {
        (title, ref)
        for title, ref, expr in targets
        if all(n.startswith("sqlalchemy_pool_") for n in metric_names(expr))
    }
    assert own_only == OWN_ONLY
    # Only one pool selected: the other's series cannot answer for it.
    queries = [
        (f"{title} {ref}", substitute(expr, variables(pool)))
        for title, ref, expr in targets
        if pool == OWN_POOL or (title, ref) not in OWN_ONLY
    ]
    empty = list(queries)

    def every_query_answers() -> bool:
        empty[:] = [(name, expr) for name, expr in empty if not prometheus_api.query(expr)]
        return not empty

    assert eventually(every_query_answers, timeout=ANSWER_TIMEOUT, interval=1.0), (
        f"{len(empty)} of {len(queries)} queries came back empty for {pool}:\n"
        + "\n".join(f"  {name}: {expr}" for name, expr in empty)
    )
    # The stat answers in any case (`or vector(0)`): it must count the pool's timeouts.
    (last_hour,) = [e for t, _, e in targets if t == "Checkout timeouts (last 1h)"]
    counted = prometheus_api.value(substitute(last_hour, variables(pool)))
    assert counted is not None and counted > 0, counted
    if pool == OTEL_POOL:
        for title, ref, expr in targets:
            if (title, ref) in OWN_ONLY:
                assert not prometheus_api.query(substitute(expr, variables(pool)))


def test_all_pools_each_counted_once(prometheus_api: PrometheusAPI) -> None:
    """The variable's All: both pools side by side, neither counted twice."""
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
    assert set(query("Connections: used / idle vs max")) == {
        (f"{POOL_LABEL}={pool}", f"{STATE_LABEL}={state}")
        for pool in (OTEL_POOL, OWN_POOL)
        for state in ("idle", "used")
    }
    capacity = POOL_SIZE + MAX_OVERFLOW
    assert query("Connections: used / idle vs max", "B") == {
        (f"{POOL_LABEL}={OTEL_POOL}",): capacity,
        (f"{POOL_LABEL}={OWN_POOL}",): capacity,
    }
    assert set(query("Pool utilisation")) == {
        (f"{POOL_LABEL}={OTEL_POOL}",),
        (f"{POOL_LABEL}={OWN_POOL}",),
    }
    # Every series of every query grouped by pool names one of the two pools, once.
    for (title, ref), expr in exprs.items():
        if f"by ({POOL_LABEL}" in expr:
            for labels in query(title, ref):
                pools = [label for label in labels if label.startswith(f"{POOL_LABEL}=")]
                assert pools in ([f"{POOL_LABEL}={OTEL_POOL}"], [f"{POOL_LABEL}={OWN_POOL}"]), (
                    f"{title} {ref}: {labels}"
                )
