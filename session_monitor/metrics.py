"""Every Prometheus metric of the contract, created once against an injected registry."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from .records import TrackedCheckout, TrackedSession

WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
HOLD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
CREATE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

SESSION_LABELS = ("route", "method")


class _PoolChildren(NamedTuple):
    idle: Gauge
    used: Gauge
    pending: Gauge
    timeouts: Counter
    wait: Histogram
    use: Histogram
    create: Histogram


class _SessionChildren(NamedTuple):
    opened: Counter
    closed: Counter
    active: Gauge
    duration: Histogram


class PrometheusMetrics:
    """The Prometheus observer. Pass `registry=None` to create metrics without registering them.

    Gauges use prometheus-client's `livesum` multiprocess mode: every value is pushed by an event
    (nothing is computed at scrape time), so per-worker values add up under
    ``PROMETHEUS_MULTIPROC_DIR``.
    """

    def __init__(self, registry: CollectorRegistry | None = REGISTRY) -> None:
        pool = ("pool_name",)
        self.connection_count = Gauge(
            "db_client_connection_count",
            "Pooled connections by state (idle: open in the pool, used: checked out).",
            (*pool, "state"),
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.connection_max = Gauge(
            "db_client_connection_max",
            "Most connections the pool allows (pool_size + max_overflow).",
            pool,
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.pending_requests = Gauge(
            "db_client_connection_pending_requests",
            "Callers waiting for a connection from the pool right now.",
            pool,
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.timeouts = Counter(
            "db_client_connection_timeouts",
            "Checkouts that gave up waiting for a connection (pool TimeoutError).",
            pool,
            registry=registry,
        )
        self.wait_time = Histogram(
            "db_client_connection_wait_time_seconds",
            "Time to obtain a connection from the pool, new connections included.",
            pool,
            registry=registry,
            buckets=WAIT_BUCKETS,
        )
        self.use_time = Histogram(
            "db_client_connection_use_time_seconds",
            "Time from checkout to checkin of a pooled connection.",
            pool,
            registry=registry,
            buckets=HOLD_BUCKETS,
        )
        self.create_time = Histogram(
            "db_client_connection_create_time_seconds",
            "Time to open a new DBAPI connection.",
            pool,
            registry=registry,
            buckets=CREATE_BUCKETS,
        )
        self.invalidations = Counter(
            "sqlalchemy_pool_invalidations",
            "Pooled connections invalidated (soft: recycled at next checkout).",
            (*pool, "soft"),
            registry=registry,
        )
        self.sessions_opened = Counter(
            "sqlalchemy_sessions_opened",
            "Sessions that started using the database (ORM sessions and Core connections).",
            SESSION_LABELS,
            registry=registry,
        )
        self.sessions_closed = Counter(
            "sqlalchemy_sessions_closed",
            "Sessions closed, by close() or reclaimed by the garbage collector.",
            SESSION_LABELS,
            registry=registry,
        )
        self.sessions_active = Gauge(
            "sqlalchemy_sessions_active",
            "Sessions open now.",
            SESSION_LABELS,
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.session_duration = Histogram(
            "sqlalchemy_session_duration_seconds",
            "Time from a session's open to its close.",
            SESSION_LABELS,
            registry=registry,
            buckets=HOLD_BUCKETS,
        )
        self.sessions_leaked = Counter(
            "sqlalchemy_sessions_leaked",
            "Leaked sessions, each counted once, by how the leak was found.",
            (*SESSION_LABELS, "reason"),
            registry=registry,
        )
        self.transactions = Counter(
            "sqlalchemy_transactions",
            "Transactions ended, by outcome: commit, rollback, or close (ended by close()).",
            (*SESSION_LABELS, "outcome"),
            registry=registry,
        )
        self.transaction_duration = Histogram(
            "sqlalchemy_transaction_duration_seconds",
            "Time from a transaction's begin to its end.",
            (*SESSION_LABELS, "outcome"),
            registry=registry,
            buckets=HOLD_BUCKETS,
        )
        self.internal_errors = Counter(
            "session_monitor_internal_errors",
            "Failures inside session_monitor's listeners, swallowed so the app never sees them.",
            ("listener",),
            registry=registry,
        )
        self._pools: dict[str, _PoolChildren] = {}
        self._sessions: dict[tuple[str, str], _SessionChildren] = {}
        self._transactions: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}

    # label lookups are the costly part of an update: each child is looked up once and kept
    def _pool(self, name: str) -> _PoolChildren:
        children = self._pools.get(name)
        if children is None:
            # A series that exists at 0 from the start lets rate() and alerts see its first rise.
            self.invalidations.labels(name, "false")
            self.invalidations.labels(name, "true")
            children = self._pools[name] = _PoolChildren(
                self.connection_count.labels(name, "idle"),
                self.connection_count.labels(name, "used"),
                self.pending_requests.labels(name),
                self.timeouts.labels(name),
                self.wait_time.labels(name),
                self.use_time.labels(name),
                self.create_time.labels(name),
            )
        return children

    def _session(self, session: TrackedSession) -> _SessionChildren:
        key = (session.route, session.method)
        children = self._sessions.get(key)
        if children is None:
            children = self._sessions[key] = _SessionChildren(
                self.sessions_opened.labels(*key),
                self.sessions_closed.labels(*key),
                self.sessions_active.labels(*key),
                self.session_duration.labels(*key),
            )
        return children

    def session_opened(self, session: TrackedSession) -> None:
        children = self._session(session)
        children.opened.inc()
        children.active.inc()

    def session_closed(self, session: TrackedSession, duration: float) -> None:
        children = self._session(session)
        children.closed.inc()
        children.active.dec()
        children.duration.observe(duration)

    def session_leaked(self, session: TrackedSession, reason: str) -> None:
        self.sessions_leaked.labels(session.route, session.method, reason).inc()

    def transaction_ended(self, session: TrackedSession, outcome: str, duration: float) -> None:
        key = (session.route, session.method, outcome)
        children = self._transactions.get(key)
        if children is None:
            children = self._transactions[key] = (
                self.transactions.labels(*key),
                self.transaction_duration.labels(*key),
            )
        children[0].inc()
        children[1].observe(duration)

    def connection_created(self, pool_name: str, seconds: float) -> None:
        self._pool(pool_name).create.observe(seconds)

    def connection_checked_out(self, checkout: TrackedCheckout, wait: float) -> None:
        self._pool(checkout.pool_name).wait.observe(wait)

    def connection_checked_in(self, checkout: TrackedCheckout, use: float) -> None:
        self._pool(checkout.pool_name).use.observe(use)

    def connection_invalidated(
        self, pool_name: str, soft: bool, checkout: TrackedCheckout | None
    ) -> None:
        self.invalidations.labels(pool_name, "true" if soft else "false").inc()

    def checkout_timed_out(
        self, pool_name: str, waited: float, session: TrackedSession | None
    ) -> None:
        self._pool(pool_name).timeouts.inc()

    def pool_usage(self, pool_name: str, idle: int, used: int) -> None:
        children = self._pool(pool_name)
        children.idle.set(idle)
        children.used.set(used)

    def pool_pending(self, pool_name: str, delta: int) -> None:
        self._pool(pool_name).pending.inc(delta)

    def pool_capacity(self, pool_name: str, maximum: int) -> None:
        self.connection_max.labels(pool_name).set(maximum)

    def internal_error(self, listener: str) -> None:
        self.internal_errors.labels(listener).inc()

    def close(self) -> None:
        pass

    def register(self, registry: CollectorRegistry | None) -> None:
        """Register every metric, or none: a name taken already leaves the registry as it was."""
        if registry is None:
            return
        done: list[Counter | Gauge | Histogram] = []
        try:
            for collector in self.collectors():
                registry.register(collector)
                done.append(collector)
        except ValueError:
            for collector in done:
                registry.unregister(collector)
            raise

    def collectors(self) -> list[Counter | Gauge | Histogram]:
        return [
            value for value in vars(self).values() if isinstance(value, (Counter, Gauge, Histogram))
        ]
