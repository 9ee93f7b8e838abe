"""The frozen views the monitor publishes: what observers receive and what `holders()`,
`recent_leaks()` and the pages return. Read-only tuples, made from the records the monitor
keeps (`records.py`) and from what the server says (`findings/server_view.py`); nothing in them
refers to an application object.
"""

from __future__ import annotations

import time
from typing import Any, Literal, NamedTuple

from ..hooks.stacks import Location, format_location

SessionKind = Literal["session", "connection"]


class SessionView(NamedTuple):
    """A session as observers see it: read-only, and the same object for every event of it."""

    id: int
    kind: SessionKind  # "session" (ORM) or "connection" (Core)
    pool_name: str
    db_system: str  # the dialect name: postgresql, sqlite, mysql, ...
    route: str
    method: str
    location: Location | None  # (file, line, function) of the application line that opened it
    stack: tuple[Location, ...]  # innermost first; empty unless capture_stacks=True
    opened_at: float  # time.perf_counter()

    @property
    def age(self) -> float:
        return time.perf_counter() - self.opened_at


class CheckoutView(NamedTuple):
    """One checkout of a pooled connection; `session` is None for a raw DBAPI connection."""

    pool_name: str
    session: SessionView | None
    checked_out_at: float  # time.perf_counter()


class HolderView(NamedTuple):
    """One checked-out connection and what holds it, read at one moment."""

    pool_name: str
    kind: str  # "session" (ORM), "connection" (Core) or "raw" (a DBAPI connection)
    session_id: int | None
    route: str
    method: str
    held_for: float  # seconds since checkout
    opened_at: Location | None  # the application line that opened its session
    opened_stack: tuple[Location, ...]  # with capture_stacks=True
    transaction_for: float | None  # seconds its transaction has been open; None: no transaction
    holder: str  # "thread <name>" or "task <name>"
    activity: str  # "database", "application", "awaiting", "leaked" or "unknown"
    now_at: tuple[Location, ...]  # the holder's application frames now, innermost first
    backend_pid: int | None = None  # its server backend (PostgreSQL; `backends.py`)
    server: ServerSide | None = None  # what the server says, when asked (`server_holders.py`)

    def as_dict(self) -> dict[str, Any]:
        return {
            **self._asdict(),
            "opened_at": _location_dict(self.opened_at),
            "opened_stack": [_location_dict(f) for f in self.opened_stack],
            "now_at": [_location_dict(f) for f in self.now_at],
            "server": None if self.server is None else self.server.as_dict(),
        }


class Blocker(NamedTuple):
    pid: int
    holder: HolderView | None  # one of this process's holders
    backend: Backend | None  # what the server says of it; None if gone since

    def describe(self, own_prefix: str | None = None) -> str:
        doing = "" if self.backend is None else f", {self.backend.describe()}"
        if self.holder is not None:
            return (
                f"backend {self.pid} = {holder_request(self.holder)} opened at "
                f"{format_location(self.holder.opened_at)}{doing}"
            )
        name = None if self.backend is None else self.backend.application_name
        if own_prefix and name and name.startswith(own_prefix):
            return f"backend {self.pid} of another worker of this service ({name}){doing}"
        origin = f"application_name {name!r}" if name else "no application_name"
        return f"backend {self.pid} outside this process ({origin}){doing}"

    def as_dict(self) -> dict[str, Any]:
        holder = self.holder
        return {
            "pid": self.pid,
            "ours": holder is not None,
            "route": None if holder is None else holder.route,
            "method": None if holder is None else holder.method,
            "opened_at": None if holder is None else format_location(holder.opened_at),
            "backend": None if self.backend is None else self.backend._asdict(),
        }


class ServerSide(NamedTuple):
    """What the server says of one holder's connection."""

    status: str  # RUNNING, LOCK_WAIT, IDLE_IN_TRANSACTION, IDLE, NOT_SEEN, HIDDEN or NO_PID
    backend: Backend | None
    blockers: tuple[Blocker, ...] = ()  # pg_blocking_pids(): the backends right in its way
    # The head of its lock queue: followed through waiters that wait themselves (on a row,
    # the second waiter queues behind the first, which waits for the holder).
    root: Blocker | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "backend": None if self.backend is None else self.backend._asdict(),
            "blockers": [blocker.as_dict() for blocker in self.blockers],
            "root": None if self.root is None else self.root.as_dict(),
        }


class Backend(NamedTuple):
    """One server backend as ``pg_stat_activity`` shows it."""

    pid: int
    state: str | None  # active, idle, idle in transaction, ...; None: not ours to see
    wait_event_type: str | None  # Lock, LWLock, IO, Client, ...
    wait_event: str | None
    transaction_for: float | None  # seconds since its transaction began
    state_for: float | None  # seconds in its current state
    query: str | None  # the first line of its last statement, literals masked
    application_name: str | None
    blocked_by: tuple[int, ...]  # pg_blocking_pids(), for a backend waiting on a lock

    @property
    def waiting_on_lock(self) -> bool:
        return self.state == "active" and self.wait_event_type == "Lock"

    def describe(self) -> str:
        """What it does, in a few words: "idle in transaction for 31.0 s"."""
        if self.state is None:
            return "state not visible to this role"
        if self.waiting_on_lock:
            return f"waiting on a lock ({self.wait_event}) for {_secs(self.state_for)}"
        if self.state == "active":
            return f"running a statement for {_secs(self.state_for)}"
        return f"{self.state} for {_secs(self.state_for)}"


def holder_request(holder: HolderView) -> str:
    """Its request, as a WARNING says it: "GET /orders" or "outside any request"."""
    return "outside any request" if holder.route == "<none>" else f"{holder.method} {holder.route}"


def _location_dict(location: Location | None) -> dict[str, Any] | None:
    if location is None:
        return None
    filename, line, function = location
    return {"file": filename, "line": line, "function": function}


def _secs(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:.1f} s"


# Literals of a statement's text: strings (standard, E'', dollar-quoted) and numbers; what
# remains is the statement's shape. "$1" placeholders are kept.
