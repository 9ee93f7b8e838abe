"""Multiprocess mode: prometheus_client's own metric objects, updated on every event.

With ``PROMETHEUS_MULTIPROC_DIR`` set (gunicorn, ``uvicorn --workers N``) each worker must write
its values to prometheus_client's files for a scrape to add them up, which only its own metric
objects do. This observer receives the monitor's events and updates them; gauges use the
`livesum` mode so per-worker values add up. Built from the same table as the scrape-time
collector (`metric_table.ALL_METRICS`), and tested to print the same series.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_asgi_app

from .metric_table import (
    ALL_METRICS,
    CANCELLED_WAITS,
    CLOSE_REASONS,
    CONNECTION_COUNT,
    CONNECTION_MAX,
    CONNECTIONS_CLOSED,
    CREATE_TIME,
    IDLE_IN_TRANSACTION,
    INTERNAL_ERRORS,
    INVALIDATION_SERIES,
    INVALIDATIONS,
    PENDING_REQUESTS,
    PITFALLS,
    SERVER_CONNECTIONS_ALLOWED,
    SERVER_VIEW_FAILURE_REASONS,
    SERVER_VIEW_FAILURES,
    SESSION_DURATION,
    SESSIONS_ACTIVE,
    SESSIONS_CLOSED,
    SESSIONS_LEAKED,
    SESSIONS_OPENED,
    TIMEOUTS,
    TRANSACTION_DURATION,
    TRANSACTIONS,
    USE_TIME,
    USED_PEAK,
    WAIT_TIME,
    WAITED,
    MetricSpec,
)

if TYPE_CHECKING:
    from ..hooks.stacks import Location
    from ..state.views import CheckoutView, HolderView, SessionView


class PrometheusMetrics:
    """The observer behind ``PROMETHEUS_MULTIPROC_DIR``; see the module docstring."""

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
                    # A server's limit is the same number in every worker: not a sum.
                    multiprocess_mode=(
                        "livemax" if spec is SERVER_CONNECTIONS_ALLOWED else "livesum"
                    ),
                )
            return Histogram(
                spec.name, spec.documentation, spec.labels, registry=registry, buckets=spec.buckets
            )

        # A peak since the previous scrape needs the scrape: not in the workers' files.
        self.by_spec = {spec: make(spec) for spec in ALL_METRICS if spec is not USED_PEAK}
        self._seen_pools: set[str] = set()

    def _pool(self, name: str) -> None:
        if name not in self._seen_pools:
            # A series that exists at 0 from the start lets rate() and alerts see its first rise.
            self._seen_pools.add(name)
            for soft, reason in INVALIDATION_SERIES:
                self._counter(INVALIDATIONS).labels(name, soft, reason)
            self._counter(TIMEOUTS).labels(name)
            self._counter(WAITED).labels(name)
            self._counter(CANCELLED_WAITS).labels(name)
            self._gauge(PENDING_REQUESTS).labels(name)
            for reason in CLOSE_REASONS:
                self._counter(CONNECTIONS_CLOSED).labels(name, reason)
            for reason in SERVER_VIEW_FAILURE_REASONS:
                self._counter(SERVER_VIEW_FAILURES).labels(name, reason)
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

    def session_opened(self, session: SessionView) -> None:
        key = (session.route, session.method)
        self._counter(SESSIONS_OPENED).labels(*key).inc()
        self._gauge(SESSIONS_ACTIVE).labels(*key).inc()

    def session_closed(self, session: SessionView, duration: float) -> None:
        key = (session.route, session.method)
        self._counter(SESSIONS_CLOSED).labels(*key).inc()
        self._gauge(SESSIONS_ACTIVE).labels(*key).dec()
        self._histogram(SESSION_DURATION).labels(*key).observe(duration)

    def session_leaked(self, session: SessionView, reason: str) -> None:
        self._counter(SESSIONS_LEAKED).labels(session.route, session.method, reason).inc()

    def transaction_ended(self, session: SessionView, outcome: str, duration: float) -> None:
        key = (session.route, session.method, outcome)
        self._counter(TRANSACTIONS).labels(*key).inc()
        self._histogram(TRANSACTION_DURATION).labels(*key).observe(duration)

    def connection_created(self, pool_name: str, seconds: float) -> None:
        self._histogram(CREATE_TIME).labels(pool_name).observe(seconds)

    def connection_checked_out(self, checkout: CheckoutView, wait: float) -> None:
        self._histogram(WAIT_TIME).labels(checkout.pool_name).observe(wait)

    def connection_checked_in(self, checkout: CheckoutView, use: float) -> None:
        self._histogram(USE_TIME).labels(checkout.pool_name).observe(use)

    def connection_invalidated(
        self, pool_name: str, soft: bool, checkout: CheckoutView | None, reason: str
    ) -> None:
        self._counter(INVALIDATIONS).labels(pool_name, "true" if soft else "false", reason).inc()

    def connection_closed(self, pool_name: str, reason: str) -> None:
        self._counter(CONNECTIONS_CLOSED).labels(pool_name, reason).inc()

    def server_limits(self, pool_name: str, allowed: int) -> None:
        self._gauge(SERVER_CONNECTIONS_ALLOWED).labels(pool_name).set(allowed)

    def server_view_failed(self, pool_name: str, reason: str) -> None:
        self._counter(SERVER_VIEW_FAILURES).labels(pool_name, reason).inc()

    def server_view_read(self, pool_name: str, holders: tuple[HolderView, ...]) -> None:
        pass

    def checkout_timed_out(
        self, pool_name: str, waited: float, session: SessionView | None, holders: tuple[str, ...]
    ) -> None:
        self._counter(TIMEOUTS).labels(pool_name).inc()

    def checkout_waited(self, pool_name: str) -> None:
        self._counter(WAITED).labels(pool_name).inc()

    def wait_cancelled(self, pool_name: str, waited: float) -> None:
        self._counter(CANCELLED_WAITS).labels(pool_name).inc()

    def session_pitfall(self, session: SessionView, kind: str, location: Location | None) -> None:
        self._counter(PITFALLS).labels(kind, session.route, session.method).inc()

    def session_idle_in_transaction(self, session: SessionView, away: float) -> None:
        self._counter(IDLE_IN_TRANSACTION).labels(session.route, session.method).inc()

    def pool_usage(self, pool_name: str, idle: int, used: int) -> None:
        self._pool(pool_name)
        self._gauge(CONNECTION_COUNT).labels(pool_name, "idle").set(idle)
        self._gauge(CONNECTION_COUNT).labels(pool_name, "used").set(used)

    def pool_pending(self, pool_name: str, delta: int) -> None:
        self._gauge(PENDING_REQUESTS).labels(pool_name).inc(delta)

    def pool_capacity(self, pool_name: str, maximum: int | None) -> None:
        gauge = self._gauge(CONNECTION_MAX)
        if maximum is not None:
            gauge.labels(pool_name).set(maximum)
        elif (pool_name,) in gauge._metrics:  # no live bounded engine: no series, as at scrape
            gauge.remove(pool_name)

    def internal_error(self, listener: str) -> None:
        self._counter(INTERNAL_ERRORS).labels(listener).inc()

    def close(self) -> None:
        pass

    def collectors(self) -> list[Counter | Gauge | Histogram]:
        return list(self.by_spec.values())


def forget_dead_workers(directory: str) -> list[int]:
    """Mark every worker whose process is gone as dead, so its live gauges drop out of the sums.

    prometheus-client leaves this to a server hook (gunicorn's ``child_exit``); ``uvicorn
    --workers N`` has none, and a worker killed by the OOM killer never runs its own shutdown. The
    monitor's /metrics calls this before each scrape: one directory listing. Returns the pids."""
    from prometheus_client import multiprocess

    dead = set()
    for name in os.listdir(directory):
        stem, _, pid_text = name.removesuffix(".db").rpartition("_")
        if stem.startswith(("gauge_live", "gauge_all")) and pid_text.isdigit():
            pid = int(pid_text)
            if pid not in dead and not process_alive(pid):
                dead.add(pid)
    for pid in dead:
        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
    return sorted(dead)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def metrics_app(registry: CollectorRegistry, failed: Callable[[str], None]) -> Any:
    """The ASGI app serving /metrics: the registry's, or under ``PROMETHEUS_MULTIPROC_DIR`` the
    sum of every worker's files."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return make_asgi_app(registry)
    # Each worker writes its values to files; a scrape must read all workers' files, after
    # the dead workers' live gauges are dropped.
    from prometheus_client import multiprocess

    combined = CollectorRegistry()
    multiprocess.MultiProcessCollector(combined)  # type: ignore[no-untyped-call]
    scrape = make_asgi_app(combined)

    async def serve(scope: Any, receive: Any, send: Any) -> None:
        try:
            forget_dead_workers(directory)
        except Exception:
            failed("forget_dead_workers")
        await scrape(scope, receive, send)

    return serve
