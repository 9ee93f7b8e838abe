"""Who holds the pool: each checked-out connection, where it was opened, where its holder is now.

At checkout the pool tracker remembers only the holder: the thread's id and, under asyncio, a weak
reference to the task. Everything else is read when someone asks (`holders()`, a pool timeout,
the diagnostics page, the idle-in-transaction sampler), from another thread:

- a thread's current frames come from ``sys._current_frames()``;
- a task's from its coroutine's await chain (``cr_await``), innermost last: the point where the
  task is suspended. ``Task.get_stack()`` returns only the outermost coroutine's frame; a task
  running right now is on its thread's current frames instead.

"Busy in the database" means the innermost frame is SQLAlchemy's, the driver's, or the greenlet
SQLAlchemy's asyncio extension runs them in; anything else is the application doing something else
while it holds the connection.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any, NamedTuple

from ..hooks.forking import Stage, in_child, new_lock
from ..hooks.stacks import Location, application_frames, application_stack, format_location
from ..state.records import TrackedCheckout
from ..state.views import HolderView

# Where a holder's innermost frame means "in the database": SQLAlchemy and the usual drivers.
_DATABASE_PACKAGES = (
    "sqlalchemy",
    "greenlet",
    "sqlite3",
    "psycopg",
    "psycopg2",
    "psycopg_pool",
    "asyncpg",
    "pymysql",
    "MySQLdb",
    "aiomysql",
    "asyncmy",
    "aiosqlite",
    "oracledb",
    "pyodbc",
)
_NOW_DEPTH = 8  # application frames kept of where a holder is now


def holder_from_dict(data: dict[str, Any]) -> HolderView:
    """A holder as `HolderView.as_dict` wrote it (another worker's, on the diagnostics page),
    without its server side."""

    def location(found: dict[str, Any] | None) -> Location | None:
        return None if found is None else (found["file"], found["line"], found["function"])

    fields = {name: data[name] for name in HolderView._fields if name in data}
    return HolderView(
        **{
            **fields,
            "opened_at": location(data.get("opened_at")),
            "opened_stack": tuple(filter(None, map(location, data.get("opened_stack", ())))),
            "now_at": tuple(filter(None, map(location, data.get("now_at", ())))),
            "server": None,
        }
    )


def _is_database_frame(frame: FrameType) -> bool:
    module = frame.f_globals.get("__name__", "")
    top = module.partition(".")[0] if isinstance(module, str) else ""
    return top in _DATABASE_PACKAGES


def _await_chain(coroutine: Any) -> list[FrameType]:
    """The frames of a coroutine and of everything it awaits, outermost first."""
    frames: list[FrameType] = []
    seen = 0
    while coroutine is not None and seen < 200:
        seen += 1
        frame = getattr(coroutine, "cr_frame", None) or getattr(coroutine, "gi_frame", None)
        if frame is None:
            break
        frames.append(frame)
        coroutine = getattr(coroutine, "cr_await", None) or getattr(coroutine, "gi_yieldfrom", None)
    return frames


def _thread_frame(thread_id: int) -> FrameType | None:
    return sys._current_frames().get(thread_id)


def where_now(checkout: TrackedCheckout) -> tuple[str, str, tuple[Location, ...]]:
    """(holder, activity, application frames innermost first) of a checkout's holder now."""
    if checkout.outlived_its_request:
        # Its request is over: whatever its thread or task does now, it is not holding this.
        return "nobody (its request ended)", "leaked", ()
    task = None if checkout.task_ref is None else checkout.task_ref()
    if checkout.task_ref is not None and (task is None or task.done()):
        # Its thread runs other tasks now (perhaps the one asking): none of them is the holder.
        return "a task that has ended", "unknown", ()
    if task is not None:
        coroutine = task.get_coro()
        chain = _await_chain(coroutine)
        name = f"task {task.get_name()}"
        if chain and not getattr(coroutine, "cr_running", False):
            innermost = chain[-1]
            activity = "database" if _is_database_frame(innermost) else "awaiting"
            return name, activity, application_frames(reversed(chain), _NOW_DEPTH)
        # Running now: on its thread, perhaps blocking the event loop.
        current = _thread_frame(checkout.thread_id)
        return name, _activity(current), _stack(current, checkout.thread_id)
    current = _thread_frame(checkout.thread_id)
    thread = f"thread {_thread_name(checkout.thread_id)}"
    return thread, _activity(current), _stack(current, checkout.thread_id)


def _activity(frame: FrameType | None) -> str:
    if frame is None:
        return "unknown"
    return "database" if _is_database_frame(frame) else "application"


def _stack(frame: FrameType | None, thread_id: int) -> tuple[Location, ...]:
    if frame is None:
        return ()
    # Only the asker's own stack continues in its parent greenlet (the awaiting frames of
    # SQLAlchemy's asyncio extension): another thread's does not continue in the asker's.
    return application_stack(frame, _NOW_DEPTH, cross_greenlet=thread_id == threading.get_ident())


def _thread_name(thread_id: int) -> str:
    import threading

    for thread in threading.enumerate():
        if thread.ident == thread_id:
            return thread.name
    return str(thread_id)


def holder_view(
    checkout: TrackedCheckout, now: float, backend_pid: int | None = None
) -> HolderView:
    owner = checkout.owner
    session = None if owner is None else owner.view
    holder, activity, now_at = where_now(checkout)
    started = checkout.transaction_started_at
    return HolderView(
        pool_name=checkout.pool_name,
        kind="raw" if session is None else session.kind,
        session_id=None if session is None else session.id,
        route="<none>" if session is None else session.route,
        method="<none>" if session is None else session.method,
        held_for=now - checkout.checked_out_at,
        opened_at=None if session is None else session.location,
        opened_stack=() if session is None else session.stack,
        transaction_for=None if started is None else now - started,
        holder=holder,
        activity=activity,
        now_at=now_at,
        backend_pid=backend_pid,
    )


def holder_views(
    checkouts: Iterable[TrackedCheckout], backends: dict[int, int] | None = None
) -> list[HolderView]:
    """Every connection checked out now, oldest first; `backends`: server PIDs by connection
    record id."""
    now = time.perf_counter()
    pids = backends or {}
    views = [holder_view(c, now, pids.get(c.record_key)) for c in checkouts if not c.returned]
    views.sort(key=lambda view: -view.held_for)
    return views


def summarize(holders: list[HolderView], limit: int = 3) -> list[str]:
    """Holders grouped by where they were opened, biggest group first: one line per group."""
    groups: dict[tuple[str, str, Location | None], list[HolderView]] = {}
    for view in holders:
        groups.setdefault((view.method, view.route, view.opened_at), []).append(view)
    lines = []
    ranked = sorted(groups.items(), key=lambda item: -len(item[1]))
    for (method, route, opened), members in ranked[:limit]:
        oldest = max(members, key=lambda view: view.held_for)
        request = "outside any request" if route == "<none>" else f"{method} {route}"
        activity = Counter(view.activity for view in members).most_common(1)[0][0]
        if activity == "leaked":
            now = "held by nobody: leaked, its request ended"
        else:
            where = format_location(oldest.now_at[0]) if oldest.now_at else "<unknown>"
            now = f"now at {where} ({activity})"
        lines.append(
            f"{len(members)} of {len(holders)} held by {request}, opened at "
            f"{format_location(opened)}, oldest {oldest.held_for:.1f}s, {now}"
        )
    if len(ranked) > limit:
        rest = sum(len(members) for _, members in ranked[limit:])
        lines.append(f"{rest} more in {len(ranked) - limit} other places")
    return lines


logger = logging.getLogger("session_monitor")


class PoolUsage(NamedTuple):
    name: str
    used: int
    idle: int
    pending: int
    maximum: int | None


class PoolEvent(NamedTuple):
    """A pool timeout or a cancelled wait, as the diagnostics page lists them."""

    at: float  # time.time()
    pool_name: str
    kind: str  # "timeout" or "cancelled"
    waited: float
    used: int
    idle: int
    pending: int
    maximum: int | None
    holders: tuple[str, ...]
    server: tuple[str, ...] = ()  # what the server said of the holders (`server_holders.py`)


class ExhaustionReporter:
    """On a pool timeout or a cancelled wait: the holders, in one WARNING per pool per interval.

    Every event is kept (the last few) for the diagnostics page; the WARNING says how many were
    not logged since the previous one, so a storm of failed requests logs one line a period.
    """

    def __init__(self, interval: float, keep: int = 20) -> None:
        self.interval = interval
        self.recent: deque[PoolEvent] = deque(maxlen=keep)
        self._last_logged: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}
        self._lock = new_lock()
        in_child(Stage.FORGET, self.forked)

    def forked(self) -> None:
        """In a forked child: the parent's pool events are the parent's; the child's first
        exhaustion is logged."""
        self.recent.clear()
        self._last_logged = {}
        self._unlogged = {}

    def report(
        self,
        pool_name: str,
        kind: str,
        waited: float,
        usage: tuple[int, int, int, int | None],
        checkouts: Iterable[TrackedCheckout],
        backends: dict[int, int] | None = None,
        server: Callable[[list[HolderView]], list[str]] | None = None,
    ) -> tuple[str, ...]:
        """`server`: reads what the server says of the holders; when given, the WARNING waits
        for it, on a thread of its own, so the caller that timed out never does."""
        used, idle, pending, maximum = usage
        holders = holder_views(checkouts, backends)
        lines = tuple(summarize(holders))
        now = time.time()
        event = PoolEvent(now, pool_name, kind, waited, used, idle, pending, maximum, lines)
        self.recent.append(event)
        with self._lock:
            last = self._last_logged.get(pool_name)
            if last is not None and now - last < self.interval:
                self._unlogged[pool_name] = self._unlogged.get(pool_name, 0) + 1
                return lines
            self._last_logged[pool_name] = now
            unlogged = self._unlogged.pop(pool_name, 0)
        what = "timed out" if kind == "timeout" else "was cancelled"
        bound = "no bound" if maximum is None else f"max {maximum}"
        args = (
            pool_name,
            what,
            waited,
            used,
            bound,
            idle,
            pending,
            f"; {unlogged} more since the last report" if unlogged else "",
            "\n  ".join(lines) or "(no connection tracked)",
        )
        if server is None:
            logger.warning(_EXHAUSTED, *args)
        else:
            threading.Thread(
                target=self._log_with_server,
                args=(event, holders, server, args),
                name="session_monitor-timeout-report",
                daemon=True,
            ).start()
        return lines

    def _log_with_server(
        self,
        event: PoolEvent,
        holders: list[HolderView],
        server: Callable[[list[HolderView]], list[str]],
        args: tuple[Any, ...],
    ) -> None:
        server_lines = tuple(server(holders))  # never raises: it reports its own failures
        with self._lock:
            for index, kept in enumerate(self.recent):
                if kept is event:
                    self.recent[index] = event._replace(server=server_lines)
                    break
        logger.warning(
            _EXHAUSTED + "\nThe server's view:\n  %s", *args, "\n  ".join(server_lines)
        )


_EXHAUSTED = (
    "Pool %r exhausted: a checkout %s after %.1fs waiting; %d in use (%s), %d idle, "
    "%d waiting%s. Held by:\n  %s"
)
