"""The Prometheus metrics contract, and its two exporters.

- `PrometheusCollector`, the default: the monitor counts into plain numbers (`stats.py`) and the
  collector turns them into metric families when Prometheus scrapes, so an event costs an
  increment instead of a prometheus_client update (about 0.5 µs each, 1 µs per histogram
  observation, 13 of them per session lifecycle). Gauges are derived from the same numbers at
  the same moment, so `active == opened - closed` holds in every scrape.
- `PrometheusMetrics`, under ``PROMETHEUS_MULTIPROC_DIR``: workers must write their values to
  prometheus_client's files for a scrape to add them up, which only its own metric objects do.
  It is an observer of the monitor's events, like the OpenTelemetry one.

Both are built from the one table of `MetricSpec`s below and are tested against the same
ground truth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Literal, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
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
    from .records import TrackedCheckout, TrackedSession
    from .stats import PoolStats, SessionStats


class MetricSpec(NamedTuple):
    name: str
    kind: Literal["counter", "gauge", "histogram"]
    documentation: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()


POOL = ("pool_name",)
SESSION = ("route", "method")

CONNECTION_COUNT = MetricSpec(
    "db_client_connection_count",
    "gauge",
    "Pooled connections by state (idle: open in the pool, used: checked out).",
    (*POOL, "state"),
)
CONNECTION_MAX = MetricSpec(
    "db_client_connection_max",
    "gauge",
    "Most connections the pool allows (pool_size + max_overflow).",
    POOL,
)
PENDING_REQUESTS = MetricSpec(
    "db_client_connection_pending_requests",
    "gauge",
    "Callers waiting for a connection from the pool right now.",
    POOL,
)
TIMEOUTS = MetricSpec(
    "db_client_connection_timeouts",
    "counter",
    "Checkouts that gave up waiting for a connection (pool TimeoutError).",
    POOL,
)
WAIT_TIME = MetricSpec(
    "db_client_connection_wait_time_seconds",
    "histogram",
    "Time to obtain a connection from the pool, new connections included.",
    POOL,
    WAIT_BUCKETS,
)
USE_TIME = MetricSpec(
    "db_client_connection_use_time_seconds",
    "histogram",
    "Time from checkout to checkin of a pooled connection.",
    POOL,
    HOLD_BUCKETS,
)
CREATE_TIME = MetricSpec(
    "db_client_connection_create_time_seconds",
    "histogram",
    "Time to open a new DBAPI connection.",
    POOL,
    CREATE_BUCKETS,
)
INVALIDATIONS = MetricSpec(
    "sqlalchemy_pool_invalidations",
    "counter",
    "Pooled connections invalidated (soft: recycled at next checkout).",
    (*POOL, "soft"),
)
SESSIONS_OPENED = MetricSpec(
    "sqlalchemy_sessions_opened",
    "counter",
    "Sessions that started using the database (ORM sessions and Core connections).",
    SESSION,
)
SESSIONS_CLOSED = MetricSpec(
    "sqlalchemy_sessions_closed",
    "counter",
    "Sessions closed, by close() or reclaimed by the garbage collector.",
    SESSION,
)
SESSIONS_ACTIVE = MetricSpec("sqlalchemy_sessions_active", "gauge", "Sessions open now.", SESSION)
SESSION_DURATION = MetricSpec(
    "sqlalchemy_session_duration_seconds",
    "histogram",
    "Time from a session's open to its close.",
    SESSION,
    HOLD_BUCKETS,
)
SESSIONS_LEAKED = MetricSpec(
    "sqlalchemy_sessions_leaked",
    "counter",
    "Leaked sessions, each counted once, by how the leak was found.",
    (*SESSION, "reason"),
)
TRANSACTIONS = MetricSpec(
    "sqlalchemy_transactions",
    "counter",
    "Transactions ended, by outcome: commit, rollback, or close (ended by close()).",
    (*SESSION, "outcome"),
)
TRANSACTION_DURATION = MetricSpec(
    "sqlalchemy_transaction_duration_seconds",
    "histogram",
    "Time from a transaction's begin to its end.",
    (*SESSION, "outcome"),
    HOLD_BUCKETS,
)
INTERNAL_ERRORS = MetricSpec(
    "session_monitor_internal_errors",
    "counter",
    "Failures inside session_monitor's listeners, swallowed so the app never sees them.",
    ("listener",),
)

ALL_METRICS = (
    CONNECTION_COUNT,
    CONNECTION_MAX,
    PENDING_REQUESTS,
    TIMEOUTS,
    WAIT_TIME,
    USE_TIME,
    CREATE_TIME,
    INVALIDATIONS,
    SESSIONS_OPENED,
    SESSIONS_CLOSED,
    SESSIONS_ACTIVE,
    SESSION_DURATION,
    SESSIONS_LEAKED,
    TRANSACTIONS,
    TRANSACTION_DURATION,
    INTERNAL_ERRORS,
)


class PoolSnapshot(NamedTuple):
    name: str
    idle: int
    used: int
    stats: PoolStats


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
        wait, use, create = _histogram(WAIT_TIME), _histogram(USE_TIME), _histogram(CREATE_TIME)
        for pool in self._pools():
            name, stats = pool.name, pool.stats
            count.add_metric([name, "idle"], pool.idle)
            count.add_metric([name, "used"], pool.used)
            if stats.maximum is not None:
                maximum.add_metric([name], stats.maximum)
            pending.add_metric([name], stats.pending)
            timeouts.add_metric([name], stats.timeouts)
            _add(wait, [name], stats.wait)
            _add(use, [name], stats.use)
            _add(create, [name], stats.create)
            invalidations.add_metric([name, "false"], stats.invalidated)
            invalidations.add_metric([name, "true"], stats.soft_invalidated)
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
        errors = _counter(INTERNAL_ERRORS)
        for listener, failures in sorted(self._errors().items()):
            errors.add_metric([listener], failures)
        yield from (count, maximum, pending, timeouts, wait, use, create, invalidations)
        yield from (opened, closed, active, duration, leaked, transactions, transaction_duration)
        yield errors


# -- multiprocess mode: prometheus_client's own metrics, updated on every event ---------------


class PrometheusMetrics:
    """The observer behind ``PROMETHEUS_MULTIPROC_DIR``; see the module docstring.

    Gauges use prometheus-client's `livesum` multiprocess mode so per-worker values add up.
    """

    def __init__(self, registry: CollectorRegistry | None) -> None:
        def make(spec: MetricSpec) -> Counter | Gauge | Histogram:
            if spec.kind == "counter":
                return Counter(spec.name, spec.documentation, spec.labels, registry=registry)
            if spec.kind == "gauge":
                return Gauge(
                    spec.name,
                    spec.documentation,
                    spec.labels,
                    registry=registry,
                    multiprocess_mode="livesum",
                )
            return Histogram(
                spec.name, spec.documentation, spec.labels, registry=registry, buckets=spec.buckets
            )

        self.by_spec = {spec: make(spec) for spec in ALL_METRICS}
        self._seen_pools: set[str] = set()

    def _pool(self, name: str) -> None:
        if name not in self._seen_pools:
            # A series that exists at 0 from the start lets rate() and alerts see its first rise.
            self._seen_pools.add(name)
            self._counter(INVALIDATIONS).labels(name, "false")
            self._counter(INVALIDATIONS).labels(name, "true")
            self._counter(TIMEOUTS).labels(name)
            self._gauge(PENDING_REQUESTS).labels(name)
            for spec in (WAIT_TIME, USE_TIME, CREATE_TIME):
                self._histogram(spec).labels(name)

    def _counter(self, spec: MetricSpec) -> Counter:
        metric = self.by_spec[spec]
        assert isinstance(metric, Counter)
        return metric

    def _gauge(self, spec: MetricSpec) -> Gauge:
        metric = self.by_spec[spec]
        assert isinstance(metric, Gauge)
        return metric

    def _histogram(self, spec: MetricSpec) -> Histogram:
        metric = self.by_spec[spec]
        assert isinstance(metric, Histogram)
        return metric

    def session_opened(self, session: TrackedSession) -> None:
        key = (session.route, session.method)
        self._counter(SESSIONS_OPENED).labels(*key).inc()
        self._gauge(SESSIONS_ACTIVE).labels(*key).inc()

    def session_closed(self, session: TrackedSession, duration: float) -> None:
        key = (session.route, session.method)
        self._counter(SESSIONS_CLOSED).labels(*key).inc()
        self._gauge(SESSIONS_ACTIVE).labels(*key).dec()
        self._histogram(SESSION_DURATION).labels(*key).observe(duration)

    def session_leaked(self, session: TrackedSession, reason: str) -> None:
        self._counter(SESSIONS_LEAKED).labels(session.route, session.method, reason).inc()

    def transaction_ended(self, session: TrackedSession, outcome: str, duration: float) -> None:
        key = (session.route, session.method, outcome)
        self._counter(TRANSACTIONS).labels(*key).inc()
        self._histogram(TRANSACTION_DURATION).labels(*key).observe(duration)

    def connection_created(self, pool_name: str, seconds: float) -> None:
        self._histogram(CREATE_TIME).labels(pool_name).observe(seconds)

    def connection_checked_out(self, checkout: TrackedCheckout, wait: float) -> None:
        self._histogram(WAIT_TIME).labels(checkout.pool_name).observe(wait)

    def connection_checked_in(self, checkout: TrackedCheckout, use: float) -> None:
        self._histogram(USE_TIME).labels(checkout.pool_name).observe(use)

    def connection_invalidated(
        self, pool_name: str, soft: bool, checkout: TrackedCheckout | None
    ) -> None:
        self._counter(INVALIDATIONS).labels(pool_name, "true" if soft else "false").inc()

    def checkout_timed_out(
        self, pool_name: str, waited: float, session: TrackedSession | None
    ) -> None:
        self._counter(TIMEOUTS).labels(pool_name).inc()

    def pool_usage(self, pool_name: str, idle: int, used: int) -> None:
        self._pool(pool_name)
        self._gauge(CONNECTION_COUNT).labels(pool_name, "idle").set(idle)
        self._gauge(CONNECTION_COUNT).labels(pool_name, "used").set(used)

    def pool_pending(self, pool_name: str, delta: int) -> None:
        self._gauge(PENDING_REQUESTS).labels(pool_name).inc(delta)

    def pool_capacity(self, pool_name: str, maximum: int) -> None:
        self._gauge(CONNECTION_MAX).labels(pool_name).set(maximum)

    def internal_error(self, listener: str) -> None:
        self._counter(INTERNAL_ERRORS).labels(listener).inc()

    def close(self) -> None:
        pass

    def collectors(self) -> list[Counter | Gauge | Histogram]:
        return list(self.by_spec.values())
