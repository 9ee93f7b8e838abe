"""A pooled connection's own life, beside its checkouts (`pool.py`): opened (how long that
took, and its server backend), closed (and why), invalidated (and why). `PoolTracker` inherits
these listeners; they run when a connection opens or closes, never per checkout."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import exc
from sqlalchemy.pool import NullPool, Pool, QueuePool

from .backends import ApplicationNameTagger, backend_pid

if TYPE_CHECKING:
    from .observer import Fanout
    from .pool_state import EnginePool, PoolState, WatchedPool
    from .sessions import SessionTracker

_CONNECT_STARTED = "session_monitor.connect_started"
_INVALIDATED = "session_monitor.invalidated"

def close_reason(record: Any) -> str:
    """Why a pool closes a connection (`metric_table.CLOSE_REASONS`), told from the pool's
    state at its close event: invalidated (an error, a failed pre-ping, the app's invalidate(),
    the whole pool's invalidation), overflow, unpooled, recycled, or disposed."""
    if record.info.pop(_INVALIDATED, False):
        return "invalidated"
    pool = getattr(record, "_ConnectionRecord__pool", None)
    if isinstance(pool, NullPool):
        return "unpooled"
    if isinstance(pool, QueuePool) and pool._pool.full():
        # The only close made while the queue is full: the pool had no room for it.
        return "overflow"
    started = getattr(record, "starttime", None)
    if isinstance(pool, Pool) and isinstance(started, float):
        if pool._invalidate_time > started or record._soft_invalidate_time > started:
            return "invalidated"
        if pool._recycle > -1 and time.time() - started > pool._recycle:
            return "recycled"
    return "disposed"


class ConnectionLifecycle:
    _emit: Fanout | None
    _sessions: SessionTracker
    tagger: ApplicationNameTagger | None
    # Called after a PostgreSQL connection opened: the server view's startup check, made
    # once per pool name (`server_view.py`).
    first_connected: Callable[[PoolState], None] | None

    def _publish_usage(self, state: PoolState, returning: WatchedPool | None = None) -> None:
        """The name's pools summed, as the scrape shows them. `returning`: the pool whose
        checkin event runs now, before the pool puts the connection back among its idle ones."""
        # Called under state.lock, so concurrent updates reach observers' gauges in order.
        assert self._emit is not None
        live = state.live_pools()
        idle = sum(watched.idle_count() for watched in live)
        if returning is not None and returning.counts_itself and returning in live:
            idle += 1
        self._emit.pool_usage(state.name, idle, state.used)

    def _do_connect_evt(
        self, entry: EnginePool, dialect: Any, record: Any, cargs: Any, cparams: Any
    ) -> None:
        if record is None:
            return  # not a pool's connection: the server view's own, left untagged
        record.info[_CONNECT_STARTED] = time.perf_counter()
        if self.tagger is not None and entry.state.db_system == "postgresql":
            self.tagger.tag(dialect.driver, cparams)

    def _connect_evt(self, entry: EnginePool, dbapi_connection: Any, record: Any) -> None:
        state = entry.state
        if state.db_system == "postgresql":
            pid = backend_pid(record)
            with state.lock:
                if pid is None:
                    state.backends.pop(id(record), None)
                else:
                    state.backends[id(record)] = pid
            if self.first_connected is not None:
                self.first_connected(state)
        started = record.info.pop(_CONNECT_STARTED, None)
        if started is not None:
            seconds = time.perf_counter() - started
            histogram = state.stats.create
            bucket = bisect_left(histogram.bounds, seconds)
            with state.lock:
                histogram.counts[bucket] += 1
                histogram.sum += seconds
            if self._emit is not None:
                self._emit.connection_created(state.name, seconds)

    def _close_evt(self, entry: EnginePool, dbapi_connection: Any, record: Any) -> None:
        key = id(record)
        state = entry.state
        pools = list(state.pools.values())
        reason = close_reason(record)
        closed = state.stats.closed
        with state.lock:
            closed[reason] = closed.get(reason, 0) + 1
            state.backends.pop(key, None)
            for watched in pools:
                if key in watched.idle:
                    del watched.idle[key]
            if self._emit is not None:
                self._publish_usage(state)
        if self._emit is not None:
            self._emit.connection_closed(state.name, reason)

    def _invalidate_evt(
        self, entry: EnginePool, dbapi_connection: Any, record: Any, exception: Any
    ) -> None:
        self._invalidated(entry, record, exception, soft=False)

    def _soft_invalidate_evt(
        self, entry: EnginePool, dbapi_connection: Any, record: Any, exception: Any
    ) -> None:
        self._invalidated(entry, record, exception, soft=True)

    def _invalidated(self, entry: EnginePool, record: Any, exception: Any, *, soft: bool) -> None:
        # What SQLAlchemy lets us tell apart: the app's own invalidate() passes no exception;
        # a failed pre-ping (or a checkout listener's DisconnectionError) a DisconnectionError;
        # a disconnect seen by a statement the driver's error. A recycle is no invalidation.
        if exception is None:
            reason = "explicit"
        elif isinstance(exception, exc.DisconnectionError):
            reason = "pre_ping"
        else:
            reason = "error"
        state = entry.state
        record_key = id(record)
        holding = entry.holding(record_key)
        checkout = None if holding is None else holding.checked_out.get(record_key)
        if not soft and checkout is not None and checkout.transaction_started_at is not None:
            # The connection and its transaction are gone: whatever the app does next, that
            # transaction was rolled back.
            self._sessions.end_transaction(checkout, "rollback")
        if not soft:
            record.info[_INVALIDATED] = True  # read by the close event that follows at once
        key = ("true" if soft else "false", reason)
        invalidations = state.stats.invalidations
        with state.lock:
            invalidations[key] = invalidations.get(key, 0) + 1
        if self._emit is not None:
            view = None if checkout is None else checkout.view()
            self._emit.connection_invalidated(state.name, soft, view, reason)
