"""Leaks, all three ways they are found, and the WARNING lines an on-call engineer reads.

- ``request_end``: when a request's ASGI call is over (`request_finished`, called by the
  middleware), a session opened in it that still holds a connection it acquired there.
- ``gc``: a session or Core connection reclaimed by the garbage collector without being closed
  (`sessions.SessionTracker.close` with ``collected=True`` reports it here).
- ``age``: a connection held longer than ``leak_threshold``, found by `AgeWatcher`'s thread the
  way HikariCP's leakDetectionThreshold does.

Each leaked session is counted once, with the reason by which it was found first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ..hooks.stacks import format_location, format_stack
from .periodic import PeriodicScan

if TYPE_CHECKING:
    from ..state.observer import Fanout
    from ..state.records import RequestScope, TrackedCheckout, TrackedSession
    from ..state.views import SessionView

logger = logging.getLogger("session_monitor")

_WHY = {
    "request_end": "still holds a connection it acquired when its request ended",
    "gc": "was garbage collected without being closed",
    "age": "has held a connection longer than the leak threshold",
}


def describe(tracked: TrackedSession) -> str:
    view = tracked.view
    where = f"{view.method} {view.route}" if tracked.request is not None else "outside any request"
    what = "session" if view.kind == "session" else "Core connection"
    return (
        f"{where}: {what} on pool {view.pool_name!r} opened at "
        f"{format_location(view.location)}, {view.age:.3f}s ago"
    )


def _missing_finally(request: RequestScope) -> str:
    if request.failure is None:
        return ""
    return (
        f"The request {request.failure}: a dependency that closes its session after `yield` "
        "without `finally` never reaches close() when the endpoint raises. Use:\n"
        "    def get_db():\n"
        "        db = SessionLocal()\n"
        "        try:\n"
        "            yield db\n"
        "        finally:\n"
        "            db.close()"
    )


class LeakDetector:
    def __init__(
        self, lock: threading.RLock, observers: Fanout | None, log_leaks: bool
    ) -> None:
        self._lock = lock  # the session tracker's: it guards leak_reason and the counters
        self._emit = observers
        self._log = log_leaks
        # The last leaks, for the diagnostics page: (time.time(), reason, the session's view).
        self.recent: deque[tuple[float, str, SessionView]] = deque(maxlen=20)

    def leaked(self, tracked: TrackedSession, reason: str, detail: str = "") -> None:
        with self._lock:
            if tracked.leak_reason is not None:
                return
            tracked.leak_reason = reason
            leaked = tracked.stats.leaked
            leaked[reason] = leaked.get(reason, 0) + 1  # rare: a call here is fine
        self.recent.append((time.time(), reason, tracked.view))
        if self._emit is not None:
            self._emit.session_leaked(tracked.view, reason)
        if self._log:
            message = f"Leaked session ({reason}): {describe(tracked)}, {_WHY[reason]}."
            if tracked.view.stack and reason != "age":  # the age detail has its own
                message += "\nOpened at:\n" + format_stack(tracked.view.stack)
            if detail:
                message += "\n" + detail
            logger.warning(message)

    def forked(self) -> None:
        """In a forked child (the session tracker's `forked`): the parent's leaks are the
        parent's."""
        self.recent.clear()

    def request_finished(self, request: RequestScope) -> None:
        """Report what the request opened and left holding a connection it acquired."""
        for tracked in request.sessions:
            if (
                not tracked.closed
                and tracked.leak_reason is None
                and tracked.holds_connection_from(request)
            ):
                self.leaked(tracked, "request_end", _missing_finally(request))
        request.sessions.clear()

    def held_too_long(self, checkout: TrackedCheckout, threshold: float) -> None:
        owner = checkout.owner
        if owner is None:
            return
        stack = owner.view.stack
        held = f"Held for {checkout.held_for:.3f}s (threshold {threshold:g}s)"
        detail = (
            f"{held}. Opened at:\n{format_stack(stack)}"
            if stack
            else f"{held}; set capture_stacks=True to log the whole application stack."
        )
        self.leaked(owner, "age", detail)

    def came_back(self, checkout: TrackedCheckout, held: float) -> None:
        if self._log and checkout.owner is not None:
            logger.warning(
                "Connection of pool %r reported as held too long came back after %.3fs: %s.",
                checkout.pool_name,
                held,
                describe(checkout.owner),
            )


class AgeWatcher(PeriodicScan):
    """Report each connection held longer than `threshold` once, from a daemon thread."""

    def __init__(
        self,
        threshold: float,
        checkouts: Callable[[], Iterable[TrackedCheckout]],
        report: Callable[[TrackedCheckout, float], None],
        on_error: Callable[[str], None],
    ) -> None:
        self.threshold = threshold
        self._checkouts = checkouts
        self._report = report
        # Often enough to report within a quarter of the threshold, never a busy loop.
        super().__init__("age_watcher", min(max(threshold / 4, 0.05), 5.0), self.scan, on_error)

    def scan(self) -> None:
        for checkout in self._checkouts():
            if (
                checkout.owner is not None
                and not checkout.age_reported
                and not checkout.returned
                and checkout.held_for > self.threshold
            ):
                checkout.age_reported = True
                self._report(checkout, self.threshold)
