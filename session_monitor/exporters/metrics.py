"""The scrape-time Prometheus collector, built from the metrics contract (`metric_table.py`).

- `PrometheusCollector`, the default: the monitor counts into plain numbers (`stats.py`) and the
  collector turns them into metric families when Prometheus scrapes, so an event costs an
  increment instead of a prometheus_client update (about 0.5 µs each, 1 µs per histogram
  observation, 13 of them per session lifecycle). Gauges are derived from the same numbers at
  the same moment, so `active == opened - closed` holds in every scrape.
- `multiprocess.PrometheusMetrics`, under ``PROMETHEUS_MULTIPROC_DIR``, and the OpenTelemetry
  instruments (`tracing.py`) are observers of the monitor's events.

All three are built from the one table of `MetricSpec`s (`metric_table.py`) and are tested
against the same ground truth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from ..config import ConfigurationError
from ..state.stats import Histogram as StatsHistogram
from . import metric_table as table

if TYPE_CHECKING:
    from ..state.pool_state import PoolSnapshot
    from ..state.stats import SessionStats


# -- the default: families built at scrape time ----------------------------------------------


def _counter(spec: table.MetricSpec) -> CounterMetricFamily:
    return CounterMetricFamily(spec.name, spec.documentation, labels=spec.labels)


def _gauge(spec: table.MetricSpec) -> GaugeMetricFamily:
    return GaugeMetricFamily(spec.name, spec.documentation, labels=spec.labels)


def _histogram(spec: table.MetricSpec) -> HistogramMetricFamily:
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
        for spec in table.ALL_METRICS:
            yield _FAMILIES[spec.kind](spec)

    def collect(self) -> Iterator[Metric]:
        count, maximum, pending = (
            _gauge(table.CONNECTION_COUNT),
            _gauge(table.CONNECTION_MAX),
            _gauge(table.PENDING_REQUESTS),
        )
        timeouts, invalidations = _counter(table.TIMEOUTS), _counter(table.INVALIDATIONS)
        waited, cancelled = _counter(table.WAITED), _counter(table.CANCELLED_WAITS)
        peak = _gauge(table.USED_PEAK)
        wait, use = _histogram(table.WAIT_TIME), _histogram(table.USE_TIME)
        create = _histogram(table.CREATE_TIME)
        closed_connections = _counter(table.CONNECTIONS_CLOSED)
        allowed = _gauge(table.SERVER_CONNECTIONS_ALLOWED)
        server_failures = _counter(table.SERVER_VIEW_FAILURES)
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
            for soft, reason in sorted({*table.INVALIDATION_SERIES, *counted}):
                invalidations.add_metric([name, soft, reason], counted.get((soft, reason), 0))
            waited.add_metric([name], stats.waited)
            cancelled.add_metric([name], stats.cancelled)
            peak.add_metric([name], max(stats.peak_used, pool.used))
            for reason in sorted({*table.CLOSE_REASONS, *stats.closed}):
                closed_connections.add_metric([name, reason], stats.closed.get(reason, 0))
            if pool.server_allowed is not None:
                allowed.add_metric([name], pool.server_allowed)
            for reason in sorted({*table.SERVER_VIEW_FAILURE_REASONS, *stats.server_failures}):
                server_failures.add_metric([name, reason], stats.server_failures.get(reason, 0))
        opened, closed, active = (
            _counter(table.SESSIONS_OPENED),
            _counter(table.SESSIONS_CLOSED),
            _gauge(table.SESSIONS_ACTIVE),
        )
        duration, leaked = _histogram(table.SESSION_DURATION), _counter(table.SESSIONS_LEAKED)
        transactions, transaction_duration = (
            _counter(table.TRANSACTIONS),
            _histogram(table.TRANSACTION_DURATION),
        )
        idle_in_transaction = _counter(table.IDLE_IN_TRANSACTION)
        pitfalls = _counter(table.PITFALLS)
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
        errors = _counter(table.INTERNAL_ERRORS)
        for listener, failures in sorted(self._errors().items()):
            errors.add_metric([listener], failures)
        yield from (count, maximum, pending, timeouts, wait, use, create, invalidations)
        yield from (waited, cancelled, peak, closed_connections, allowed, server_failures)
        yield from (opened, closed, active, duration, leaked, transactions, transaction_duration)
        yield from (idle_in_transaction, pitfalls)
        yield errors


def register_all(registry: CollectorRegistry, collectors: list[Any]) -> None:
    """Register every collector, or none: a name taken already leaves the registry as it was."""
    done: list[Any] = []
    try:
        for collector in collectors:
            registry.register(collector)
            done.append(collector)
    except ValueError:
        for collector in done:
            registry.unregister(collector)
        raise ConfigurationError(
            "Another SessionMonitor already registered its metrics in this registry: build "
            "one monitor per process (it can watch several engines), call uninstrument() on "
            "the old one first, or pass registry=CollectorRegistry()."
        ) from None
