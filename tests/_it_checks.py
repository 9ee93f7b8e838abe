"""Assertions shared by the integration tests: the metric invariants and per-route counts.

pytest rewrites asserts only in test modules, so every assert here says what it compared.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field

from conftest import sample, total
from prometheus_client import CollectorRegistry
from prometheus_client.samples import Sample

REASONS = ("request_end", "age", "gc")
OUTCOMES = ("commit", "rollback", "close")


def route_counts(registry: CollectorRegistry, route: str, method: str) -> dict[str, float]:
    """Every session and transaction number of one (route, method), for a one-line comparison."""
    labels = {"route": route, "method": method}
    counts = {
        "opened": sample(registry, "sqlalchemy_sessions_opened_total", **labels),
        "closed": sample(registry, "sqlalchemy_sessions_closed_total", **labels),
        "active": sample(registry, "sqlalchemy_sessions_active", **labels),
    }
    for reason in REASONS:
        counts[f"leaked_{reason}"] = sample(
            registry, "sqlalchemy_sessions_leaked_total", reason=reason, **labels
        )
    for outcome in OUTCOMES:
        counts[outcome] = sample(
            registry, "sqlalchemy_transactions_total", outcome=outcome, **labels
        )
    return counts


def expected_counts(
    opened: int = 0,
    closed: int = 0,
    active: int = 0,
    *,
    leaked_request_end: int = 0,
    leaked_age: int = 0,
    leaked_gc: int = 0,
    commit: int = 0,
    rollback: int = 0,
    close: int = 0,
) -> dict[str, float]:
    return {
        "opened": opened,
        "closed": closed,
        "active": active,
        "leaked_request_end": leaked_request_end,
        "leaked_age": leaked_age,
        "leaked_gc": leaked_gc,
        "commit": commit,
        "rollback": rollback,
        "close": close,
    }


def gauge_samples(registry: CollectorRegistry) -> Iterator[Sample]:
    for metric in registry.collect():
        if metric.type == "gauge":
            yield from metric.samples


def assert_invariants(registry: CollectorRegistry) -> None:
    """opened == closed + active (per label set too), checkouts == checkins + used, no gauge < 0."""
    opened = total(registry, "sqlalchemy_sessions_opened_total")
    closed = total(registry, "sqlalchemy_sessions_closed_total")
    active = total(registry, "sqlalchemy_sessions_active")
    assert opened == closed + active, f"opened {opened} != closed {closed} + active {active}"
    for metric in registry.collect():
        for s in metric.samples:
            if s.name == "sqlalchemy_sessions_opened_total":
                labels = dict(s.labels)
                per_label = (
                    s.value,
                    sample(registry, "sqlalchemy_sessions_closed_total", **labels),
                    sample(registry, "sqlalchemy_sessions_active", **labels),
                )
                assert per_label[0] == per_label[1] + per_label[2], (
                    f"{labels}: opened, closed, active = {per_label}"
                )
    checkouts = total(registry, "db_client_connection_wait_time_seconds_count")
    checkins = total(registry, "db_client_connection_use_time_seconds_count")
    used = total(registry, "db_client_connection_count", db_client_connection_state="used")
    assert checkouts == checkins + used, (
        f"checkouts {checkouts} != checkins {checkins} + used {used}"
    )
    negative = [(s.name, s.labels, s.value) for s in gauge_samples(registry) if s.value < 0]
    assert negative == [], f"negative gauges: {negative}"
    # The monitor's own listeners never failed (they swallow and count their exceptions).
    errors = {
        s.labels["listener"]: s.value
        for metric in registry.collect()
        for s in metric.samples
        if s.name == "session_monitor_internal_errors_total"
    }
    assert errors == {}, f"session_monitor_internal_errors_total: {errors}"


@dataclass
class GaugeWatch:
    """What a GaugeSampler saw while the load ran."""

    samples: int = 0
    negative: list[tuple[str, dict[str, str], float]] = field(default_factory=list)
    over_max: list[tuple[str, float, float]] = field(default_factory=list)
    max_used: dict[str, float] = field(default_factory=dict)
    max_pending: dict[str, float] = field(default_factory=dict)
    # (used, pending) pairs seen, per pool.
    seen: dict[str, set[tuple[float, float]]] = field(default_factory=dict)


class GaugeSampler:
    """Read every gauge of a registry every few milliseconds from its own task."""

    def __init__(self, registry: CollectorRegistry, interval: float = 0.003) -> None:
        self.registry = registry
        self.interval = interval
        self.watch = GaugeWatch()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def look(self) -> None:
        watch = self.watch
        watch.samples += 1
        used: dict[str, float] = {}
        pending: dict[str, float] = {}
        maximum: dict[str, float] = {}
        for s in gauge_samples(self.registry):
            if s.value < 0:
                watch.negative.append((s.name, dict(s.labels), s.value))
            pool = s.labels.get("db_client_connection_pool_name", "")
            if s.name == "db_client_connection_count" and s.labels.get("db_client_connection_state") == "used":
                used[pool] = s.value
                watch.max_used[pool] = max(watch.max_used.get(pool, 0.0), s.value)
            elif s.name == "db_client_connection_max":
                maximum[pool] = s.value
            elif s.name == "db_client_connection_pending_requests":
                pending[pool] = s.value
                watch.max_pending[pool] = max(watch.max_pending.get(pool, 0.0), s.value)
        for pool, value in used.items():
            watch.seen.setdefault(pool, set()).add((value, pending.get(pool, 0.0)))
            if pool not in maximum or value > maximum[pool]:
                watch.over_max.append((pool, value, maximum.get(pool, float("nan"))))

    async def _run(self) -> None:
        while not self._stop.is_set():
            self.look()
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> GaugeWatch:
        self._task = asyncio.create_task(self._run())
        return self.watch

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task
        self.look()
