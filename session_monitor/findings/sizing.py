"""How big a pool should be: a short verdict per pool from what is known of it.

The facts (`PoolFacts`) come from four places: the engine (pool_size, max_overflow), the process
(the workers seen: the multiprocess directory's live workers, or the server's backends tagged with
this service's application_name), the server (max_connections, reserved slots, the role's and the
database's connection limits) and the monitor's own history since the pool was first seen (the
peak in use, the wait percentiles, timeouts, the demand by Little's law, and connections opened
beyond pool_size and closed again). The verdicts, each only when its evidence is there:

- **over-subscribed**: workers x (pool_size + max_overflow) is more than the server allows;
- **too small**: checkouts timed out, or the pool was full and callers waited (p95 above
  `SLOW_WAIT`);
- **churn**: connections opened beyond pool_size and closed again, steadily, because the steady
  demand is above pool_size.

A healthy pool gets no advice: an empty list.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ..state.stats import Histogram
from .server_view import ServerLimits

SLOW_WAIT = 0.1  # seconds: a p95 wait above this, with the pool full, is callers queueing
CHURN_MIN = 10  # overflow closes: fewer is a peak, not a pattern
CHURN_SHARE = 0.02  # of checkouts: above, the overflow is part of the steady load


class PoolFacts(NamedTuple):
    pool_name: str
    pool_size: int | None  # None: not a QueuePool
    max_overflow: int | None  # None: unbounded (-1) or not a QueuePool
    workers: int  # processes with this pool, as seen
    workers_seen_by: str  # how they were counted
    limits: ServerLimits | None
    peak: int  # most in use at once
    checkouts: int
    elapsed: float  # seconds of history
    hold_seconds: float  # checkout-to-checkin time, summed
    wait: Histogram
    timeouts: int
    overflow_closed: int
    leaked_holding: int = 0  # connections in use now by sessions whose request ended

    @property
    def capacity(self) -> int | None:
        if self.pool_size is None or self.max_overflow is None:
            return None
        return self.pool_size + self.max_overflow

    @property
    def demand(self) -> float:
        """Connections in use on average (Little's law: arrival rate x mean hold time)."""
        return self.hold_seconds / self.elapsed if self.elapsed > 0 else 0.0


def percentile(histogram: Histogram, share: float) -> float | None:
    """The bucket bound under which `share` of the observations fall; None without any."""
    total = histogram.count
    if total == 0:
        return None
    wanted, running = share * total, 0
    for bound, count in zip((*histogram.bounds, math.inf), histogram.counts, strict=True):
        running += count
        if running >= wanted:
            return bound
    return math.inf


def _seconds(value: float) -> str:
    return "over 30 s" if math.isinf(value) else f"{value:g} s"


def advice(facts: PoolFacts) -> list[str]:
    """The verdicts that apply, most urgent first; empty for a healthy pool."""
    verdicts = []
    capacity = facts.capacity
    limits = facts.limits
    if capacity is not None and limits is not None:
        possible = facts.workers * capacity
        allowed = limits.allowed
        if possible > allowed:
            caps = [f"{limits.max_connections} - {limits.reserved} reserved"]
            if limits.role_limit is not None:
                caps.append(f"the role's limit {limits.role_limit}")
            if limits.database_limit is not None:
                caps.append(f"the database's limit {limits.database_limit}")
            verdicts.append(
                f"over-subscribed: {facts.workers} worker{'s' if facts.workers != 1 else ''} x "
                f"({facts.pool_size} + {facts.max_overflow}) = {possible} connections may be "
                f"opened; the server allows {allowed} ({', '.join(caps)}), and "
                f"{limits.connected} are connected now: lower max_overflow, or put a pooler "
                "(PgBouncer) in front"
            )
    p95 = percentile(facts.wait, 0.95)
    full = capacity is not None and facts.peak >= capacity
    if facts.timeouts or (full and p95 is not None and p95 > SLOW_WAIT):
        wanted = max(math.ceil(facts.demand * 1.5), facts.peak + 1)
        room = ""
        if limits is not None and capacity is not None:
            spare = limits.allowed // max(facts.workers, 1)
            room = (
                f" (the server leaves room for {spare} per worker)"
                if wanted <= spare
                else f", but the server allows only {spare} per worker: add a pooler"
            )
        waited = "" if p95 is None else f" with p95 wait {_seconds(p95)}"
        timed_out = (
            f", {facts.timeouts} checkout{'s' if facts.timeouts != 1 else ''} timed out"
            if facts.timeouts
            else ""
        )
        leaked = facts.leaked_holding
        verdicts.append(
            f"too small: peak use {facts.peak} of {capacity if capacity is not None else '?'}"
            f"{waited}{timed_out}; demand by Little's law {facts.demand:.1f} connections"
            + (
                f"; {leaked} of the connections in use {'is' if leaked == 1 else 'are'} held "
                "by leaked sessions: fix the leaks first (the Leaks row, the holders)"
                if leaked
                else f": raise pool_size and max_overflow to about {wanted} in all{room}, or "
                "hold connections for less time (see the holders)"
            )
        )
    if (
        facts.pool_size is not None
        and facts.overflow_closed >= CHURN_MIN
        and facts.overflow_closed > CHURN_SHARE * facts.checkouts
    ):
        per_minute = facts.overflow_closed / max(facts.elapsed / 60, 1 / 60)
        wanted = max(facts.pool_size + 1, math.ceil(facts.demand + 1))
        verdicts.append(
            f"churn: {facts.overflow_closed} connections were opened beyond pool_size "
            f"{facts.pool_size} and closed again ({per_minute:.1f} a minute, for "
            f"{facts.checkouts} checkouts): raise pool_size to about {wanted}, so the steady "
            "load keeps its connections"
        )
    return verdicts


def summary(facts: PoolFacts) -> str:
    """The facts in one line, as the page shows them beside the verdicts."""
    parts = [f"{facts.workers} worker{'s' if facts.workers != 1 else ''} ({facts.workers_seen_by})"]
    capacity = facts.capacity
    if capacity is not None:
        parts.append(f"pool_size {facts.pool_size} + max_overflow {facts.max_overflow}")
        parts.append(f"{facts.workers * capacity} may be opened")
    if facts.limits is not None:
        parts.append(f"the server allows {facts.limits.allowed}")
        parts.append(f"{facts.limits.connected} connected at the server now")
    p95 = percentile(facts.wait, 0.95)
    parts.append(f"peak use {facts.peak}")
    if p95 is not None:
        parts.append(f"p95 wait ≤ {_seconds(p95)}")
    parts.append(f"demand {facts.demand:.2f}")
    return "; ".join(parts)
