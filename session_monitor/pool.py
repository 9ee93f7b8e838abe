"""Pool listeners: checkouts, checkins, connection creation and invalidation, per engine.

State follows sqlalchemy-collectd: the pool's connections are kept as sets of record ids (idle)
and a dict of checkouts (used), and the gauges are *set from their sizes*, so a missed or
repeated event can never drive a gauge negative. Each listener is a few lines.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from types import FrameType
from typing import Any

from sqlalchemy import exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import QueuePool

from ._hooks import acquiring_session
from ._listeners import Guard, ListenerSet
from .context import current_request
from .leaks import LeakLog
from .metrics import PoolSnapshot
from .naming import pool_name_for
from .observer import Fanout
from .records import TrackedCheckout
from .sessions import SessionTracker
from .stacks import format_stack
from .stats import PoolStats

# The innermost raw_connection() of this context: when it started waiting, and the frame of the
# Connection (a Core or ORM session) it is for; None for a raw DBAPI connection.
_acquisition: ContextVar[tuple[float, FrameType | None] | None] = ContextVar(
    "session_monitor_acquisition", default=None
)
_CONNECT_STARTED = "session_monitor.connect_started"


class PoolState:
    """One pool name's connections and counters: engines with the same URL share it."""

    __slots__ = ("capacities", "checked_out", "db_system", "idle", "lock", "name", "stats")

    def __init__(self, name: str, db_system: str) -> None:
        self.name = name
        self.db_system = db_system
        self.lock = threading.RLock()  # RLock: garbage-collection callbacks may re-enter
        self.checked_out: dict[int, TrackedCheckout] = {}
        # Record ids; a dict, not a set, so the lock's sections can use `del` instead of calls.
        self.idle: dict[int, None] = {}
        self.capacities: weakref.WeakKeyDictionary[Engine, int] = weakref.WeakKeyDictionary()
        self.stats = PoolStats()

    def will_wait(self, engine: Engine) -> bool:
        """Whether a caller arriving now finds no connection to take: it is pending."""
        if self.idle:
            return False  # the common case, answered without asking the pool
        capacity = self.capacities.get(engine)
        # The pool's own count includes connections still being opened, which are neither
        # idle nor checked out yet: callers arriving at a cold pool wait for those too.
        return capacity is not None and engine.pool.checkedout() >= capacity  # type: ignore[attr-defined]


def _capacity(engine: Engine) -> int | None:
    pool = engine.pool
    if not isinstance(pool, QueuePool):
        return None
    overflow: int = getattr(pool, "_max_overflow", -1)
    return None if overflow < 0 else pool.size() + overflow


class PoolTracker:
    def __init__(
        self,
        sessions: SessionTracker,
        observers: Fanout | None,
        guard: Guard,
        listeners: ListenerSet,
        leak_log: LeakLog,
        *,
        every_engine: bool,
        pool_name: str | None,
    ) -> None:
        self._sessions = sessions
        self._emit = observers
        self._guard = guard
        self._listeners = listeners
        self._leak_log = leak_log
        self._every_engine = every_engine
        self._pool_name = pool_name
        # By id() of the engine, removed when the engine is collected: one dict lookup per
        # acquisition, where a WeakKeyDictionary would build a weak reference each time.
        self._engines: dict[int, PoolState] = {}
        self._states: dict[str, PoolState] = {}
        self._lock = threading.Lock()
        # Checkouts that belong to a session, by id() of their connection proxy, which a
        # Connection holds: the transaction hooks find a connection's checkout with one lookup.
        self.by_proxy: dict[int, TrackedCheckout] = {}
        # ... and by id() of the Connection using them, from its first transaction on: once a
        # connection is invalidated it no longer holds its proxy.
        self.by_connection: dict[int, TrackedCheckout] = {}

    # -- engines -----------------------------------------------------------------------------

    def state_for(self, engine: Engine) -> PoolState | None:
        state = self._engines.get(id(engine))
        if state is None and self._every_engine:
            state = self.add_engine(engine)
        return state

    def add_engine(self, engine: Engine) -> PoolState:
        with self._lock:
            state = self._engines.get(id(engine))
            if state is not None:
                return state
            name = self._pool_name or pool_name_for(engine.url)
            state = self._states.get(name)
            if state is None:
                state = self._states[name] = PoolState(name, engine.dialect.name)
            self._listen(engine, state)
            self._engines[id(engine)] = state
            weakref.finalize(engine, self._engines.pop, id(engine), None)
        capacity = _capacity(engine)
        with state.lock:
            if capacity is not None:
                state.capacities[engine] = capacity
                state.stats.maximum = sum(state.capacities.values())
                if self._emit is not None:
                    self._emit.pool_capacity(name, state.stats.maximum)
            if self._emit is not None:
                self._publish_usage(state)
        return state

    def snapshot(self) -> list[PoolSnapshot]:
        pools = []
        for state in list(self._states.values()):
            with state.lock:
                pools.append(
                    PoolSnapshot(
                        state.name, len(state.idle), len(state.checked_out), state.stats.copy()
                    )
                )
        return pools

    def _listen(self, engine: Engine, state: PoolState) -> None:
        failed = self._guard.failed

        def bind(name: str, fn: Callable[..., None]) -> Callable[..., None]:
            # One frame per event: these run on every checkout.
            def listener(*args: Any) -> None:
                try:
                    fn(state, *args)
                except Exception:
                    failed(name)

            listener.__name__ = f"session_monitor_{name}"
            return listener

        listen = self._listeners.listen
        listen(engine, "do_connect", bind("do_connect", self._do_connect_evt))
        listen(engine, "connect", bind("connect", self._connect_evt))
        listen(engine, "checkout", bind("checkout", self._checkout_evt))
        listen(engine, "checkin", bind("checkin", self._checkin_evt))
        listen(engine, "close", bind("close", self._close_evt))
        listen(engine, "detach", bind("detach", self._detach_evt))
        listen(engine, "invalidate", bind("invalidate", self._invalidate_evt))
        listen(engine, "soft_invalidate", bind("soft_invalidate", self._soft_invalidate_evt))

    def checkouts(self) -> Iterator[TrackedCheckout]:
        for state in list(self._states.values()):
            with state.lock:
                held = list(state.checked_out.values())
            yield from held

    @property
    def tracked_checkouts(self) -> int:
        return sum(len(state.checked_out) for state in list(self._states.values()))

    # -- waiting (called from the raw_connection hook) ---------------------------------------

    def acquire(
        self, engine: Engine, call: Callable[[Engine], Any], opening: FrameType | None
    ) -> Any:
        try:
            state = self.state_for(engine)
            if state is None:
                return call(engine)
            pending = state.will_wait(engine)
            if pending:
                self._pending(state, +1)
        except Exception:
            self._guard.failed("raw_connection")
            return call(engine)
        started = time.perf_counter()
        token = _acquisition.set((started, opening))
        try:
            return call(engine)
        except exc.TimeoutError:
            self._timed_out(state, time.perf_counter() - started)
            raise
        finally:
            _acquisition.reset(token)
            if pending:
                self._pending(state, -1)

    def _pending(self, state: PoolState, delta: int) -> None:
        try:
            with state.lock:
                state.stats.pending += delta
            if self._emit is not None:
                self._emit.pool_pending(state.name, delta)
        except Exception:
            self._guard.failed("pool_pending")

    def _timed_out(self, state: PoolState, waited: float) -> None:
        try:
            with state.lock:
                state.stats.timeouts += 1
            if self._emit is not None:
                orm_session = acquiring_session.get()
                session = None if orm_session is None else self._sessions.tracked(orm_session)
                self._emit.checkout_timed_out(state.name, waited, session)
        except Exception:
            self._guard.failed("timeout")

    # -- pool events -------------------------------------------------------------------------

    def _publish_usage(self, state: PoolState) -> None:
        # Called under state.lock, so concurrent updates reach observers' gauges in order.
        assert self._emit is not None
        self._emit.pool_usage(state.name, len(state.idle), len(state.checked_out))

    def _do_connect_evt(
        self, state: PoolState, dialect: Any, record: Any, cargs: Any, cparams: Any
    ) -> None:
        if record is not None:
            record.info[_CONNECT_STARTED] = time.perf_counter()

    def _connect_evt(self, state: PoolState, dbapi_connection: Any, record: Any) -> None:
        started = record.info.pop(_CONNECT_STARTED, None)
        if started is not None:
            seconds = time.perf_counter() - started
            histogram = state.stats.create
            bucket = histogram.bucket(seconds)
            with state.lock:
                histogram.counts[bucket] += 1
                histogram.sum += seconds
            if self._emit is not None:
                self._emit.connection_created(state.name, seconds)

    def _checkout_evt(
        self, state: PoolState, dbapi_connection: Any, record: Any, proxy: Any
    ) -> None:
        now = time.perf_counter()
        acquisition = _acquisition.get()
        if acquisition is None:  # Pool.connect() called directly
            wait, opening = 0.0, None
        else:
            wait, opening = now - acquisition[0], acquisition[1]
        request = current_request.get()
        orm_session = acquiring_session.get()
        owner = None if orm_session is None else orm_session.info.get(self._sessions.key)
        if owner is None and opening is not None:
            # Checked out by the app through Core: the connection is the session. Its
            # application frame is above the Connection being opened, not the pool's frames.
            owner = self._sessions.open("connection", state, opening.f_back, request)
        key = id(record)
        checkout = TrackedCheckout(state.name, key, owner, request, now)
        if owner is not None:
            owner.checkouts.append(checkout)
            checkout.proxy_key = id(proxy)
            self.by_proxy[checkout.proxy_key] = checkout
            if owner.kind == "connection" or self._emit is not None:
                # How a Core connection dropped unclosed is told at checkin; observers may
                # want the proxy.
                checkout.fairy_ref = weakref.ref(proxy)
        histogram = state.stats.wait
        bucket = histogram.bucket(wait)
        idle = state.idle
        with state.lock:
            state.checked_out[key] = checkout
            if key in idle:
                del idle[key]
            histogram.counts[bucket] += 1
            histogram.sum += wait
            if self._emit is not None:
                self._publish_usage(state)
        if self._emit is not None:
            self._emit.connection_checked_out(checkout, wait)

    def _checkin_evt(self, state: PoolState, dbapi_connection: Any, record: Any) -> None:
        # Without a DBAPI connection (invalidated) nothing goes back to the idle connections.
        self._taken_back(state, id(record), idle=dbapi_connection is not None)

    def _taken_back(self, state: PoolState, key: int, *, idle: bool) -> None:
        """The pool has a connection back (checkin) or lets it go (detach): count its use."""
        now = time.perf_counter()
        checked_out, idle_connections = state.checked_out, state.idle
        checkout = checked_out.get(key)
        held = 0.0 if checkout is None else now - checkout.checked_out_at
        histogram = state.stats.use
        bucket = histogram.bucket(held)
        with state.lock:
            if key in checked_out:
                del checked_out[key]
            if idle:
                idle_connections[key] = None
            elif key in idle_connections:
                del idle_connections[key]
            if checkout is not None:
                histogram.counts[bucket] += 1
                histogram.sum += held
            if self._emit is not None:
                self._publish_usage(state)
        if checkout is not None:
            self._returned(checkout, held)

    def _returned(self, checkout: TrackedCheckout, held: float) -> None:
        if checkout.returned:
            return
        checkout.returned = True
        owner = checkout.owner
        if checkout.transaction_started_at is not None:
            # Still open when the pool takes it back: dropped, invalidated or detached.
            self._sessions.end_transaction(checkout, "close")
        if self._emit is not None:
            self._emit.connection_checked_in(checkout, held)
        if owner is None:
            return
        # Only this checkout's own entries: a collected proxy's id() may already be reused.
        for index, key in (
            (self.by_connection, checkout.connection_key),
            (self.by_proxy, checkout.proxy_key),
        ):
            if key is not None and index.get(key) is checkout:
                del index[key]
        if checkout in owner.checkouts:
            owner.checkouts.remove(checkout)
        if checkout.age_reported:
            self._leak_log.came_back(checkout, held)
        if owner.kind == "connection":
            self._sessions.close(owner, collected=checkout.collected)

    def _close_evt(self, state: PoolState, dbapi_connection: Any, record: Any) -> None:
        key = id(record)
        with state.lock:
            if key in state.idle:
                del state.idle[key]
            if self._emit is not None:
                self._publish_usage(state)

    def _detach_evt(self, state: PoolState, dbapi_connection: Any, record: Any) -> None:
        self._taken_back(state, id(record), idle=False)

    def _invalidate_evt(
        self, state: PoolState, dbapi_connection: Any, record: Any, exception: Any
    ) -> None:
        self._invalidated(state, record, soft=False)

    def _soft_invalidate_evt(
        self, state: PoolState, dbapi_connection: Any, record: Any, exception: Any
    ) -> None:
        self._invalidated(state, record, soft=True)

    def _invalidated(self, state: PoolState, record: Any, *, soft: bool) -> None:
        checkout = state.checked_out.get(id(record))
        if not soft and checkout is not None and checkout.transaction_started_at is not None:
            # The connection and its transaction are gone: whatever the app does next, that
            # transaction was rolled back.
            self._sessions.end_transaction(checkout, "rollback")
        with state.lock:
            if soft:
                state.stats.soft_invalidated += 1
            else:
                state.stats.invalidated += 1
        if self._emit is not None:
            self._emit.connection_invalidated(state.name, soft, checkout)

    def report_age(self, checkout: TrackedCheckout, threshold: float) -> None:
        if checkout.owner is None:
            return
        stack = checkout.owner.stack
        detail = (
            f"Held for {checkout.held_for:.3f}s (threshold {threshold:g}s). Opened at:\n"
            + format_stack(stack)
            if stack
            else f"Held for {checkout.held_for:.3f}s (threshold {threshold:g}s); "
            "set capture_stacks=True to log the whole application stack."
        )
        self._sessions.leaked(checkout.owner, "age", detail)

    # -- transactions: called by the Connection and Transaction hooks (never raise) ---------

    def transaction_began(self, connection: Connection) -> None:
        try:
            proxy = connection._dbapi_connection
            checkout = None if proxy is None else self.by_proxy.get(id(proxy))
            if checkout is not None:
                self._sessions.begin_transaction(checkout)
                checkout.connection_key = id(connection)
                self.by_connection[id(connection)] = checkout
        except Exception:
            self._guard.failed("transaction_begin")

    def transaction_committed(self, connection: Connection) -> None:
        try:
            checkout = self.by_connection.get(id(connection))
            if checkout is not None and not checkout.returned:
                self._sessions.end_transaction(checkout, "commit")
        except Exception:
            self._guard.failed("transaction_commit")

    def transaction_rolling_back(self, connection: Connection) -> None:
        try:
            checkout = self.by_connection.get(id(connection))
            if checkout is not None and not checkout.returned:
                outcome = "close" if checkout.transaction_closing else "rollback"
                self._sessions.end_transaction(checkout, outcome)
        except Exception:
            self._guard.failed("transaction_rollback")

    def transaction_closing(self, connection: Connection, closing: bool) -> None:
        """Around Transaction.close(): a rollback it makes ends the transaction as `close`."""
        try:
            checkout = self.by_connection.get(id(connection))
            if checkout is not None and not checkout.returned:
                open_transaction = checkout.transaction_started_at is not None
                checkout.transaction_closing = closing and open_transaction
        except Exception:
            self._guard.failed("transaction_close")
