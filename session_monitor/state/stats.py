"""What the monitor counts, kept as plain Python numbers until Prometheus asks for them.

An event costs an integer increment or a bucket search here, a fraction of a prometheus_client
update (a lock, an observability check and a value object per call); the metric families are
built from these numbers at scrape time (`metrics.PrometheusCollector`). Nothing here is
thread-safe on its own: every update and every read happens under the lock of its owner (the
session tracker's lock for sessions, the pool's lock for pools).

Those critical sections make no calls and allocate nothing; the bucket is found before the lock
is taken (``bisect_left(histogram.bounds, value)``, inline: it runs on every checkout), new
objects are made outside it. Under the GIL, a thread switches
only at a call or a loop, so a thread never stops while holding the lock and the others never
queue on it (a convoy that cost 8 % of req/s with 8 concurrent requests); and no allocation can
start a garbage collection whose weak-reference callbacks would need the same lock.
"""

from __future__ import annotations

WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
HOLD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
CREATE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Histogram:
    """Bucket counts with Prometheus's `le` semantics: a value equal to a bound is in its bucket."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)

    def copy(self) -> Histogram:
        copied = Histogram(self.bounds)
        copied.counts = self.counts.copy()
        copied.sum = self.sum
        return copied

    def snapshot(self) -> tuple[list[int], float]:
        """Cumulative bucket counts (the last is the total count) and the sum."""
        cumulative, running = [], 0
        for count in self.counts:
            running += count
            cumulative.append(running)
        return cumulative, self.sum


class SessionStats:
    """The sessions of one (route, method)."""

    __slots__ = (
        "closed",
        "duration",
        "idle_in_transaction",
        "leaked",
        "opened",
        "pitfalls",
        "transactions",
    )

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.duration = Histogram(HOLD_BUCKETS)
        self.leaked: dict[str, int] = {}
        # By outcome; a histogram's count is the number of transactions.
        self.transactions: dict[str, Histogram] = {}
        self.idle_in_transaction = 0
        self.pitfalls: dict[str, int] = {}  # by kind (pitfalls.py)

    def copy(self) -> SessionStats:
        copied = SessionStats()
        copied.opened, copied.closed = self.opened, self.closed
        copied.duration = self.duration.copy()
        copied.leaked = self.leaked.copy()
        copied.transactions = {k: v.copy() for k, v in self.transactions.items()}
        copied.idle_in_transaction = self.idle_in_transaction
        copied.pitfalls = self.pitfalls.copy()
        return copied


class PoolStats:
    """The counted events of one pool name (its idle and used connections are sets in PoolState)."""

    __slots__ = (
        "cancelled",
        "closed",
        "create",
        "invalidations",
        "peak_used",
        "pending",
        "server_failures",
        "timeouts",
        "use",
        "wait",
        "waited",
    )

    def __init__(self) -> None:
        self.wait = Histogram(WAIT_BUCKETS)
        self.use = Histogram(HOLD_BUCKETS)
        self.create = Histogram(CREATE_BUCKETS)
        self.timeouts = 0
        # (soft: "true"/"false", reason: "error", "explicit" or "pre_ping") -> count
        self.invalidations: dict[tuple[str, str], int] = {}
        self.pending = 0
        self.waited = 0  # checkouts that found no idle connection and had to wait
        self.cancelled = 0  # waits the caller gave up (a cancelled task) before a connection came
        self.peak_used = 0  # most connections in use at once since the last scrape
        # Connections closed, by reason (metric_table.CLOSE_REASONS): overflow closes under
        # steady load are the pool's churn.
        self.closed: dict[str, int] = {}
        self.server_failures: dict[str, int] = {}  # reads of the server's view, by reason

    def copy(self) -> PoolStats:
        copied = PoolStats()
        copied.wait, copied.use = self.wait.copy(), self.use.copy()
        copied.create = self.create.copy()
        copied.timeouts, copied.pending = self.timeouts, self.pending
        copied.invalidations = self.invalidations.copy()
        copied.closed = self.closed.copy()
        copied.server_failures = self.server_failures.copy()
        copied.waited, copied.cancelled, copied.peak_used = (
            self.waited,
            self.cancelled,
            self.peak_used,
        )
        return copied
