"""Callers waiting for a pooled connection: pending callers, waits that timed out or were
cancelled, and a request asking a pool for a second connection while it holds one
(nested_checkout). Each is a matter of one pool object (`WatchedPool`): a caller of an exhausted
pool waits whatever another pool with the same name has idle, and holding one pool while asking
another is no nested checkout. `PoolTracker` inherits these; its `acquire_started` /
`acquire_finished` call them."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..hooks.stacks import application_location, format_location
from ..hooks.wrappers import acquiring_session

if TYPE_CHECKING:
    from ..findings.holders import ExhaustionReporter
    from ..hooks.guard import Guard
    from .context import RequestScope
    from .observer import Fanout
    from .pool_state import PoolState, WatchedPool
    from .sessions import SessionTracker


class Waiting:
    # The server's part of a timeout report, per pool (`DatabaseView.timeout_lines`).
    server_report: Callable[[PoolState], Any] | None
    _emit: Fanout | None
    _sessions: SessionTracker
    _guard: Guard
    exhaustion: ExhaustionReporter

    def usage(self, state: PoolState) -> tuple[int, int, int, int | None]:
        """(used, idle, pending, maximum) of a pool name now, without touching the scrape's
        peak: its pools summed."""
        return state.usage()

    def _check_nested(self, request: RequestScope, watched: WatchedPool) -> None:
        """A request asking a pool for a connection while one of its sessions holds another
        of the same pool."""
        checked_out = watched.checked_out
        ref = acquiring_session.get()
        orm_session = None if ref is None else ref()
        acquiring = None if orm_session is None else self._sessions.tracked(orm_session)
        for session in request.sessions:
            if session is acquiring or session.closed:
                continue
            for held in session.checkouts:
                if not held.returned and checked_out.get(held.record_key) is held:
                    self._sessions.pitfalls.found(
                        "nested_checkout",
                        session,
                        application_location(sys._getframe(1)),
                        f"while the request's {session.kind} opened at "
                        f"{format_location(session.view.location)} holds one",
                    )
                    return

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
                ref = acquiring_session.get()
                orm_session = None if ref is None else ref()
                tracked = None if orm_session is None else self._sessions.tracked(orm_session)
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

    def _report_exhaustion(
        self, watched: WatchedPool, kind: str, waited: float
    ) -> tuple[str, ...]:
        """The exhausted pool's own holders and usage, not those of its name's other pools."""
        state = watched.label
        with state.lock:
            held = list(watched.checked_out.values())
            pending = watched.pending
            backends = dict(state.backends) if state.backends else None
        usage = (len(held), watched.idle_count(), pending, watched.bound)
        server = None if self.server_report is None else self.server_report(state)
        return self.exhaustion.report(state.name, kind, waited, usage, held, backends, server)
