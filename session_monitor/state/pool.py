"""Pool state, alone: connections idle and used, waits, timeouts, creation, invalidation.

A pool is one SQLAlchemy Pool object, whatever its name (`pool_state.py`): its checkouts are
kept as a collection of record ids, as sqlalchemy-collectd does, and the used gauge is its size,
so a missed or repeated event can never drive a gauge negative. What a scrape can read from live
objects it reads there: which pool each engine uses now, the pools' bounds and their idle
connections (`pool.checkedin()`), so a disposed pool, or one an engine collected took with it,
drops out of the gauges by itself.

A pooled connection has a life of its own beside its checkouts: opened (how long that took, and
its server backend), closed (and why), invalidated (and why); those listeners run when a
connection opens or closes, never per checkout.

Callers waiting for a pooled connection are a matter of one pool object (`WatchedPool`): pending
callers, waits that timed out or were cancelled, and a request asking a pool for a second
connection while it holds one (nested_checkout). A caller of an exhausted pool waits whatever
another pool with the same name has idle, and holding one pool while asking another is no nested
checkout. `acquire_started` / `acquire_finished` (called by the `raw_connection` hook) count
them; a timeout's holders go to the `ExhaustionReports` the monitor hands the tracker.

In a forked child (gunicorn's preload) the connections out and the callers waiting are the
parent's: the child forgets them and counts from zero (`forking.py`), and its pools, once it
disposes them as SQLAlchemy recommends, are new objects.
"""

from __future__ import annotations

import sys
import time
import weakref
from asyncio import CancelledError
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from time import perf_counter
from types import FrameType
from typing import Any, Protocol

from sqlalchemy import event, exc
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool, Pool, QueuePool

from ..hooks import wrappers
from ..hooks.forking import Stage, in_child, new_lock
from ..hooks.guard import Guard
from ..hooks.stacks import application_location, application_stack, format_location
from ..hooks.wrappers import (
    CHECKOUT_ATTRIBUTE,
    CONNECTION_INIT,
    acquiring_session,
    in_greenlet,
    install_new_groups,
    wraps_checkin,
)
from .backends import ApplicationNameTagger, backend_pid
from .context import current_request, serving_no_request
from .naming import pool_name_for
from .observer import Fanout
from .pool_state import EnginePool, PoolSnapshot, PoolState, WatchedPool, root_engine
from .records import RequestScope, TrackedCheckout, TrackedSession
from .sessions import SessionTracker
from .stats import PoolStats

_CONNECT_STARTED = "session_monitor.connect_started"
_UNSEEN: Any = object()  # an engine the tracker has not decided about yet
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


class ExhaustionReports(Protocol):
    """Where a pool timeout or a cancelled wait is reported (`findings/holders.py`): the
    holders, said once per pool per interval; returns them, one line each."""

    def report(
        self,
        pool_name: str,
        kind: str,
        waited: float,
        usage: tuple[int, int, int, int | None],
        checkouts: Iterable[TrackedCheckout],
        backends: dict[int, int] | None = None,
        server: Callable[[list[Any]], list[str]] | None = None,
    ) -> tuple[str, ...]: ...


class PoolTracker:
    def __init__(
        self,
        sessions: SessionTracker,
        observers: Fanout | None,
        guard: Guard,
        *,
        every_engine: bool,
        pool_name: str | None,
        stack_depth: int,
        exhaustion: ExhaustionReports,
        application_name: str | None = None,
    ) -> None:
        self._sessions = sessions
        self.tagger = None if application_name is None else ApplicationNameTagger(application_name)
        # Set by the monitor when the server's view is on (`database_view.py`).
        # after a PostgreSQL connection opened, the server view's startup check (once per pool
        # name), and the server's part of a timeout report (`DatabaseView.timeout_lines`).
        self.first_connected: Callable[[PoolState], None] | None = None
        self.server_report: Callable[[PoolState], Any] | None = None
        self._emit = observers
        self._guard = guard
        self._every_engine = every_engine
        self._pool_name = pool_name
        self._stack_depth = stack_depth  # 0 unless capture_stacks
        # By id() of an engine or view, dropped when it is collected; None for an engine not
        # watched. One dict lookup per acquisition.
        self._engines: dict[int, EnginePool | None] = {}
        self._states: dict[str, PoolState] = {}
        self._lock = new_lock()
        self.engine_added: list[Callable[[Engine], None]] = []  # e.g. OpenTelemetry's listeners
        # False after uninstrument(): the listeners stay, doing nothing (see `stop_following`).
        self.following = True
        self.exhaustion = exhaustion
        in_child(Stage.FORGET, self.forked)
        if observers is not None:
            in_child(Stage.PUBLISH, self.publish_forked)

    # -- engines -----------------------------------------------------------------------------

    def entry_for(self, engine: Engine) -> EnginePool | None:
        try:
            return self._engines[id(engine)]
        except KeyError:
            pass
        root = root_engine(engine)
        entry = None if root is engine else self._engines.get(id(root))
        if entry is None and self._every_engine:
            entry = self.add_engine(root)
        self._remember(engine, entry)
        return entry

    def _remember(self, engine: Engine, entry: EnginePool | None) -> None:
        with self._lock:
            if id(engine) not in self._engines:
                self._engines[id(engine)] = entry
                weakref.finalize(engine, self._engines.pop, id(engine), None)

    def add_engine(self, engine: Engine) -> EnginePool:
        engine = root_engine(engine)
        with self._lock:
            entry = self._engines.get(id(engine))
            if entry is not None:
                return entry
            name = self._pool_name or pool_name_for(engine.url)
            state = self._states.get(name)
            if state is None:
                state = self._states[name] = PoolState(name, engine.dialect.name)
            entry = EnginePool(engine, state, self._watch)
            self._listen(engine, entry)
            self._engines[id(engine)] = entry
            state.engines[id(engine)] = entry
            weakref.finalize(engine, self._engine_collected, id(engine), entry)
        entry.pool()  # watched from now: the idle connections it has already are counted
        if engine.dialect.is_async:
            install_new_groups()  # the asyncio extension is imported now, perhaps only now
        for added in self.engine_added:
            added(engine)
        if self._emit is not None:
            self._publish_capacity(state)
            with state.lock:
                self._publish_usage(state)
        return entry

    def _watch(self, state: PoolState, pool: Pool) -> WatchedPool:
        """The WatchedPool of a pool object, made the first time an engine is seen using it."""
        key = id(pool)
        with state.lock:
            watched = state.pools.get(key)
            if watched is None or watched.pool_ref() is not pool:
                ref = weakref.ref(pool, partial(self._pool_collected, state, key))
                watched = state.pools[key] = WatchedPool(pool, state, ref, self.checked_in)
        return watched

    def _pool_collected(self, state: PoolState, key: int, ref: weakref.ref[Pool]) -> None:
        try:
            with state.lock:
                watched = state.pools.get(key)
                if watched is None or watched.pool_ref is not ref:
                    return
                del state.pools[key]
            # A pool is collected after its last connection came back; one still listed here
            # was taken back unseen (e.g. while the monitor was off): counted back now.
            for record in list(watched.checked_out):
                self._taken_back(watched, record, back_to_idle=False)
        except Exception:
            self._guard.failed("pool_collected")

    def _engine_collected(self, key: int, entry: EnginePool) -> None:
        try:
            state = entry.state
            self._engines.pop(key, None)
            with state.lock:
                state.engines.pop(key, None)
                if self._emit is not None:
                    self._publish_usage(state)
            if self._emit is not None:
                self._publish_capacity(state)
        except Exception:
            self._guard.failed("engine_collected")

    def stop_following(self) -> None:
        """At uninstrument: the listeners stay on their engines, switched off. SQLAlchemy's
        listener lists may not change while another thread runs that event (they are plain
        deques: "deque mutated during iteration" in the app's request), so nothing is removed
        from an engine in use; instrumenting again switches the same listeners back on.

        No checkin will be seen meanwhile, so each connection out now is counted back with its
        use so far (its Core session closed) and the idle ones are forgotten: the gauges start
        again from the pools' next events."""
        self.following = False
        for watched in self._watched():
            with watched.label.lock:
                held = list(watched.checked_out)
                watched.idle.clear()
            for key in held:
                self._taken_back(watched, key, back_to_idle=False)

    def follow_again(self) -> None:
        self.following = True

    def forked(self) -> None:
        """In a forked child, before anything else runs there: the connections out and the
        callers waiting are the parent's (only the thread that forked goes on here), and the
        child counts from zero, as a new process. Each connection out is marked returned: the
        age watcher and the checkin no longer look at it. Idle connections and bounds are read
        from the live pools, as always."""
        try:
            for state in list(self._states.values()):
                state.stats = PoolStats()
                state.used = 0
                for watched in list(state.pools.values()):
                    watched.pending = 0
                    for checkout in list(watched.checked_out.values()):
                        checkout.returned = True
                        if checkout.owner is not None:
                            # A Core connection's session, which only its checkout lists: the
                            # parent's, as its ORM sessions (`SessionTracker.forked`).
                            checkout.owner.closed = True
                    watched.checked_out.clear()
        except Exception:
            self._guard.failed("fork")

    def publish_forked(self) -> None:
        """In a forked child, from a thread of its own (`forking.py`): the observers last heard
        the parent's pools; an OpenTelemetry SDK set up before the fork holds those sizes."""
        try:
            for state in list(self._states.values()):
                self._publish_capacity(state)
                with state.lock:
                    self._publish_usage(state)
        except Exception:
            self._guard.failed("fork")

    def snapshot(self) -> list[PoolSnapshot]:
        """For a scrape: the peak in use starts again from the number in use now."""
        pools = []
        for state in list(self._states.values()):
            _, idle, pending, maximum = state.usage()
            with state.lock:
                used = state.used
                stats = state.stats.copy()
                state.peak_ever = max(state.peak_ever, stats.peak_used)
                state.stats.peak_used = used
            stats.pending = pending
            pools.append(PoolSnapshot(state.name, idle, used, maximum, stats, state.server_allowed))
        return pools

    def states(self) -> list[PoolState]:
        return list(self._states.values())

    def _watched(self) -> list[WatchedPool]:
        return [w for state in list(self._states.values()) for w in list(state.pools.values())]

    def checkouts(self) -> Iterator[TrackedCheckout]:
        for watched in self._watched():
            with watched.label.lock:
                held = list(watched.checked_out.values())
            yield from held

    def backend_pids(self) -> dict[int, int]:
        """Server backend PIDs by connection record id, of every pool."""
        found: dict[int, int] = {}
        for state in list(self._states.values()):
            with state.lock:
                found.update(state.backends)
        return found

    @property
    def tracked_checkouts(self) -> int:
        return sum(state.used for state in list(self._states.values()))

    def _listen(self, engine: Engine, entry: EnginePool) -> None:
        failed = self._guard.failed
        tracker = self

        def bind(name: str, fn: Callable[..., None]) -> Callable[..., None]:
            # One frame per event: these run on every checkout.
            def listener(*args: Any) -> None:
                if tracker.following:
                    try:
                        fn(entry, *args)
                    except Exception:
                        failed(name)

            listener.__name__ = f"session_monitor_{name}"
            return listener

        listen = event.listen
        listen(engine, "do_connect", bind("do_connect", self._do_connect_evt))
        listen(engine, "connect", bind("connect", self._connect_evt))
        # Checkouts are counted by the raw_connection hook (`acquire_finished`), checkins by the
        # connection record's checkin hook (`checked_in`); the event only where that method is
        # gone, guarding itself: no frame between.
        if not wraps_checkin():
            listen(engine, "checkin", partial(self._checkin_evt, entry))
        listen(engine, "close", bind("close", self._close_evt))
        listen(engine, "detach", bind("detach", self._detach_evt))
        listen(engine, "invalidate", bind("invalidate", self._invalidate_evt))
        listen(engine, "soft_invalidate", bind("soft_invalidate", self._soft_invalidate_evt))

    # -- waiting (called by the raw_connection hook; never raise) ---------------------------

    def acquire_started(self, engine: Engine) -> WatchedPool | tuple[WatchedPool] | None:
        """The token for `acquire_finished`: the engine's watched pool now, in a 1-tuple when
        the caller will wait (it is pending); None for an engine not watched."""
        try:
            entry: EnginePool | None = self._engines.get(id(engine), _UNSEEN)
            if entry is _UNSEEN:
                entry = self.entry_for(engine)
            if entry is None:
                return None
            # The engine's pool now (a view's is its parent's): a new object after dispose().
            pool = engine.pool
            watched = entry.current
            if watched is None or watched.pool_ref() is not pool:
                watched = entry.pool(pool)
                if watched is None:
                    return None
            request = current_request.get()
            # After the response, a background task's session beside the request's own is
            # FastAPI's canonical order (yield dependencies close after background tasks).
            if request is not None and request.sessions and not request.responded:
                self._check_nested(request, watched)
            # A caller finds no connection to take only once a bounded QueuePool has opened all
            # it may (its overflow at the maximum: a cheap read first), and none is idle. The
            # pool's own count includes connections still being opened: callers arriving at a
            # cold pool wait for those too.
            bound = watched.bound
            if (
                bound is not None
                and pool._overflow >= pool._max_overflow  # type: ignore[attr-defined]
                and pool.checkedout() >= bound  # type: ignore[attr-defined]
            ):
                self._pending(watched, +1)
                return (watched,)
            return watched
        except Exception:
            self._guard.failed("raw_connection")
            return None

    def acquire_failed(
        self, token: WatchedPool | tuple[WatchedPool], started: float, failure: BaseException
    ) -> None:
        try:
            pending = token.__class__ is tuple
            watched: WatchedPool = token[0] if pending else token  # type: ignore[index, assignment]
            if pending:
                self._pending(watched, -1)
            if isinstance(failure, exc.TimeoutError):
                self._timed_out(watched, perf_counter() - started)
            elif pending and isinstance(failure, CancelledError):
                self._wait_cancelled(watched, perf_counter() - started)
        except Exception:
            self._guard.failed("checkout")

    def acquire_finished(
        self,
        token: WatchedPool | tuple[WatchedPool],
        started: float,
        proxy: Any,
        caller: FrameType | None,
    ) -> None:
        """A checkout through the engine (the raw_connection hook): counted, and kept with the
        pool's connection record until its checkin (`checked_in`)."""
        try:
            now = perf_counter()
            if token.__class__ is tuple:
                watched: WatchedPool = token[0]
                self._pending(watched, -1)
            else:
                watched = token  # type: ignore[assignment]
            if not self.following:
                return
            state = watched.label
            record = proxy._connection_record
            key = id(record)
            request = current_request.get()
            acquiring = acquiring_session.get()
            if acquiring is not None:
                owner = acquiring[1]
                if owner is None:  # several monitors: each finds its own record
                    owner = self._acquiring()
            elif (
                caller is not None
                and caller.f_code is CONNECTION_INIT
                and wrappers.sessions_hooked
            ):
                # Checked out by the app through Core: the connection is the session, opened
                # where the application frame above the Connection is.
                if self._stack_depth:
                    stack = application_stack(caller.f_back, self._stack_depth)
                    location = stack[0] if stack else None
                else:
                    stack, location = (), application_location(caller.f_back)
                owner = self._sessions.open("connection", state, location, stack, request)
            else:
                owner = None
            checkout = TrackedCheckout(watched, key, owner, request, now)
            if owner is not None:
                self._sessions.attach(checkout, proxy)
                # A sync session on the event loop's thread (the task is known only there),
                # while the app serves requests: a lifespan's startup and shutdown block none.
                if checkout.task_ref is not None:
                    checkout.blocking = not in_greenlet() and not serving_no_request()
            attributes = record.__dict__
            previous = attributes.get(CHECKOUT_ATTRIBUTE)
            if previous is not None and not previous.returned:
                checkout.next_checkout = previous  # another monitor's count of this checkout
            attributes[CHECKOUT_ATTRIBUTE] = checkout
            wait = now - started
            stats = state.stats
            histogram = stats.wait
            bucket = bisect_left(histogram.bounds, wait)
            emit = self._emit
            with state.lock:
                checked_out = watched.checked_out
                if key not in checked_out:
                    used = state.used = state.used + 1
                    if used > stats.peak_used:
                        stats.peak_used = used
                checked_out[key] = checkout
                if not watched.counts_itself:
                    watched.idle.pop(key, None)
                histogram.counts[bucket] += 1
                histogram.sum += wait
                if emit is not None:
                    self._publish_usage(state)
            if emit is not None:
                emit.connection_checked_out(checkout.view(), wait)
        except Exception:
            self._guard.failed("checkout")

    # -- pool events -------------------------------------------------------------------------

    def _publish_capacity(self, state: PoolState) -> None:
        assert self._emit is not None
        self._emit.pool_capacity(state.name, state.maximum())

    def checked_in(self, checkout: TrackedCheckout, back_to_idle: bool) -> None:
        """The pool takes back a connection this tracker counted out, called by the connection
        record's checkin hook (which found the checkout on the record) and by `_taken_back`:
        out of the used ones, into the idle ones (of a pool that does not count them itself),
        its use counted once, its session told."""
        if checkout.returned:  # counted back already: at uninstrument, or in a forked child
            return
        try:
            now = perf_counter()
            watched = checkout.watched
            state = watched.label
            key = checkout.record_key
            held = now - checkout.checked_out_at
            histogram = state.stats.use
            bucket = bisect_left(histogram.bounds, held)
            emit = self._emit
            with state.lock:
                if checkout.returned:
                    return
                checkout.returned = True
                if watched.checked_out.get(key) is checkout:
                    del watched.checked_out[key]
                    state.used -= 1
                histogram.counts[bucket] += 1
                histogram.sum += held
                if not watched.counts_itself:
                    if back_to_idle:
                        watched.idle[key] = None
                    else:
                        watched.idle.pop(key, None)
                if emit is not None:
                    # The checkin comes before the pool puts the connection back.
                    self._publish_usage(state, watched if back_to_idle else None)
            if emit is not None:
                emit.connection_checked_in(checkout.view(), held)
            owner = checkout.owner
            if owner is not None:
                if checkout.blocking:
                    self._sessions.pitfalls.found(
                        "blocking_event_loop",
                        owner,
                        owner.view.location,
                        f"held on the event loop's thread for {held:.3f}s, which blocked it "
                        "up to then",
                    )
                self._sessions.returned(checkout, held)
            elif checkout.transaction_started_at is not None:
                self._sessions.returned(checkout, held)
        except Exception:
            self._guard.failed("checkin")

    def _checkin_evt(self, entry: EnginePool, dbapi_connection: Any, record: Any) -> None:
        # The checkin event, where SQLAlchemy lacks the method the checkin hook wraps.
        if not self.following:
            return
        try:
            key = id(record)
            watched = entry.current
            if watched is None or key not in watched.checked_out:
                # Out of a pool the engine has since disposed, or not counted out by us.
                watched = entry.holding(key) or watched
                if watched is None:
                    return
            # Without a DBAPI connection (invalidated) nothing goes back to the idle ones.
            self._taken_back(watched, key, back_to_idle=dbapi_connection is not None)
        except Exception:
            self._guard.failed("checkin")

    def _detach_evt(self, entry: EnginePool, dbapi_connection: Any, record: Any) -> None:
        key = id(record)
        record.__dict__.pop(CHECKOUT_ATTRIBUTE, None)  # a detached record is never checked in
        state = entry.state
        if state.backends:
            with state.lock:
                state.backends.pop(key, None)  # its backend is no longer the pool's
        watched = entry.holding(key) or entry.current
        if watched is not None:
            self._taken_back(watched, key, back_to_idle=False)

    def _taken_back(self, watched: WatchedPool, key: int, *, back_to_idle: bool) -> None:
        """The pool has a connection back (the checkin event) or lets it go (detach, a pool
        collected, uninstrument): its checkout counted back, if it has one here."""
        checkout = watched.checked_out.get(key)
        if checkout is not None:
            self.checked_in(checkout, back_to_idle)
            return
        state = watched.label
        with state.lock:
            if not watched.counts_itself:
                if back_to_idle:
                    watched.idle[key] = None
                else:
                    watched.idle.pop(key, None)
            if self._emit is not None:
                self._publish_usage(state, watched if back_to_idle else None)

    # -- a connection's own life: opened, closed, invalidated (never per checkout) ---------

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

    # -- callers waiting: pending, timed out, cancelled; nested checkouts -----------------

    def usage(self, state: PoolState) -> tuple[int, int, int, int | None]:
        """(used, idle, pending, maximum) of a pool name now, without touching the scrape's
        peak: its pools summed."""
        return state.usage()

    def _check_nested(self, request: RequestScope, watched: WatchedPool) -> None:
        """A request asking a pool for a connection while one of its sessions holds another
        of the same pool."""
        checked_out = watched.checked_out
        for session in request.sessions:
            if session.closed or not session.checkouts:  # a session about to take its first
                continue
            for held in session.checkouts:
                if (
                    not held.returned
                    and checked_out.get(held.record_key) is held
                    and session is not self._acquiring()
                ):
                    self._sessions.pitfalls.found(
                        "nested_checkout",
                        session,
                        application_location(sys._getframe(1)),
                        f"while the request's {session.kind} opened at "
                        f"{format_location(session.view.location)} holds one",
                    )
                    return

    def _acquiring(self) -> TrackedSession | None:
        """The session whose connection is being acquired now, if this monitor tracks it."""
        acquiring = acquiring_session.get()
        orm_session = None if acquiring is None else acquiring[0]()
        return None if orm_session is None else self._sessions.tracked(orm_session)

    def _pending(self, watched: WatchedPool, delta: int) -> None:
        try:
            state = watched.label
            with state.lock:
                watched.pending += delta
                if delta > 0:
                    state.stats.waited += 1
            if self._emit is not None:
                self._emit.pool_pending(state.name, delta)
                if delta > 0:
                    self._emit.checkout_waited(state.name)
        except Exception:
            self._guard.failed("pool_pending")

    def _timed_out(self, watched: WatchedPool, waited: float) -> None:
        try:
            state = watched.label
            with state.lock:
                state.stats.timeouts += 1
            holders = self._report_exhaustion(watched, "timeout", waited)
            if self._emit is not None:
                tracked = self._acquiring()
                view = None if tracked is None else tracked.view
                self._emit.checkout_timed_out(state.name, waited, view, holders)
        except Exception:
            self._guard.failed("timeout")

    def _wait_cancelled(self, watched: WatchedPool, waited: float) -> None:
        try:
            state = watched.label
            with state.lock:
                state.stats.cancelled += 1
            self._report_exhaustion(watched, "cancelled", waited)
            if self._emit is not None:
                self._emit.wait_cancelled(state.name, waited)
        except Exception:
            self._guard.failed("wait_cancelled")

    def _report_exhaustion(self, watched: WatchedPool, kind: str, waited: float) -> tuple[str, ...]:
        """The exhausted pool's own holders and usage, not those of its name's other pools."""
        state = watched.label
        with state.lock:
            held = list(watched.checked_out.values())
            pending = watched.pending
            backends = dict(state.backends) if state.backends else None
        usage = (len(held), watched.idle_count(), pending, watched.bound)
        server = None if self.server_report is None else self.server_report(state)
        return self.exhaustion.report(state.name, kind, waited, usage, held, backends, server)
