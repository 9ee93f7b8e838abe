"""How leaks are told: the WARNING lines an on-call engineer reads, and the age watcher.

The three detectors live where their events are: request end in the middleware's
`request_finished`, garbage collection in weak-reference callbacks, and age here, in a thread
that looks at held connections the way HikariCP's leakDetectionThreshold does.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from .records import TrackedCheckout, TrackedSession
from .stacks import format_location, format_stack

logger = logging.getLogger("session_monitor")

_WHY = {
    "request_end": "still holds a connection it acquired when its request ended",
    "gc": "was garbage collected without being closed",
    "age": "has held a connection longer than the leak threshold",
}


def describe(tracked: TrackedSession) -> str:
    where = (
        f"{tracked.method} {tracked.route}"
        if tracked.request is not None
        else "outside any request"
    )
    what = "session" if tracked.kind == "session" else "Core connection"
    return (
        f"{where}: {what} on pool {tracked.pool_name!r} opened at "
        f"{format_location(tracked.location)}, {tracked.age:.3f}s ago,"
    )


class LeakLog:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def leaked(self, tracked: TrackedSession, reason: str, detail: str = "") -> None:
        if not self.enabled:
            return
        message = f"Leaked session ({reason}): {describe(tracked)} {_WHY.get(reason, '')}."
        if detail:
            message += "\n" + detail
        elif tracked.stack:
            message += "\nOpened at:\n" + format_stack(tracked.stack)
        logger.warning(message)

    def came_back(self, checkout: TrackedCheckout, held: float) -> None:
        if self.enabled and checkout.owner is not None:
            logger.warning(
                "Connection of pool %r reported as held too long came back after %.3fs: %s",
                checkout.pool_name,
                held,
                describe(checkout.owner),
            )


class AgeWatcher:
    """Report each connection held longer than `threshold` once, from a daemon thread."""

    def __init__(
        self,
        threshold: float,
        checkouts: Callable[[], Iterable[TrackedCheckout]],
        report: Callable[[TrackedCheckout], None],
        on_error: Callable[[str], None],
    ) -> None:
        self.threshold = threshold
        self._checkouts = checkouts
        self._report = report
        self._on_error = on_error
        self._stop = threading.Event()
        # Often enough to report within a quarter of the threshold, never a busy loop.
        self._interval = min(max(threshold / 4, 0.05), 5.0)
        self._thread = threading.Thread(
            target=self._run, name="session_monitor-age-watcher", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.scan()
            except Exception:
                self._on_error("age_watcher")

    def scan(self) -> None:
        for checkout in self._checkouts():
            if checkout.owner is not None and not checkout.age_reported and not checkout.returned:
                held = checkout.held_for
                if held > self.threshold:
                    checkout.age_reported = True
                    self._report(checkout)
