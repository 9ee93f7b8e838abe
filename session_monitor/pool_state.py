"""What a pool is, as the monitor keeps it: engines, their bounds, and the state they share.

An engine made by ``engine.execution_options(...)`` shares its parent's pool and events: it is
its parent here (`root_engine`), never a pool of its own. A pool's bound is read from the live
engines when asked (`PoolState.maximum`), so a collected engine no longer counts.
"""

from __future__ import annotations

import threading
import weakref
from typing import NamedTuple

from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

from .records import TrackedCheckout
from .stats import PoolStats


def root_engine(engine: Engine) -> Engine:
    """The engine whose pool `engine` uses: itself, or the parent of an execution_options view."""
    while True:
        parent = engine.__dict__.get("_proxied")
        if not isinstance(parent, Engine):
            return engine
        engine = parent


def capacity(engine: Engine) -> int | None:
    """pool_size + max_overflow of the engine's current pool; None when it has no bound."""
    pool = engine.pool
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


class PoolState:
    """One pool name's connections and counters: engines with the same URL share it."""

    __slots__ = ("checked_out", "db_system", "engines", "idle", "lock", "name", "stats")

    def __init__(self, name: str, db_system: str) -> None:
        self.name = name
        self.db_system = db_system
        self.lock = threading.RLock()  # RLock: garbage-collection callbacks may re-enter
        self.checked_out: dict[int, TrackedCheckout] = {}
        # Record id -> the engine's entry; the sections use `del`, never calls.
        self.idle: dict[int, EnginePool] = {}
        self.engines: dict[int, EnginePool] = {}  # the live engines, by id()
        self.stats = PoolStats()

    def maximum(self) -> int | None:
        bounds = [b for entry in list(self.engines.values()) if (b := entry.capacity()) is not None]
        return sum(bounds) if bounds else None


class EnginePool:
    """One root engine's place in its pool name's state; what its listeners are bound to."""

    __slots__ = ("__weakref__", "engine_ref", "state")

    def __init__(self, engine: Engine, state: PoolState) -> None:
        self.engine_ref = weakref.ref(engine)
        self.state = state

    def capacity(self) -> int | None:
        engine = self.engine_ref()
        return None if engine is None else capacity(engine)

    def will_wait(self) -> bool:
        """Whether a caller arriving now finds no connection to take: it is pending."""
        if self.state.idle:
            return False  # the common case, answered without asking the pool
        engine = self.engine_ref()
        bound = None if engine is None else capacity(engine)
        # The pool's own count includes connections still being opened, which are neither
        # idle nor checked out yet: callers arriving at a cold pool wait for those too.
        return bound is not None and engine.pool.checkedout() >= bound  # type: ignore[union-attr]
