"""Pool state, alone: connections idle and used, waits, timeouts, creation, invalidation.

State follows sqlalchemy-collectd: a pool's connections are kept as collections of record ids
(idle) and of checkouts (used), and the gauges are *their sizes*, so a missed or repeated event
can never drive a gauge negative. What a scrape can read from live objects it reads there: the
pool's bound comes from the live engines' pools at scrape time, and an engine that is collected
takes its idle connections out of the gauge with it.

Engines, views and their shared state are in `pool_state.py`.
"""

from __future__ import annotations

import threading
import weakref
from asyncio import CancelledError
from bisect import bisect_left
from collections.abc import Callable, Iterator
from functools import partial
from time import perf_counter
from typing import Any

from sqlalchemy import event, exc
from sqlalchemy.engine import Engine

from ._hooks import Acquisition, acquiring_session, in_greenlet
from ._listeners import Guard
from .context import current_request, serving_no_request
from .holders import ExhaustionReporter
from .naming import pool_name_for
from .observer import Fanout
from .pool_connections import ConnectionLifecycle
from .pool_state import EnginePool, PoolSnapshot, PoolState, root_engine
from .pool_waits import Waiting
from .records import TrackedCheckout
from .sessions import SessionTracker


class PoolTracker(ConnectionLifecycle, Waiting):
    def __init__(
        self,
        sessions: SessionTracker,
        observers: Fanout | None,
        guard: Guard,
        *,
        every_engine: bool,
        pool_name: str | None,
        stack_depth: int,
        timeout_log_interval: float = 10.0,
    ) -> None:
        self._sessions = sessions
        self._emit = observers
        self._guard = guard
        self._every_engine = every_engine
        self._pool_name = pool_name
        self._stack_depth = stack_depth  # 0 unless capture_stacks
        # By id() of an engine or view, dropped when it is collected; None for an engine not
        # watched. One dict lookup per acquisition.
        self._engines: dict[int, EnginePool | None] = {}
        self._states: dict[str, PoolState] = {}
        self._lock = threading.Lock()
        self.engine_added: list[Callable[[Engine], None]] = []  # e.g. OpenTelemetry's listeners
        # False after uninstrument(): the listeners stay, doing nothing (see `stop_following`).
        self.following = True
        self.exhaustion = ExhaustionReporter(timeout_log_interval)

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
            entry = EnginePool(engine, state)
            self._listen(engine, entry)
            self._engines[id(engine)] = entry
            state.engines[id(engine)] = entry
            weakref.finalize(engine, self._engine_collected, id(engine), entry)
        for added in self.engine_added:
            added(engine)
        if self._emit is not None:
            self._publish_capacity(state)
            with state.lock:
                self._publish_usage(state)
        return entry

    def _engine_collected(self, key: int, entry: EnginePool) -> None:
        try:
            state = entry.state
            self._engines.pop(key, None)
            with state.lock:
                state.engines.pop(key, None)
                for record in [r for r, owner in state.idle.items() if owner is entry]:
                    del state.idle[record]
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
        for state in list(self._states.values()):
            with state.lock:
                held = list(state.checked_out)
                state.idle.clear()
            for key in held:
                self._taken_back(state, key, None)

    def follow_again(self) -> None:
        self.following = True

    def snapshot(self) -> list[PoolSnapshot]:
        """For a scrape: the peak in use starts again from the number in use now."""
        pools = []
        for state in list(self._states.values()):
            maximum = state.maximum()
            with state.lock:
                used = len(state.checked_out)
                pools.append(
                    PoolSnapshot(state.name, len(state.idle), used, maximum, state.stats.copy())
                )
                state.stats.peak_used = used
        return pools

    def states(self) -> list[PoolState]:
        return list(self._states.values())

    def checkouts(self) -> Iterator[TrackedCheckout]:
        for state in list(self._states.values()):
            with state.lock:
                held = list(state.checked_out.values())
            yield from held

    @property
    def tracked_checkouts(self) -> int:
        return sum(len(state.checked_out) for state in list(self._states.values()))

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
        # Checkouts are counted by the raw_connection hook (`acquire_finished`). The checkin,
        # on every use of a connection, guards itself: no frame between.
        listen(engine, "checkin", partial(self._checkin_evt, entry))
        listen(engine, "close", bind("close", self._close_evt))
        listen(engine, "detach", bind("detach", self._detach_evt))
        listen(engine, "invalidate", bind("invalidate", self._invalidate_evt))
        listen(engine, "soft_invalidate", bind("soft_invalidate", self._soft_invalidate_evt))

    # -- waiting (called by the raw_connection hook; never raise) ---------------------------

    def acquire_started(self, engine: Engine) -> tuple[PoolState, bool] | None:
        try:
            entry = self.entry_for(engine)
            if entry is None:
                return None
            request = current_request.get()
            # After the response, a background task's session beside the request's own is
            # FastAPI's canonical order (yield dependencies close after background tasks).
            if request is not None and request.sessions and not request.responded:
                self._check_nested(request, entry.state)
            state = entry.state
            # An idle connection to take: no wait, answered without asking the pool.
            pending = not state.idle and entry.will_wait()
            if pending:
                self._pending(state, +1)
            return state, pending
        except Exception:
            self._guard.failed("raw_connection")
            return None

    def acquire_finished(
        self,
        token: tuple[PoolState, bool],
        current: Acquisition,
        proxy: Any,
        failure: BaseException | None,
    ) -> None:
        try:
            state, pending = token
            if pending:
                self._pending(state, -1)
            if proxy is not None:
                if self.following:
                    self._checked_out(state, id(proxy._connection_record), proxy, current)
            elif isinstance(failure, exc.TimeoutError):
                self._timed_out(state, perf_counter() - current.started)
            elif pending and isinstance(failure, CancelledError):
                self._wait_cancelled(state, perf_counter() - current.started)
        except Exception:
            self._guard.failed("checkout")

    # -- pool events -------------------------------------------------------------------------

    def _publish_capacity(self, state: PoolState) -> None:
        assert self._emit is not None
        self._emit.pool_capacity(state.name, state.maximum())

    def _checked_out(self, state: PoolState, key: int, proxy: Any, current: Acquisition) -> None:
        now = perf_counter()
        wait = now - current.started
        request = current_request.get()
        ref = acquiring_session.get()
        sessions = self._sessions
        if ref is not None:
            orm_session = ref()
            owner = None if orm_session is None else sessions.tracked(orm_session)
        elif current.core:
            # Checked out by the app through Core: the connection is the session.
            stack = current.stack[: self._stack_depth] if self._stack_depth else ()
            owner = sessions.open("connection", state, current.location, stack, request)
        else:
            owner = None
        checkout = TrackedCheckout(state.name, key, owner, request, now)
        if owner is not None:
            sessions.attach(checkout, proxy)
            # A sync session on the event loop's thread (the task is known only there), while
            # the app serves requests: a lifespan's startup and shutdown block none.
            if checkout.task_ref is not None:
                checkout.blocking = not in_greenlet() and not serving_no_request()
        stats = state.stats
        histogram = stats.wait
        bucket = bisect_left(histogram.bounds, wait)
        idle = state.idle
        with state.lock:
            checked_out = state.checked_out
            checked_out[key] = checkout
            if len(checked_out) > stats.peak_used:
                stats.peak_used = len(checked_out)
            if key in idle:
                del idle[key]
            histogram.counts[bucket] += 1
            histogram.sum += wait
            if self._emit is not None:
                self._publish_usage(state)
        if self._emit is not None:
            self._emit.connection_checked_out(checkout.view(), wait)

    def _checkin_evt(self, entry: EnginePool, dbapi_connection: Any, record: Any) -> None:
        if not self.following:
            return
        try:
            # Without a DBAPI connection (invalidated) nothing goes back to the idle ones.
            self._taken_back(
                entry.state, id(record), entry if dbapi_connection is not None else None
            )
        except Exception:
            self._guard.failed("checkin")

    def _detach_evt(self, entry: EnginePool, dbapi_connection: Any, record: Any) -> None:
        self._taken_back(entry.state, id(record), None)

    def _taken_back(self, state: PoolState, key: int, idle: EnginePool | None) -> None:
        """The pool has a connection back (checkin; `idle` is its engine's entry) or lets it
        go (detach, invalidation): count its use."""
        now = perf_counter()
        checked_out, idle_connections = state.checked_out, state.idle
        checkout = checked_out.get(key)
        held = 0.0 if checkout is None else now - checkout.checked_out_at
        histogram = state.stats.use
        bucket = bisect_left(histogram.bounds, held)
        with state.lock:
            if key in checked_out:
                del checked_out[key]
            if idle is not None:
                idle_connections[key] = idle
            elif key in idle_connections:
                del idle_connections[key]
            if checkout is not None:
                histogram.counts[bucket] += 1
                histogram.sum += held
            if self._emit is not None:
                self._publish_usage(state)
        if checkout is None or checkout.returned:
            return
        checkout.returned = True
        if self._emit is not None:
            self._emit.connection_checked_in(checkout.view(), held)
        if checkout.blocking and checkout.owner is not None:
            owner = checkout.owner
            self._sessions.pitfalls.found(
                "blocking_event_loop",
                owner,
                owner.view.location,
                f"held on the event loop's thread for {held:.3f}s, which blocked it up to then",
            )
        if checkout.owner is not None or checkout.transaction_started_at is not None:
            self._sessions.returned(checkout, held)
