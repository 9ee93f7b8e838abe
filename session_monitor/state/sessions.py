"""Sessions, ORM and Core, and their transactions: open, close, outcome.

Definitions (see docs/counting.md): an ORM Session is *opened* when it first asks for a connection
(its first statement or flush) and *closed* by ``close()``, ``invalidate()``, ``reset()``, the
end of its ``with`` block, or the garbage collector. A Core Connection the app checks out itself
is a session from checkout to checkin. A session that never touches the database holds nothing
and is not counted.

A transaction belongs to a connection, from begin to commit, rollback or close (the outcome), ORM
and Core alike, as the Connection and Transaction hooks report them; it is counted for the session
holding its connection. `close` is the normal read path: a transaction ended without commit() or
rollback(), by close(), a `with` or `async with` block's end, or the pool taking its connection
back. A transaction in which a statement failed (an IntegrityError, a deadlock...) and that was
not committed ends as `rollback` however it ends: the database threw its work away, which is what
an operator counts rollbacks for.

The forgotten commit (the uncommitted_changes pitfall) is seen at close: a session closed with
changes it never committed, flushed or not. Three things are not the forgotten commit, each a
rollback that is the point: an exception on its way out where the session is closed
(`hooks.wrappers.exception_leaving`); a session that joined a transaction its Connection's owner
began (`joins_outer_transaction`): a test fixture's session on an outer connection; attribute
changes with no net difference (`merge()` of an unchanged object): `Session.dirty` is optimistic,
`Session.is_modified` compares each attribute with its loaded value.

The hooks (`hooks/wrappers.py`) call the ``session_*`` and ``transaction_*`` methods here
directly; each guards itself and never raises. What they find on the way (a leak, a pitfall) goes
to the detectors the monitor hands the tracker (`LeakReports`, `PitfallReports`): the tracker
never knows how a finding is said.

A forked child's sessions are its own: those open at the fork are the parent's, and the child
forgets them (`forked`) rather than close, leak or count them.
"""

from __future__ import annotations

import sys
import threading
import weakref
from bisect import bisect_left
from collections.abc import Callable
from time import perf_counter
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from ..config import MonitorConfig
from ..hooks.forking import Stage, in_child
from ..hooks.guard import Guard
from ..hooks.stacks import Location, application_location, application_stack
from ..hooks.wrappers import CHECKOUT_ATTRIBUTE, closing_while_leaving, exception_leaving
from .context import current_request
from .naming import NO_REQUEST
from .observer import Fanout
from .records import (
    RequestScope,
    TrackedCheckout,
    TrackedSession,
    next_session_id,
)
from .stats import HOLD_BUCKETS, Histogram, SessionStats
from .views import SessionKind, SessionView

if TYPE_CHECKING:
    from .pool_state import EnginePool, PoolState

_NO_REQUEST_KEY = (NO_REQUEST, NO_REQUEST)


class LeakReports(Protocol):
    """What the tracker tells the leak detector (`findings/leaks.py`)."""

    def leaked(self, tracked: TrackedSession, reason: str, detail: str = "") -> None: ...

    def came_back(self, checkout: TrackedCheckout, held: float) -> None: ...

    def forked(self) -> None: ...


class PitfallReports(Protocol):
    """What the tracker tells the pitfall detector (`findings/pitfalls.py`)."""

    def found(
        self, kind: str, session: TrackedSession, location: Location | None, detail: str = ""
    ) -> None: ...

    def found_for(
        self,
        kind: str,
        view: SessionView,
        stats: SessionStats,
        location: Location | None,
        detail: str = "",
    ) -> None: ...

    def forked(self) -> None: ...


def joining_outer_transaction(orm_session: Session, bind: object) -> bool:
    """Whether the session, about to take `bind`, joins a transaction the Connection's owner
    began (in a savepoint or as rollback-only) rather than beginning its own. ("control_fully"
    hands the outer transaction over: the session then owns it.)"""
    return (
        isinstance(bind, Connection)
        and bind.in_transaction()
        and orm_session.join_transaction_mode != "control_fully"
    )


def joins_outer_transaction(orm_session: Session) -> bool:
    """The same, of the transaction the session is in now: it took a Connection it does not
    close, and either may not commit (rollback-only) or holds a savepoint in the Connection's
    transaction rather than that transaction itself."""
    root = orm_session.get_transaction()
    if root is None:
        return False
    for connection, transaction, should_commit, closes_connection in root._connections.values():
        if not closes_connection and (
            not should_commit or transaction is not connection.get_transaction()
        ):
            return True
    return False


def _has_net_changes(orm_session: Session) -> bool:
    """Objects added or deleted, or an attribute whose value differs from the loaded one."""
    if orm_session._new or orm_session._deleted:
        return True
    for state in orm_session.identity_map._modified:
        instance = state.obj()
        if instance is not None and orm_session.is_modified(instance):
            return True
    return False


class _SessionRef(weakref.ref):  # type: ignore[type-arg]
    """A weak reference to an open ORM Session that knows its record: the collector's callback
    finds the record without an index of references."""

    __slots__ = ("tracked",)
    tracked: TrackedSession


class SessionTracker:
    def __init__(
        self,
        config: MonitorConfig,
        observers: Fanout | None,
        guard: Guard,
        lock: threading.RLock,
        leaks: LeakReports,
        pitfalls: PitfallReports,
    ) -> None:
        self._config = config
        self._stack_depth = config.stack_depth if config.capture_stacks else 0
        self._emit = observers  # None when the metrics are all there is: no call at all
        self._guard = guard
        # Open ORM sessions by id() of the Session: nothing is written into the app's Session
        # (its `info` is the app's own). Each record's weak reference to its Session
        # (`_SessionRef`) is kept alive by the record listed here; its callback, one bound
        # method for all, removes a collected Session before its id() can be reused.
        self._by_session: dict[int, TrackedSession] = {}
        self._collected_callback = self._collected
        # Guards the counters and each record's closed and leak_reason; the detectors share it.
        # Reentrant: a garbage collection during a snapshot's copies may close a collected
        # session.
        self.lock = lock
        self._stats: dict[tuple[str, str], SessionStats] = {}
        self.leaks = leaks
        self.pitfalls = pitfalls
        # Set by the monitor once the pool tracker exists: an engine's pool entry, or None.
        self.entry_for: Callable[[Engine], EnginePool | None] = lambda engine: None
        in_child(Stage.FORGET, self.forked)

    @property
    def live_sessions(self) -> int:
        return len(self._by_session)

    def snapshot(self) -> dict[tuple[str, str], SessionStats]:
        with self.lock:
            return {key: stats.copy() for key, stats in self._stats.items()}

    # -- lifecycle ---------------------------------------------------------------------------

    def open(
        self,
        kind: SessionKind,
        pool: PoolState,
        location: Location | None,
        stack: tuple[Location, ...],
        request: RequestScope | None,
    ) -> TrackedSession:
        key = _NO_REQUEST_KEY if request is None else (request.route, request.method)
        stats = self._stats.get(key) or self._stats_for(key)
        with self.lock:
            stats.opened += 1
        session = TrackedSession(
            kind, pool.name, pool.db_system, key[0], key[1], request, location, stack, stats
        )
        if request is not None:
            request.sessions.append(session)
        if self._emit is not None:
            self._emit.session_opened(session.view)
        return session

    def _stats_for(self, key: tuple[str, str]) -> SessionStats:
        stats = self._stats.get(key)
        if stats is None:
            new = SessionStats()
            with self.lock:
                stats = self._stats.setdefault(key, new)
        return stats

    def session_acquiring(
        self, orm_session: Session, bind: Any, frame: FrameType | None
    ) -> TrackedSession | None:
        """Called by the hook when a session's root transaction asks for a connection: its
        record, opened now unless it is open already."""
        try:
            tracked = self.tracked(orm_session)
            if tracked is not None:
                # A new transaction of a session it already follows: in another request?
                request = current_request.get()
                opened_in = tracked.request
                if (
                    request is not None
                    and opened_in is not None
                    and request is not opened_in
                    and tracked.shared_in is not request
                    # A test's session on its outer connection, handed to each request.
                    and not joining_outer_transaction(orm_session, bind)
                ):
                    tracked.shared_in = request
                    self.pitfalls.found(
                        "shared_session",
                        tracked,
                        application_location(frame),
                        f"opened in {opened_in.method} {opened_in.route}",
                    )
                return tracked
            engine = bind if isinstance(bind, Engine) else bind.engine
            entry = self.entry_for(engine)
            if entry is None:
                return None
            if self._stack_depth:
                stack = application_stack(frame, self._stack_depth)
                location = stack[0] if stack else None
            else:
                stack, location = (), application_location(frame)
            tracked = self.open("session", entry.state, location, stack, current_request.get())
            ref = _SessionRef(orm_session, self._collected_callback)
            ref.tracked = tracked
            tracked.session_ref = ref
            tracked.session_key = key = id(orm_session)
            self._by_session[key] = tracked
            return tracked
        except Exception:
            self._guard.failed("session_open")
            return None

    def tracked(self, orm_session: Session) -> TrackedSession | None:
        """This monitor's open record of an ORM session."""
        tracked = self._by_session.get(id(orm_session))
        if tracked is None or tracked.closed:
            return None
        ref = tracked.session_ref
        return tracked if ref is not None and ref() is orm_session else None

    def session_closed(self, orm_session: Session) -> None:
        """Called by the Session close hook."""
        try:
            tracked = self._by_session.get(id(orm_session))
            if tracked is not None and not tracked.closed:
                ref = tracked.session_ref
                if ref is not None and ref() is orm_session:
                    self.close(tracked)
        except Exception:
            self._guard.failed("session_close")

    def session_acquire_failed(self, orm_session: Session, failure: BaseException) -> None:
        """Its first connection never came: it used no database and holds nothing, so it is
        closed now, never leaked (a dropped session of a pool exhaustion is no leak).

        Unless SQLAlchemy refused a second, concurrent caller while the first is still
        connecting: the session is used by two tasks or threads at once (shared_session)."""
        try:
            tracked = self.tracked(orm_session)
            if tracked is None:
                return
            if isinstance(failure, exc.InvalidRequestError) and "concurrent operations" in str(
                failure
            ):
                hook = sys._getframe().f_back
                self.pitfalls.found(
                    "shared_session",
                    tracked,
                    application_location(None if hook is None else hook.f_back),
                    "used by two tasks or threads at once; SQLAlchemy refused the second",
                )
            elif not tracked.checkouts:
                self.close(tracked)
        except Exception:
            self._guard.failed("session_acquire_failed")

    def _collected(self, ref: _SessionRef) -> None:
        try:
            tracked = ref.tracked
            if tracked.session_ref is ref:  # still open: closing drops the reference
                if tracked.flushed_uncommitted and not tracked.closed:
                    # Dropped with flushed writes never committed: the garbage collector's
                    # reset rolls them back, the forgotten commit without even a close().
                    self.pitfalls.found(
                        "uncommitted_changes",
                        tracked,
                        tracked.view.location,
                        "dropped unclosed; the garbage collector rolled the changes back",
                    )
                self.close(tracked, collected=True)
        except Exception:
            self._guard.failed("session_collected")

    def close(self, tracked: TrackedSession, *, collected: bool = False) -> None:
        duration = perf_counter() - tracked.opened_at
        stats = tracked.stats
        histogram = stats.duration
        bucket = bisect_left(histogram.bounds, duration)
        with self.lock:
            if tracked.closed:
                return
            tracked.closed = True
            stats.closed += 1
            histogram.counts[bucket] += 1
            histogram.sum += duration
        if tracked.session_ref is not None:
            if self._by_session.get(tracked.session_key) is tracked:
                del self._by_session[tracked.session_key]
            # Dropping the reference drops its callback: a closed session dies unobserved.
            tracked.session_ref = None
        for checkout in tracked.checkouts:
            # Dropped with a transaction open: it ended with the session, whichever of the two
            # the garbage collector reached first.
            if checkout.transaction_started_at is not None:
                self.end_transaction(checkout, "close")
        if collected:
            self.leaks.leaked(tracked, "gc")
        if self._emit is not None:
            self._emit.session_closed(tracked.view, duration)

    def idle_in_transaction(self, checkout: TrackedCheckout, away: float) -> None:
        """The idle sampler's report (the sampler has logged it): counted for the session's
        route, emitted."""
        owner = checkout.owner
        if owner is None:
            return
        with self.lock:
            owner.stats.idle_in_transaction += 1
        if self._emit is not None:
            self._emit.session_idle_in_transaction(owner.view, away)

    def forked(self) -> None:
        """In a forked child, before anything else runs there: the sessions open at the fork
        are the parent's, whichever thread held them (only the thread that forked goes on
        here). The child forgets them: it never counts them closed, never reports them leaked
        when its copies are dropped or collected, and counts from zero, as a new process, so
        opened = closed + active holds with its own sessions alone."""
        try:
            # (The Core connections' sessions are marked with their checkouts: `PoolTracker`.)
            for tracked in self._by_session.values():
                tracked.closed = True  # what every hook and detector skips
                # Its weak reference goes, and with it the collector's callback.
                tracked.session_ref = None
            self._by_session.clear()
            self._stats = {}
            self.leaks.forked()
            self.pitfalls.forked()
        except Exception:
            self._guard.failed("fork")

    def stop_following(self) -> None:
        """At uninstrument, after the pools have counted their connections back: sessions
        still open are counted closed now, and none of them is reported as a leak later."""
        for tracked in list(self._by_session.values()):
            self.close(tracked)

    # -- the connections a session holds (called by the pool listeners) ----------------------

    def attach(self, checkout: TrackedCheckout, proxy: Any) -> None:
        owner = checkout.owner
        assert owner is not None
        owner.checkouts.append(checkout)
        checkout.session_tracker = self  # the transaction hooks find it on the pool's record
        if owner.kind == "connection":
            # How a Core connection dropped unclosed is told at checkin.
            checkout.fairy_ref = weakref.ref(proxy)

    def returned(self, checkout: TrackedCheckout, held: float) -> None:
        """The pool took a session's connection back (checkin or detach)."""
        if checkout.transaction_started_at is not None:
            # Still open when the pool takes it back: dropped, invalidated or detached.
            self.end_transaction(checkout, "close")
        owner = checkout.owner
        if owner is None:
            return
        checkouts = owner.checkouts
        if checkouts and checkouts[-1] is checkout:  # the one it holds, usually its only one
            checkouts.pop()
        elif checkout in checkouts:
            checkouts.remove(checkout)
        if checkout.age_reported:
            self.leaks.came_back(checkout, held)
        if owner.kind == "connection":
            self.close(owner, collected=checkout.collected)

    def checkout_of(self, connection: Connection) -> TrackedCheckout | None:
        """This tracker's checkout of the pooled connection a Connection holds now, kept on
        the pool's connection record; None once the Connection has let it go (closed, or
        invalidated: the invalidation ended its transaction already)."""
        # getattr with a default: a Connection without a proxy (closed, invalidated) or a
        # proxy without a record (detached) has none, at no cost of a branch each.
        proxy = connection.__dict__.get("_dbapi_connection")
        checkout = getattr(getattr(proxy, "_connection_record", None), CHECKOUT_ATTRIBUTE, None)
        while checkout is not None and checkout.session_tracker is not self:
            checkout = checkout.next_checkout  # another monitor's count of it
        return checkout

    def session_for(self, connection: Connection) -> SessionView | None:
        """The session a Connection belongs to, if this monitor tracks it (for statement spans)."""
        checkout = self.checkout_of(connection)
        if checkout is None or checkout.returned or checkout.owner is None:
            return None
        return checkout.owner.view

    # -- transactions (the Connection and Transaction hooks call these) ---------------------

    def transaction_began(self, connection: Connection) -> None:
        try:
            checkout = self.checkout_of(connection)
            if checkout is not None and not checkout.returned:
                if checkout.transaction_started_at is not None:
                    self.end_transaction(checkout, "close")
                checkout.transaction_started_at = perf_counter()
                if checkout.transaction_closing:
                    checkout.transaction_closing = False
                checkout.statement_failed = False
                owner = checkout.owner
                if owner is not None:
                    owner.transaction_count += 1
        except Exception:
            self._guard.failed("transaction_begin")

    def transaction_committed(self, connection: Connection) -> None:
        try:
            checkout = self.checkout_of(connection)
            if checkout is not None and not checkout.returned:
                if checkout.owner is not None:
                    checkout.owner.flushed_uncommitted = False
                self.end_transaction(checkout, "commit")
        except Exception:
            self._guard.failed("transaction_commit")

    def transaction_rolling_back(self, connection: Connection) -> None:
        try:
            checkout = self.checkout_of(connection)
            if checkout is not None and not checkout.returned:
                outcome = "close" if checkout.transaction_closing else "rollback"
                if checkout.owner is not None and outcome == "rollback":
                    checkout.owner.flushed_uncommitted = False  # asked for: discarded on purpose
                self.end_transaction(checkout, outcome)
        except Exception:
            self._guard.failed("transaction_rollback")

    def statement_failed(self, connection: Connection) -> None:
        try:
            checkout = self.checkout_of(connection)
            if checkout is not None and checkout.transaction_started_at is not None:
                checkout.statement_failed = True
        except Exception:
            self._guard.failed("statement_failed")

    def transaction_closing(self, connection: Connection, closing: bool) -> None:
        """Around Transaction.close(): a rollback it makes ends the transaction as `close`."""
        try:
            checkout = self.checkout_of(connection)
            if checkout is not None and not checkout.returned:
                open_transaction = checkout.transaction_started_at is not None
                checkout.transaction_closing = closing and open_transaction
        except Exception:
            self._guard.failed("transaction_close")

    def _outcome_histogram(self, stats: SessionStats, outcome: str) -> Histogram:
        new = Histogram(HOLD_BUCKETS)
        with self.lock:
            return stats.transactions.setdefault(outcome, new)

    def end_transaction(self, checkout: TrackedCheckout, outcome: str) -> None:
        started = checkout.transaction_started_at
        if started is None:
            return
        duration = perf_counter() - started
        checkout.transaction_started_at = None
        if checkout.statement_failed:
            checkout.statement_failed = False
            if outcome == "close":
                outcome = "rollback"
        if checkout.transaction_closing:
            checkout.transaction_closing = False
        owner = checkout.owner
        if owner is None:
            return
        histogram = owner.stats.transactions.get(outcome)
        if histogram is None:
            histogram = self._outcome_histogram(owner.stats, outcome)
        bucket = bisect_left(histogram.bounds, duration)
        with self.lock:
            histogram.counts[bucket] += 1
            histogram.sum += duration
        if self._emit is not None:
            self._emit.transaction_ended(owner.view, outcome, duration)

    # -- the forgotten commit (the uncommitted_changes pitfall), seen at close --------------

    def session_flushed(self, orm_session: Session) -> None:
        try:
            tracked = self.tracked(orm_session)
            if (
                tracked is not None
                and not tracked.flushed_uncommitted
                and not joins_outer_transaction(orm_session)
            ):
                tracked.flushed_uncommitted = True
        except Exception:
            self._guard.failed("session_flushed")

    def session_closing(self, orm_session: Session) -> None:
        """Before a close (called by the _close_impl hook): changes never committed are the
        forgotten commit, unless the rollback is the point (see the module's docstring).
        The common close, after a commit, has no transaction and costs one lookup."""
        try:
            if orm_session.__dict__.get("_transaction") is None:
                return
            tracked = self.tracked(orm_session)
            flushed = tracked is not None and tracked.flushed_uncommitted
            if not (flushed or _has_net_changes(orm_session)):
                return
            # Frames: this method, the hook, Session.close() or whatever called _close_impl,
            # and what called that: the app, or the session's own __exit__.
            hook = sys._getframe().f_back
            closer = None if hook is None else hook.f_back
            if (
                closing_while_leaving.get()
                or exception_leaving(None if closer is None else closer.f_back)
                or joins_outer_transaction(orm_session)
            ):
                return
            location = application_location(closer)
            if tracked is not None:
                self.pitfalls.found("uncommitted_changes", tracked, location)
                return
            # Changes only, never flushed: it used no connection, so it has no record (and is
            # counted nowhere else); a view of it is made for this report alone.
            bind = orm_session.__dict__.get("bind")
            entry = self.entry_for(bind) if isinstance(bind, Engine) else None
            if entry is None:
                return
            request = current_request.get()
            key = (NO_REQUEST, NO_REQUEST) if request is None else (request.route, request.method)
            view = SessionView(
                next_session_id(),
                "session",
                entry.state.name,
                entry.state.db_system,
                key[0],
                key[1],
                location,
                (),
                perf_counter(),
            )
            self.pitfalls.found_for("uncommitted_changes", view, self._stats_for(key), location)
        except Exception:
            self._guard.failed("session_closing")
