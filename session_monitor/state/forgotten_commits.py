"""The forgotten commit (the uncommitted_changes pitfall), seen at close: a session closed with
changes it never committed, flushed or not. `SessionTracker` inherits these two hooks; what the
pitfall is and how it is reported is `pitfalls.py`'s.

Three things are not the forgotten commit, each a rollback that is the point:

- an exception on its way out where the session is closed (`exception_leaving`);
- a session that joined a transaction its Connection's owner began
  (`pitfalls.joins_outer_transaction`): a test fixture's session on an outer connection;
- attribute changes with no net difference (`merge()` of an unchanged object): `Session.dirty` is
  optimistic, `Session.is_modified` compares each attribute with its loaded value.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextvars import ContextVar
from types import FrameType
from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine

from ..findings.pitfalls import joins_outer_transaction
from ..hooks.stacks import application_location
from .context import current_request
from .naming import NO_REQUEST
from .records import SessionView, next_session_id

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from ..findings.pitfalls import PitfallDetector
    from ..hooks.guard import Guard
    from .pool_state import EnginePool
    from .records import TrackedSession
    from .stats import SessionStats

# The modules whose __exit__ / __aexit__ end a session's `with` / `async with` block.
_SESSION_MODULES = frozenset({"sqlalchemy.orm.session", "sqlalchemy.ext.asyncio.session"})

# Set by the AsyncSession.close() hook while it closes with an exception on its way out: the
# sync close runs in a greenlet (under `async with`, in a task of its own too), where
# sys.exc_info() no longer shows the exception the app's code is leaving with.
closing_while_leaving: ContextVar[bool] = ContextVar(
    "session_monitor_closing_while_leaving", default=False
)


def exception_leaving(caller: FrameType | None) -> bool:
    """Whether an exception is on its way out where the frame `caller` closes a session.

    At the end of a session's `with` or `async with` block, only an exception leaving that block
    counts (its __exit__'s arguments): one an enclosing `except` block handles around the block
    is not leaving (the get-or-create's `except NoResultFound:`). A direct close() in a
    `finally` or `except` block counts whatever is being handled, since Python does not tell
    the two apart; the rollback after an exception is usually the point there.
    """
    if sys.exc_info()[1] is None:  # the common case: nothing raised anywhere up the stack
        return False
    if (
        caller is not None
        and caller.f_code.co_name in ("__exit__", "__aexit__")
        and caller.f_globals.get("__name__") in _SESSION_MODULES
    ):
        code = caller.f_code  # (self, type_, value, traceback)
        return caller.f_locals.get(code.co_varnames[2]) is not None
    return True


def _has_net_changes(orm_session: Session) -> bool:
    """Objects added or deleted, or an attribute whose value differs from the loaded one."""
    if orm_session._new or orm_session._deleted:
        return True
    for state in orm_session.identity_map._modified:
        instance = state.obj()
        if instance is not None and orm_session.is_modified(instance):
            return True
    return False


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
                time.perf_counter(),
            )
            self.pitfalls.found_for("uncommitted_changes", view, self._stats_for(key), location)
        except Exception:
            self._guard.failed("session_closing")
