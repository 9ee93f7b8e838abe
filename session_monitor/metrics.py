"""The metrics contract, one table for every exporter, and the scrape-time Prometheus collector.

- `PrometheusCollector`, the default: the monitor counts into plain numbers (`stats.py`) and the
  collector turns them into metric families when Prometheus scrapes, so an event costs an
  increment instead of a prometheus_client update (about 0.5 µs each, 1 µs per histogram
  observation, 13 of them per session lifecycle). Gauges are derived from the same numbers at
  the same moment, so `active == opened - closed` holds in every scrape.
- `multiprocess.PrometheusMetrics`, under ``PROMETHEUS_MULTIPROC_DIR``, and the OpenTelemetry
  instruments (`tracing.py`) are observers of the monitor's events.

All three are built from the one table of `MetricSpec`s below (names, help, labels, buckets,
OpenTelemetry names and units) and are tested against the same ground truth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Literal, NamedTuple

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from .stats import CREATE_BUCKETS, HOLD_BUCKETS, WAIT_BUCKETS
from .stats import Histogram as StatsHistogram

if TYPE_CHECKING:
    from .pool_state import PoolSnapshot
    from .stats import SessionStats


class MetricSpec(NamedTuple):
    """One metric, described once for every exporter: Prometheus (scrape-time and multiprocess)
    and OpenTelemetry."""

    name: str  # Prometheus name, without the _total a counter's sample gets
    kind: Literal["counter", "gauge", "histogram"]
    documentation: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()
    # OpenTelemetry: its name and unit; a Prometheus gauge is an UpDownCounter there.
    otel_name: str = ""
    unit: str = ""


POOL = ("pool_name",)
SESSION = ("route", "method")

CONNECTION_COUNT = MetricSpec(
    "db_client_connection_count",
    "gauge",
    "Pooled connections by state (idle: open in the pool, used: checked out).",
    (*POOL, "state"),
    otel_name="db.client.connection.count",
    unit="{connection}",
)
CONNECTION_MAX = MetricSpec(
    "db_client_connection_max",
    "gauge",
    "Most connections the pool allows (pool_size + max_overflow), over its live engines.",
    POOL,
    otel_name="db.client.connection.max",
    unit="{connection}",
)
PENDING_REQUESTS = MetricSpec(
    "db_client_connection_pending_requests",
    "gauge",
    "Callers waiting for a connection from the pool right now.",
    POOL,
    otel_name="db.client.connection.pending_requests",
    unit="{request}",
)
TIMEOUTS = MetricSpec(
    "db_client_connection_timeouts",
    "counter",
    "Checkouts that gave up waiting for a connection (pool TimeoutError).",
    POOL,
    otel_name="db.client.connection.timeouts",
    unit="{timeout}",
)
WAIT_TIME = MetricSpec(
    "db_client_connection_wait_time_seconds",
    "histogram",
    "Time to obtain a connection from the pool, new connections included.",
    POOL,
    WAIT_BUCKETS,
    otel_name="db.client.connection.wait_time",
    unit="s",
)
USE_TIME = MetricSpec(
    "db_client_connection_use_time_seconds",
    "histogram",
    "Time from checkout to checkin of a pooled connection.",
    POOL,
    HOLD_BUCKETS,
    otel_name="db.client.connection.use_time",
    unit="s",
)
CREATE_TIME = MetricSpec(
    "db_client_connection_create_time_seconds",
    "histogram",
    "Time to open a new DBAPI connection.",
    POOL,
    CREATE_BUCKETS,
    otel_name="db.client.connection.create_time",
    unit="s",
)
INVALIDATIONS = MetricSpec(
    "sqlalchemy_pool_invalidations",
    "counter",
    "Pooled connections invalidated (soft: recycled at next checkout), by reason: error (a "
    "disconnect seen by a statement), pre_ping (a failed pre-ping on checkout) or explicit "
    "(the app's invalidate()).",
    (*POOL, "soft", "reason"),
    otel_name="session_monitor.connection.invalidations",
    unit="{connection}",
)
SESSIONS_OPENED = MetricSpec(
    "sqlalchemy_sessions_opened",
    "counter",
    "Sessions that started using the database (ORM sessions and Core connections).",
    SESSION,
    otel_name="db.client.session.opened",
    unit="{session}",
)
SESSIONS_CLOSED = MetricSpec(
    "sqlalchemy_sessions_closed",
    "counter",
    "Sessions closed, by close() or reclaimed by the garbage collector.",
    SESSION,
    otel_name="db.client.session.closed",
    unit="{session}",
)
SESSIONS_ACTIVE = MetricSpec(
    "sqlalchemy_sessions_active",
    "gauge",
    "Sessions open now.",
    SESSION,
    otel_name="db.client.session.active",
    unit="{session}",
)
SESSION_DURATION = MetricSpec(
    "sqlalchemy_session_duration_seconds",
    "histogram",
    "Time from a session's open to its close.",
    SESSION,
    HOLD_BUCKETS,
    otel_name="db.client.session.duration",
    unit="s",
)
SESSIONS_LEAKED = MetricSpec(
    "sqlalchemy_sessions_leaked",
    "counter",
    "Leaked sessions, each counted once, by how the leak was found.",
    (*SESSION, "reason"),
    otel_name="db.client.session.leaked",
    unit="{session}",
)
TRANSACTIONS = MetricSpec(
    "sqlalchemy_transactions",
    "counter",
    "Transactions ended, by outcome: commit, rollback, or close (ended by close()).",
    (*SESSION, "outcome"),
    otel_name="db.client.transaction.count",
    unit="{transaction}",
)
TRANSACTION_DURATION = MetricSpec(
    "sqlalchemy_transaction_duration_seconds",
    "histogram",
    "Time from a transaction's begin to its end.",
    (*SESSION, "outcome"),
    HOLD_BUCKETS,
    otel_name="db.client.transaction.duration",
    unit="s",
)
WAITED = MetricSpec(
    "sqlalchemy_pool_waited_checkouts",
    "counter",
    "Checkouts that found no idle connection and no room to open one, and had to wait.",
    POOL,
    otel_name="session_monitor.connection.waited_checkouts",
    unit="{checkout}",
)
CANCELLED_WAITS = MetricSpec(
    "sqlalchemy_pool_cancelled_waits",
    "counter",
    "Waits for a connection given up by the caller before one came (a cancelled task, e.g. "
    "the client went away).",
    POOL,
    otel_name="session_monitor.connection.cancelled_waits",
    unit="{wait}",
)
USED_PEAK = MetricSpec(
    "sqlalchemy_pool_used_peak",
    "gauge",
    "Most connections in use at once since the previous scrape (so a peak between two "
    "scrapes is not lost).",
    POOL,
)
IDLE_IN_TRANSACTION = MetricSpec(
    "sqlalchemy_sessions_idle_in_transaction",
    "counter",
    "Connections held inside a transaction while their holder was elsewhere than SQLAlchemy or "
    "the driver for longer than idle_in_transaction_threshold; each once.",
    SESSION,
    otel_name="session_monitor.session.idle_in_transaction",
    unit="{session}",
)
PITFALLS = MetricSpec(
    "sqlalchemy_session_pitfalls",
    "counter",
    "Sessions caught in a tutorial pitfall, by kind: shared_session, blocking_event_loop, "
    "uncommitted_changes, nested_checkout (README, Pitfalls).",
    ("kind", *SESSION),
    otel_name="session_monitor.session.pitfalls",
    unit="{occurrence}",
)
INTERNAL_ERRORS = MetricSpec(
    "session_monitor_internal_errors",
    "counter",
    "Failures inside session_monitor, swallowed so the app never sees them.",
    ("listener",),
    otel_name="session_monitor.internal_errors",
    unit="{error}",
)

# Present at 0 from a pool's first scrape, so rate() and alerts see the first rise.
INVALIDATION_SERIES = (("false", "error"), ("false", "pre_ping"), ("true", "explicit"))

ALL_METRICS = (
    CONNECTION_COUNT,
    CONNECTION_MAX,
    PENDING_REQUESTS,
    TIMEOUTS,
    WAIT_TIME,
    USE_TIME,
    CREATE_TIME,
    INVALIDATIONS,
    WAITED,
    CANCELLED_WAITS,
    USED_PEAK,
    SESSIONS_OPENED,
    SESSIONS_CLOSED,
    SESSIONS_ACTIVE,
    SESSION_DURATION,
    SESSIONS_LEAKED,
    TRANSACTIONS,
    TRANSACTION_DURATION,
    IDLE_IN_TRANSACTION,
    PITFALLS,
    INTERNAL_ERRORS,
)


# -- the default: families built at scrape time ----------------------------------------------


def _counter(spec: MetricSpec) -> CounterMetricFamily:
    return CounterMetricFamily(spec.name, spec.documentation, labels=spec.labels)


def _gauge(spec: MetricSpec) -> GaugeMetricFamily:
    return GaugeMetricFamily(spec.name, spec.documentation, labels=spec.labels)


def _histogram(spec: MetricSpec) -> HistogramMetricFamily:
    return HistogramMetricFamily(spec.name, spec.documentation, labels=spec.labels)


_FAMILIES = {"counter": _counter, "gauge": _gauge, "histogram": _histogram}
_LE: dict[tuple[float, ...], list[str]] = {}


def _add(family: HistogramMetricFamily, labels: list[str], histogram: StatsHistogram) -> None:
    bounds = _LE.get(histogram.bounds)
    if bounds is None:
        # prometheus_client's own spelling of `le`, so both exporters print the same series.
        bounds = [floatToGoString(b) for b in histogram.bounds]  # type: ignore[no-untyped-call]
        bounds = _LE[histogram.bounds] = [*bounds, "+Inf"]
    cumulative, total = histogram.snapshot()
    family.add_metric(labels, list(zip(bounds, cumulative, strict=True)), total)


class PrometheusCollector:
    """Builds every family of the contract from the monitor's numbers, at scrape time."""

    def __init__(
        self,
        sessions: Callable[[], dict[tuple[str, str], SessionStats]],
        pools: Callable[[], list[PoolSnapshot]],
        errors: Callable[[], dict[str, int]],
    ) -> None:
        self._sessions = sessions
        self._pools = pools
        self._errors = errors

    def describe(self) -> Iterator[Metric]:
        # Names only: lets the registry refuse a second monitor's metrics at registration.
        for spec in ALL_METRICS:
            yield _FAMILIES[spec.kind](spec)

    def collect(self) -> Iterator[Metric]:
        count, maximum, pending = (
            _gauge(CONNECTION_COUNT),
            _gauge(CONNECTION_MAX),
            _gauge(PENDING_REQUESTS),
        )
        timeouts, invalidations = _counter(TIMEOUTS), _counter(INVALIDATIONS)
        waited, cancelled, peak = _counter(WAITED), _counter(CANCELLED_WAITS), _gauge(USED_PEAK)
        wait, use, create = _histogram(WAIT_TIME), _histogram(USE_TIME), _histogram(CREATE_TIME)
        for pool in self._pools():
            name, stats = pool.name, pool.stats
            count.add_metric([name, "idle"], pool.idle)
            count.add_metric([name, "used"], pool.used)
            if pool.maximum is not None:
                maximum.add_metric([name], pool.maximum)
            pending.add_metric([name], stats.pending)
            timeouts.add_metric([name], stats.timeouts)
            _add(wait, [name], stats.wait)
            _add(use, [name], stats.use)
            _add(create, [name], stats.create)
            counted = stats.invalidations
            for soft, reason in sorted({*INVALIDATION_SERIES, *counted}):
                invalidations.add_metric([name, soft, reason], counted.get((soft, reason), 0))
            waited.add_metric([name], stats.waited)
            cancelled.add_metric([name], stats.cancelled)
            peak.add_metric([name], max(stats.peak_used, pool.used))
        opened, closed, active = (
            _counter(SESSIONS_OPENED),
            _counter(SESSIONS_CLOSED),
            _gauge(SESSIONS_ACTIVE),
        )
        duration, leaked = _histogram(SESSION_DURATION), _counter(SESSIONS_LEAKED)
        transactions, transaction_duration = (
            _counter(TRANSACTIONS),
            _histogram(TRANSACTION_DURATION),
        )
        idle_in_transaction, pitfalls = _counter(IDLE_IN_TRANSACTION), _counter(PITFALLS)
        for (route, method), session in sorted(self._sessions().items()):
            labels = [route, method]
            opened.add_metric(labels, session.opened)
            closed.add_metric(labels, session.closed)
            active.add_metric(labels, session.opened - session.closed)
            _add(duration, labels, session.duration)
            for reason, leaks in sorted(session.leaked.items()):
                leaked.add_metric([*labels, reason], leaks)
            for outcome, histogram in sorted(session.transactions.items()):
                transactions.add_metric([*labels, outcome], histogram.count)
                _add(transaction_duration, [*labels, outcome], histogram)
            if session.idle_in_transaction:
                idle_in_transaction.add_metric(labels, session.idle_in_transaction)
            for kind, occurrences in sorted(session.pitfalls.items()):
                pitfalls.add_metric([kind, *labels], occurrences)
        errors = _counter(INTERNAL_ERRORS)
        for listener, failures in sorted(self._errors().items()):
            errors.add_metric([listener], failures)
        yield from (count, maximum, pending, timeouts, wait, use, create, invalidations)
        yield from (waited, cancelled, peak)
        yield from (opened, closed, active, duration, leaked, transactions, transaction_duration)
        yield from (idle_in_transaction, pitfalls)
        yield errors


