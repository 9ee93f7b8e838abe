"""The holders joined with the server's view: which are running a statement, which wait on a
lock and behind whom, which sit idle in a transaction; and the connections the pools lost.

A lock wait and a long statement look the same from the app (its holder is "in the database"
either way); the server tells them apart (``wait_event_type = 'Lock'``) and names the backends
in the way (``pg_blocking_pids()``). A blocker is named by what we know of it: one of this
process's holders (its route and opening line), a worker of the same service (its
``application_name`` when tagging is on), or a backend outside.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

from ..hooks.stacks import format_location
from ..state.views import Backend, Blocker, HolderView, ServerSide, holder_request
from .server_view import ServerReading

# What the server says a holder's connection is doing.
RUNNING = "running"  # a statement, not waiting on a lock
LOCK_WAIT = "lock_wait"
IDLE_IN_TRANSACTION = "idle_in_transaction"
IDLE = "idle"  # held by the app, no transaction open at the server
NOT_SEEN = "not_seen"  # its PID is not at the server: a pooler in front, or the backend is gone
HIDDEN = "hidden"  # the server hides its state from this role
NO_PID = "no_pid"  # the driver did not say which backend it is (or PgBouncer's 0)
UNREAD = "unread"  # checked out after the server was read


def _head_of_queue(pid: int, backends: dict[int, Backend]) -> int:
    seen = set()
    while pid not in seen:
        seen.add(pid)
        backend = backends.get(pid)
        if backend is None or not backend.waiting_on_lock or not backend.blocked_by:
            break
        pid = backend.blocked_by[0]
    return pid


def _status(backend: Backend | None) -> str:
    if backend is None:
        return NOT_SEEN
    if backend.state is None:
        return HIDDEN
    if backend.waiting_on_lock:
        return LOCK_WAIT
    if backend.state == "active":
        return RUNNING
    if backend.state.startswith("idle in transaction"):
        return IDLE_IN_TRANSACTION
    return IDLE if backend.state == "idle" else backend.state.replace(" ", "_")


def join(holders: list[HolderView], reading: ServerReading) -> list[HolderView]:
    """The holders, each with what the server says of its connection (`HolderView.server`)."""
    by_pid = {h.backend_pid: h for h in holders if h.backend_pid is not None}
    joined = []
    for holder in holders:
        if holder.backend_pid is None:
            joined.append(holder._replace(server=ServerSide(NO_PID, None)))
            continue
        if holder.backend_pid not in reading.asked:
            joined.append(holder)  # checked out since the reading: nothing known of it yet
            continue
        backend = reading.backends.get(holder.backend_pid)
        blockers: tuple[Blocker, ...] = ()
        root = None
        if backend is not None and backend.blocked_by:
            blockers = tuple(
                Blocker(pid, by_pid.get(pid), reading.backends.get(pid))
                for pid in backend.blocked_by
            )
            head = _head_of_queue(backend.blocked_by[0], reading.backends)
            root = Blocker(head, by_pid.get(head), reading.backends.get(head))
        side = ServerSide(_status(backend), backend, blockers, root)
        joined.append(holder._replace(server=side))
    return joined


def _plural(count: int, one: str, many: str) -> str:
    return one if count == 1 else many


def summarize(
    holders: list[HolderView], reading: ServerReading, own_prefix: str | None = None
) -> list[str]:
    """One line per (request, opening line, what the server says, first blocker), biggest
    group first: "9 of 10 held by POST /orders, opened at orders.py:12, are waiting on a lock
    (transactionid) held by backend 4242 = GET /reports/{id} opened at reports.py:41, idle in
    transaction for 31.0 s"."""
    if reading.error is not None:
        return [f"unavailable: {reading.error}"]
    if not holders:
        return []
    groups: dict[tuple[Any, ...], list[HolderView]] = {}
    for holder in holders:
        side = holder.server
        status = UNREAD if side is None else side.status
        queue_head = None if side is None or side.root is None else side.root.pid
        key = (holder.method, holder.route, holder.opened_at, status, queue_head)
        groups.setdefault(key, []).append(holder)
    lines = []
    total = len(holders)
    for (_, _, opened, status, _), members in sorted(groups.items(), key=lambda g: -len(g[1])):
        n = len(members)
        head = (
            f"{n} of {total} held by {holder_request(members[0])}, "
            f"opened at {format_location(opened)}, {_plural(n, 'is', 'are')}"
        )
        side = members[0].server
        backend = None if side is None else side.backend
        longest = max(
            (
                m.server.backend.state_for or 0.0
                for m in members
                if m.server is not None and m.server.backend is not None
            ),
            default=0.0,
        )
        if status == LOCK_WAIT and side is not None:
            behind = "a backend gone since" if side.root is None else side.root.describe(own_prefix)
            queued = sum(
                1
                for m in members
                if m.server is not None
                and m.server.blockers
                and m.server.root is not None
                and m.server.blockers[0].pid != m.server.root.pid
            )
            queue = f" ({queued} of them queued behind other waiters)" if queued else ""
            lines.append(f"{head} waiting on a lock held by {behind}{queue}")
        elif status == RUNNING and backend is not None:
            lines.append(
                f"{head} running a statement (longest {longest:.1f} s): {backend.query or '?'}"
            )
        elif status == IDLE_IN_TRANSACTION:
            lines.append(f"{head} idle in transaction (longest {longest:.1f} s)")
        elif status == IDLE:
            lines.append(f"{head} idle at the server: no transaction open")
        elif status == NOT_SEEN:
            lines.append(
                f"{head} not seen at the server under {_plural(n, 'its', 'their')} backend "
                "PID (a pooler such as PgBouncer in front?)"
            )
        elif status == HIDDEN:
            lines.append(
                f"{head} hidden: the server shows other roles' backends only to members of "
                "pg_read_all_stats"
            )
        elif status == NO_PID:
            lines.append(
                f"{head} of unknown backend: the driver gave no backend PID (a driver without "
                "one, such as pg8000, or a pooler such as PgBouncer in front)"
            )
        elif status == UNREAD:
            lines.append(f"{head} checked out since the server was read")
        else:
            lines.append(f"{head} {status.replace('_', ' ')} at the server")
    seen = sum(1 for h in holders if h.server is not None and h.server.backend is not None)
    if seen == 0 and any(h.backend_pid is not None for h in holders):
        lines.append(
            "none of the pool's backends is at the server: a pooler (PgBouncer) in front "
            "shows its own PIDs, not the server's"
        )
    return lines


def lost_connections(
    reading: ServerReading,
    known: Collection[int],
    checked_out: Collection[int],
    tagged_as: str | None,
) -> list[str]:
    """Backends the pools do not account for: opened by this process (its application_name)
    but known to no live pool, and connections the pool believes idle that the server shows
    inside a transaction."""
    if reading.error is not None:
        return [f"unavailable: {reading.error}"]
    lines = []
    for backend in sorted(reading.backends.values(), key=lambda b: b.pid):
        if tagged_as is not None and backend.application_name == tagged_as and (
            backend.pid not in known
        ):
            lines.append(
                f"backend {backend.pid}: opened by this process, known to no live pool "
                f"({backend.describe()}): a connection detached or kept by a disposed pool"
            )
        elif (
            backend.pid in known
            and backend.pid not in checked_out
            and _status(backend) == IDLE_IN_TRANSACTION
        ):
            lines.append(
                f"backend {backend.pid}: idle in the pool, but {backend.describe()} at the "
                "server (reset_on_return off?)"
            )
    return lines


def pids_of(holders: Iterable[HolderView]) -> set[int]:
    return {h.backend_pid for h in holders if h.backend_pid is not None}
