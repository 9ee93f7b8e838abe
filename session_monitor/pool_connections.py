"""A pooled connection's own life, beside its checkouts (`pool.py`): opened (and how long that
took), closed, invalidated (and why). `PoolTracker` inherits these listeners."""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import TYPE_CHECKING, Any

from sqlalchemy import exc

if TYPE_CHECKING:
    from .observer import Fanout
    from .pool_state import EnginePool, PoolState, WatchedPool
    from .sessions import SessionTracker

_CONNECT_STARTED = "session_monitor.connect_started"


class ConnectionLifecycle:
    _emit: Fanout | None
    _sessions: SessionTracker

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
        if record is not None:
            record.info[_CONNECT_STARTED] = time.perf_counter()

    def _connect_evt(self, entry: EnginePool, dbapi_connection: Any, record: Any) -> None:
        started = record.info.pop(_CONNECT_STARTED, None)
        if started is not None:
            seconds = time.perf_counter() - started
            state = entry.state
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
        with state.lock:
            for watched in pools:
                if key in watched.idle:
                    del watched.idle[key]
            if self._emit is not None:
                self._publish_usage(state)

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
        key = ("true" if soft else "false", reason)
        invalidations = state.stats.invalidations
        with state.lock:
            invalidations[key] = invalidations.get(key, 0) + 1
        if self._emit is not None:
            view = None if checkout is None else checkout.view()
            self._emit.connection_invalidated(state.name, soft, view, reason)
