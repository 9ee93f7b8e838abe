"""The tutorials' pitfalls, caught where they happen, each with the line that did it and the fix.

- ``shared_session``: a session opened in one request is used again in another (a module-level
  session shared by every request). Seen when it asks for a connection for a new transaction.
- ``blocking_event_loop``: a sync Session or Connection checks out a connection on the thread
  running the event loop, outside the greenlet SQLAlchemy's asyncio extension runs its own work
  in (``sqlalchemy.util.concurrency.in_greenlet``): the loop waits for the database. How long is
  reported when the connection comes back: the time it was held, an upper bound of the block.
- ``uncommitted_changes``: a session closed while its transaction holds ORM changes that were
  never committed (objects added, modified or deleted, or flushed in that transaction), and not
  while an exception is on its way out: the forgotten ``commit()``.
- ``nested_checkout``: a request that holds a connection from a pool asks the same pool for a
  second one. Under load every request holds one and waits for another: the pool deadlocks.

Each is counted by (kind, route, method), logged once per (kind, application line), and given
to observers (a span event under OpenTelemetry); the last ones are kept for the diagnostics page.

A session that joins a transaction its Connection's owner began is neither ``shared_session`` nor
``uncommitted_changes``: SQLAlchemy's recipe for test suites binds one session to the test's
outer connection and hands it to every request of the test; the test, not the request, decides
what happens to the data.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, NamedTuple

from ..hooks.stacks import Location, format_location
from ..state.naming import NO_REQUEST

if TYPE_CHECKING:

    from ..state.observer import Fanout
    from ..state.records import TrackedSession
    from ..state.stats import SessionStats
    from ..state.views import SessionView

logger = logging.getLogger("session_monitor")

KINDS = ("shared_session", "blocking_event_loop", "uncommitted_changes", "nested_checkout")

_ADVICE = {
    "shared_session": (
        "a session opened in one request is used in another: give each request its own session "
        "(a get_db dependency that yields SessionLocal() and closes it in finally), never a "
        "module-level one."
    ),
    "blocking_event_loop": (
        "a sync session does database I/O on the event loop's thread, and every other request "
        "waits meanwhile: make the endpoint or dependency a plain def (FastAPI runs it in a "
        "thread pool), or use create_async_engine with AsyncSession."
    ),
    "uncommitted_changes": (
        "the session was closed with changes it never committed, and they were rolled back: "
        "call session.commit() (or use `with SessionLocal.begin() as session:`), or "
        "session.rollback() if discarding them is intended."
    ),
    "nested_checkout": (
        "this request already holds a connection from the same pool and asks for another: under "
        "load every request holds one and waits for a second, and the pool deadlocks. Reuse the "
        "request's session (pass it down), or release the first connection before."
    ),
}


class Pitfall(NamedTuple):
    at: float  # time.time()
    kind: str
    route: str
    method: str
    pool_name: str
    location: Location | None  # the application line that did it
    detail: str


class PitfallDetector:
    def __init__(
        self, lock: threading.RLock, observers: Fanout | None, log: bool, keep: int = 20
    ) -> None:
        self._lock = lock  # the session tracker's: it guards the counters
        self._emit = observers
        self._log = log
        self._said: set[tuple[str, Location | None]] = set()
        self.recent: deque[Pitfall] = deque(maxlen=keep)

    def forked(self) -> None:
        """In a forked child (the session tracker's `forked`): the parent's pitfalls are the
        parent's."""
        self.recent.clear()

    def found(
        self,
        kind: str,
        session: TrackedSession,
        location: Location | None,
        detail: str = "",
    ) -> None:
        """One occurrence: counted for the session's route, said once per (kind, line)."""
        self.found_for(kind, session.view, session.stats, location, detail)

    def found_for(
        self,
        kind: str,
        view: SessionView,
        stats: SessionStats,
        location: Location | None,
        detail: str = "",
    ) -> None:
        with self._lock:
            pitfalls = stats.pitfalls
            pitfalls[kind] = pitfalls.get(kind, 0) + 1
        self.recent.append(
            Pitfall(time.time(), kind, view.route, view.method, view.pool_name, location, detail)
        )
        if self._emit is not None:
            self._emit.session_pitfall(view, kind, location)
        if self._log and (kind, location) not in self._said:
            self._said.add((kind, location))
            where = (
                "outside any request" if view.route == NO_REQUEST else f"{view.method} {view.route}"
            )
            logger.warning(
                "Pitfall (%s): %s: %s at %s%s: %s",
                kind,
                where,
                "Core connection" if view.kind == "connection" else "session",
                format_location(location),
                f" ({detail})" if detail else "",
                _ADVICE[kind],
            )
