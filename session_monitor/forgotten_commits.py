"""The forgotten commit (the uncommitted_changes pitfall), seen at close: a session closed with
changes it never committed, flushed or not. `SessionTracker` inherits these two hooks; what the
pitfall is and how it is reported is `pitfalls.py`'s."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine

from .context import current_request
from .naming import NO_REQUEST
from .records import SessionView, next_session_id
from .stacks import application_location

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from ._listeners import Guard
    from .pitfalls import PitfallDetector
    from .pool_state import EnginePool
    from .records import TrackedSession
    from .stats import SessionStats


class ForgottenCommits:
    _guard: Guard
    pitfalls: PitfallDetector
    entry_for: Callable[[Engine], EnginePool | None]

    # SessionTracker's methods:
    tracked: Callable[[Session], TrackedSession | None]
    _stats_for: Callable[[tuple[str, str]], SessionStats]

    def session_flushed(self, orm_session: Session) -> None:
        try:
            tracked = self.tracked(orm_session)
            if tracked is not None:
                tracked.flushed_uncommitted = True
        except Exception:
            self._guard.failed("session_flushed")

    def session_closing(self, orm_session: Session) -> None:
        """Before a close (called by the _close_impl hook): changes never committed are the
        forgotten commit, unless an exception is on its way out (then the rollback is the point).
        The common close, after a commit, has no transaction and costs one lookup."""
        try:
            if orm_session.__dict__.get("_transaction") is None or sys.exc_info()[1] is not None:
                return
            tracked = self.tracked(orm_session)
            flushed = tracked is not None and tracked.flushed_uncommitted
            if not (
                flushed
                or orm_session._new
                or orm_session._deleted
                or (orm_session.identity_map._modified and orm_session.dirty)
            ):
                return
            # Frames: this method, the hook, Session.close() or whatever called _close_impl.
            hook = sys._getframe().f_back
            location = application_location(None if hook is None else hook.f_back)
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
                time.perf_counter(),
            )
            self.pitfalls.found_for("uncommitted_changes", view, self._stats_for(key), location)
        except Exception:
            self._guard.failed("session_closing")
