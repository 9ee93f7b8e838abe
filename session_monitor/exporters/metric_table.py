"""The metrics contract: one `MetricSpec` per metric (name, type, help, labels, buckets,
OpenTelemetry name and unit), from which every exporter is built — the scrape-time collector
(`metrics.py`), the multiprocess exporter (`multiprocess.py`) and the OpenTelemetry instruments
(`tracing.py`). Help text is written here and nowhere else.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from ..state.stats import CREATE_BUCKETS, HOLD_BUCKETS, WAIT_BUCKETS


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


# The OpenTelemetry semantic conventions' attributes db.client.connection.pool.name and
# db.client.connection.state as Prometheus labels, spelled as OpenTelemetry's Prometheus exporter
# spells them: a pool exported by either reads the same in one query. Every metric of a pool
# carries the same pool label, its own sqlalchemy_pool_* metrics too, so that they join on it.
POOL_LABEL = "db_client_connection_pool_name"
STATE_LABEL = "db_client_connection_state"
POOL = (POOL_LABEL,)
SESSION = ("route", "method")

CONNECTION_COUNT = MetricSpec(
    "db_client_connection_count",
    "gauge",
    "Pooled connections by state (idle: open in the pool, used: checked out).",
    (*POOL, STATE_LABEL),
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
CONNECTIONS_CLOSED = MetricSpec(
    "sqlalchemy_pool_closed_connections",
    "counter",
    "Pooled connections closed, by reason: overflow (back to a pool that had pool_size idle "
    "ones: opened for a peak and closed after it; under steady load, churn), unpooled (a "
    "NullPool closes every one), recycled (pool_recycle), invalidated, disposed.",
    (*POOL, "reason"),
    otel_name="session_monitor.connection.closed",
    unit="{connection}",
)
SERVER_CONNECTIONS_ALLOWED = MetricSpec(
    "session_monitor_server_connections_allowed",
    "gauge",
    "Connections the database server lets this pool's role open to its database: "
    "max_connections less the reserved slots, capped by the role's and the database's "
    "connection limits. PostgreSQL; read once per process.",
    POOL,
)
SERVER_VIEW_FAILURES = MetricSpec(
    "session_monitor_server_view_failures",
    "counter",
    "Reads of the server's view (pg_stat_activity) that failed, by reason: connect (no free "
    "slot, authentication, network), timeout, query (e.g. permission). The report they served "
    "went out without it.",
    (*POOL, "reason"),
    otel_name="session_monitor.server_view.failures",
    unit="{failure}",
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
    "uncommitted_changes, nested_checkout (docs/pitfalls.md).",
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
CLOSE_REASONS = ("overflow", "unpooled", "recycled", "invalidated", "disposed")
SERVER_VIEW_FAILURE_REASONS = ("connect", "timeout", "query")

ALL_METRICS = (
    CONNECTION_COUNT,
    CONNECTION_MAX,
    PENDING_REQUESTS,
    TIMEOUTS,
    WAIT_TIME,
    USE_TIME,
    CREATE_TIME,
    INVALIDATIONS,
    CONNECTIONS_CLOSED,
    WAITED,
    CANCELLED_WAITS,
    USED_PEAK,
    SERVER_CONNECTIONS_ALLOWED,
    SERVER_VIEW_FAILURES,
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
