"""What a pool is, as the monitor keeps it: one SQLAlchemy `Pool` object, whatever its name.

- `WatchedPool`: one pool object's connections out and its waiting callers. Waits and nested
  checkouts are decided here, never across pools: a sync and an async engine on one database
  are two pools. ``engine.dispose()`` replaces the engine's pool with a new object, and so a new
  `WatchedPool`; the old one keeps the connections still out of it until they come back.
- `PoolState`: one pool_name label, what Prometheus shows. Every pool carrying the label is
  summed into it (two engines on one database are the connections this process holds to it),
  and its counters and histograms are theirs together.
- `EnginePool`: one root engine's place; its pool is read from the live engine
  (`EnginePool.pool`), so a dispose is noticed at the next checkout or scrape. An engine made by
  ``engine.execution_options(...)`` shares its parent's pool and events: it is its parent here
  (`root_engine`), never a pool of its own.

Derive, don't store: a QueuePool counts its idle connections itself (`pool.checkedin()`), and
that count, read when asked, is the idle gauge; it includes connections opened before the
monitor attached, and never those of a disposed pool. A pool is live while a watched engine
uses it now: only live pools' idle connections and bounds are counted.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import NamedTuple

from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool, QueuePool

from ..hooks.forking import new_rlock
from .records import TrackedCheckout
from .stats import PoolStats


def root_engine(engine: Engine) -> Engine:
    """The engine whose pool `engine` uses: itself, or the parent of an execution_options view."""
    while True:
        parent = engine.__dict__.get("_proxied")
        if not isinstance(parent, Engine):
            return engine
        engine = parent


def capacity(pool: Pool) -> int | None:
    """pool_size + max_overflow of a pool; None when it has no bound."""
    if not isinstance(pool, QueuePool):
        return None
    overflow: int = getattr(pool, "_max_overflow", -1)
    return None if overflow < 0 else pool.size() + overflow


class PoolSnapshot(NamedTuple):
    name: str
    idle: int
    used: int
    maximum: int | None
    stats: PoolStats
    server_allowed: int | None = None


class PoolState:
    """One pool_name label: the pools that carry it and their counted events, summed."""

    __slots__ = (
        "backends",
        "db_system",
        "engines",
        "lock",
        "name",
        "peak_ever",
        "pools",
        "server_allowed",
        "since",
        "stats",
        "used",
    )

    def __init__(self, name: str, db_system: str) -> None:
        self.name = name
        self.db_system = db_system
        # One lock for the label and its pools: observers get the label's sums in order.
        # RLock: garbage-collection callbacks may re-enter. Free again in a forked child.
        self.lock = new_rlock()
        self.engines: dict[int, EnginePool] = {}  # the live engines, by id()
        self.pools: dict[int, WatchedPool] = {}  # by id() of the Pool, dropped when collected
        self.stats = PoolStats()  # `pending` is summed from the pools at scrape time
        # The size of the pools' checked_out dicts together, changed with them under the lock:
        # the peak in use is compared with it on every checkout.
        self.used = 0
        # Server backend PIDs by connection record id, set when a connection opens and dropped
        # when it closes (`backends.py`); empty for a database without them.
        self.backends: dict[int, int] = {}
        # For the sizing advice: since when it is counted, and its most in use at once. The
        # scrape resets `stats.peak_used`; whoever resets it first folds it into `peak_ever`.
        self.since = time.monotonic()
        self.peak_ever = 0
        # What the server lets this pool's role open to its database (`server_view.py`).
        self.server_allowed: int | None = None

    def live_pools(self) -> list[WatchedPool]:
        """The pools its engines use now, each once (two engines may share one pool)."""
        found: dict[int, WatchedPool] = {}
        for entry in list(self.engines.values()):
            watched = entry.pool()
            if watched is not None:
                found[id(watched)] = watched
        return list(found.values())

    def maximum(self, live: list[WatchedPool] | None = None) -> int | None:
        """The live pools' bounds summed; None when none of them has one."""
        pools = self.live_pools() if live is None else live
        bounds = [watched.bound for watched in pools if watched.bound is not None]
        return sum(bounds) if bounds else None

    def usage(self) -> tuple[int, int, int, int | None]:
        """(used, idle, pending, maximum) of the label now: its pools summed."""
        live = self.live_pools()
        return (
            self.used,
            sum(watched.idle_count() for watched in live),
            sum(watched.pending for watched in list(self.pools.values())),
            self.maximum(live),
        )


class WatchedPool:
    """One SQLAlchemy Pool object: its connections out, its callers waiting, its idle ones."""

    __slots__ = (
        "__weakref__",
        "bound",
        "checked_in",
        "checked_out",
        "counts_itself",
        "idle",
        "label",
        "pending",
        "pool_ref",
    )

    def __init__(
        self,
        pool: Pool,
        label: PoolState,
        pool_ref: weakref.ref[Pool],
        checked_in: Callable[[TrackedCheckout, bool], None],
    ) -> None:
        self.pool_ref = pool_ref
        # The tracker's count of a checkout the pool takes back (`PoolTracker.checked_in`),
        # called by the connection record's checkin hook, which finds the checkout alone.
        self.checked_in = checked_in
        self.label = label
        self.bound = capacity(pool)  # a pool's size and overflow are fixed when it is made
        # A QueuePool knows its idle connections; other pools' are followed by their events.
        self.counts_itself = isinstance(pool, QueuePool)
        self.checked_out: dict[int, TrackedCheckout] = {}  # record id -> its checkout
        self.idle: dict[int, None] = {}  # record ids, for pools that do not count themselves
        self.pending = 0

    def idle_count(self) -> int:
        pool = self.pool_ref()
        if pool is None:
            return 0
        if self.counts_itself:
            return pool.checkedin()  # type: ignore[attr-defined, no-any-return]
        return len(self.idle)

    def will_wait(self, pool: Pool) -> bool:
        """Whether a caller arriving now finds no connection to take: it is pending."""
        # The pool's own count includes connections still being opened, which are neither
        # idle nor checked out yet: callers arriving at a cold pool wait for those too. At the
        # bound, a QueuePool has no idle connection either (checkedout() counts them out).
        bound = self.bound
        return bound is not None and pool.checkedout() >= bound  # type: ignore[attr-defined]


class EnginePool:
    """One root engine's place in its label; what its listeners are bound to."""

    __slots__ = ("__weakref__", "current", "engine_ref", "state", "watch")

    def __init__(
        self, engine: Engine, state: PoolState, watch: Callable[[PoolState, Pool], WatchedPool]
    ) -> None:
        self.engine_ref = weakref.ref(engine)
        self.state = state
        self.current: WatchedPool | None = None  # the watched pool of the engine's pool
        self.watch = watch

    def pool(self, pool: Pool | None = None) -> WatchedPool | None:
        """The WatchedPool of the engine's pool now (`pool`, when the caller read it already);
        None once the engine is collected."""
        if pool is None:
            engine = self.engine_ref()
            if engine is None:
                return None
            pool = engine.pool
        current = self.current
        if current is not None and current.pool_ref() is pool:
            return current
        current = self.current = self.watch(self.state, pool)
        return current

    def holding(self, key: int) -> WatchedPool | None:
        """The pool of this engine's label a connection record is checked out of, if any."""
        current = self.current
        if current is not None and key in current.checked_out:
            return current
        for watched in list(self.state.pools.values()):
            if key in watched.checked_out:
                return watched
        return None
