"""Session and transaction bookkeeping: open, close, leak, and transaction outcomes.

Definitions (see the README): an ORM Session is *opened* when it first asks for a connection
(its first statement or flush) and *closed* by ``close()``, ``invalidate()``, ``reset()``, the
end of its ``with`` block, or the garbage collector. A Core Connection the app checks out itself
is a session from checkout to checkin. A session that never touches the database holds nothing
and is not counted.
"""

from __future__ import annotations

import threading
import time
import weakref
from types import FrameType
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from ._listeners import Guard
from .config import MonitorConfig
from .context import RequestScope, current_request
from .leaks import LeakLog
from .naming import NO_REQUEST
from .observer import Fanout
from .records import SessionKind, TrackedCheckout, TrackedSession
from .stacks import application_location, application_stack
from .stats import HOLD_BUCKETS, Histogram, SessionStats

if TYPE_CHECKING:
    from .pool import PoolState


class SessionTracker:
    def __init__(
        self,
        config: MonitorConfig,
        observers: Fanout | None,
        guard: Guard,
        leak_log: LeakLog,
    ) -> None:
        self._config = config
        self._emit = observers  # None when the metrics are all there is: no call at all
        self._guard = guard
        self._leak_log = leak_log
        # The key under which this monitor keeps its record in `Session.info`.
        self.key = object()
        # Open ORM sessions by id() of their weak reference (`TrackedSession.session_ref`);
        # one bound method serves as every reference's callback.
        self._live: dict[int, TrackedSession] = {}
        self._collected_callback = self._collected
        # Guards the counters and each record's closed and leak_reason. Reentrant: a garbage
        # collection during a snapshot's copies may close a collected session.
        self._lock = threading.RLock()
        self._stats: dict[tuple[str, str], SessionStats] = {}

    @property
    def live_sessions(self) -> int:
        return len(self._live)

    def snapshot(self) -> dict[tuple[str, str], SessionStats]:
        with self._lock:
            return {key: stats.copy() for key, stats in self._stats.items()}

    # -- lifecycle ---------------------------------------------------------------------------

    def open(
        self,
        kind: SessionKind,
        pool: PoolState,
        frame: FrameType | None,
        request: RequestScope | None,
    ) -> TrackedSession:
        if self._config.capture_stacks:
            stack = application_stack(frame, self._config.stack_depth)
            location = stack[0] if stack else None
        else:
            stack = ()
            location = application_location(frame)
        key = (NO_REQUEST, NO_REQUEST) if request is None else (request.route, request.method)
        stats = self._stats.get(key)
        if stats is None:
            new = SessionStats()
            with self._lock:
                stats = self._stats.setdefault(key, new)
        with self._lock:
            stats.opened += 1
        session = TrackedSession(
            kind, pool.name, pool.db_system, key[0], key[1], request, location, stack, stats
        )
        if request is not None:
            request.sessions.append(session)
        if self._emit is not None:
            self._emit.session_opened(session)
        return session

    def open_orm(self, orm_session: Session, pool: PoolState, frame: FrameType) -> None:
        tracked = self.open("session", pool, frame, current_request.get())
        orm_session.info[self.key] = tracked
        # The record keeps its reference alive, so the id() stays unique while it is listed.
        tracked.session_ref = weakref.ref(orm_session, self._collected_callback)
        self._live[id(tracked.session_ref)] = tracked

    def tracked(self, orm_session: Session) -> TrackedSession | None:
        info: dict[Any, Any] | None = orm_session.__dict__.get("info")
        return None if info is None else info.get(self.key)

    def _collected(self, ref: weakref.ref[Session]) -> None:
        try:
            tracked = self._live.get(id(ref))
            if tracked is not None:
                self.close(tracked, collected=True)
        except Exception:
            self._guard.failed("session_collected")

    def close_orm(self, orm_session: Session) -> None:
        """Called by the Session close hook: never raises."""
        try:
            info: dict[Any, Any] | None = orm_session.__dict__.get("info")
            tracked = None if info is None else info.pop(self.key, None)
            if tracked is not None:
                self.close(tracked)
        except Exception:
            self._guard.failed("session_close")

    def close(self, tracked: TrackedSession, *, collected: bool = False) -> None:
        duration = time.perf_counter() - tracked.opened_at
        stats = tracked.stats
        histogram = stats.duration
        bucket = histogram.bucket(duration)
        with self._lock:
            if tracked.closed:
                return
            tracked.closed = True
            stats.closed += 1
            histogram.counts[bucket] += 1
            histogram.sum += duration
        if tracked.session_ref is not None:
            self._live.pop(id(tracked.session_ref), None)
            # Dropping the reference drops its callback: a closed session dies unobserved.
            tracked.session_ref = None
        for checkout in tracked.checkouts:
            # Dropped with a transaction open: it ended with the session, whichever of the two
            # the garbage collector reached first.
            if checkout.transaction_started_at is not None:
                self.end_transaction(checkout, "close")
        if collected:
            self.leaked(tracked, "gc")
        if self._emit is not None:
            self._emit.session_closed(tracked, duration)

    def leaked(self, tracked: TrackedSession, reason: str, detail: str = "") -> None:
        with self._lock:
            if tracked.leak_reason is not None:
                return
            tracked.leak_reason = reason
            leaked = tracked.stats.leaked
            leaked[reason] = leaked.get(reason, 0) + 1  # rare: a call here is fine
        if self._emit is not None:
            self._emit.session_leaked(tracked, reason)
        self._leak_log.leaked(tracked, reason, detail)

    def request_finished(self, request: RequestScope) -> None:
        """Report what the request opened and left holding a connection it acquired."""
        for tracked in request.sessions:
            if (
                not tracked.closed
                and tracked.leak_reason is None
                and tracked.holds_connection_from(request)
            ):
                self.leaked(tracked, "request_end")
        request.sessions.clear()

    # -- transactions: one per connection, from the Connection and Transaction hooks ---------

    def begin_transaction(self, checkout: TrackedCheckout) -> None:
        if checkout.transaction_started_at is not None:
            self.end_transaction(checkout, "close")
        checkout.transaction_started_at = time.perf_counter()
        checkout.transaction_closing = False
        if checkout.owner is not None:
            checkout.owner.transaction_count += 1

    def end_transaction(self, checkout: TrackedCheckout, outcome: str) -> None:
        started = checkout.transaction_started_at
        if started is None:
            return
        checkout.transaction_started_at = None
        checkout.transaction_closing = False
        owner = checkout.owner
        if owner is None:
            return
        duration = time.perf_counter() - started
        by_outcome = owner.stats.transactions
        histogram = by_outcome.get(outcome)
        if histogram is None:
            new = Histogram(HOLD_BUCKETS)
            with self._lock:
                histogram = by_outcome.setdefault(outcome, new)
        bucket = histogram.bucket(duration)
        with self._lock:
            histogram.counts[bucket] += 1
            histogram.sum += duration
        if self._emit is not None:
            self._emit.transaction_ended(owner, outcome, duration)
