"""What the PostgreSQL server says about the pool's connections, read on a side connection.

The app side knows who holds each connection (`holders.py`); only the server knows whether that
connection is running a statement, waiting on a lock (and behind whom), or sitting idle in a
transaction. One read answers all of it:

- ``pg_stat_activity`` for the pool's backends (their PIDs come from the drivers, `backends.py`),
  and for the backends tagged with this process's ``application_name``;
- ``pg_blocking_pids()`` only for the backends waiting on a lock, in the same statement: it
  takes every lock-manager partition lock, so it is never called in a loop or for others;
- the backends blocking them, when they are not ours;
- once per process and pool, the server's connection limits, for the sizing advice.

The read never takes a connection from the app's pools: it opens one of its own with the
engine's own connect function (the pool's creator, so the URL, ``connect_args`` and the app's
``do_connect`` listeners apply), closes it at once, and sets a ``statement_timeout`` on it. It runs
on a thread of its own, never on the event loop, and its caller waits at most `deadline` seconds.
It is never polled: a pool timeout (at most one report per pool per ``timeout_log_interval``), a
request of the diagnostics page (at most one read per ``server_view_interval``, shared), or an
explicit ``holders(server_view=True)``. It fails closed: whatever goes wrong (no free slot at the
server, no permission, a pooler in front, a driver without PIDs) leaves the rest of the report as
it was, with a sentence saying why the server's part is missing, and is counted in
``session_monitor_server_view_failures_total``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable, Collection
from typing import Any, NamedTuple

from sqlalchemy.engine import Engine

from ..state.views import Backend

logger = logging.getLogger("session_monitor")

_COLUMNS = """pid, state, wait_event_type, wait_event,
 extract(epoch FROM clock_timestamp() - xact_start)::float8,
 extract(epoch FROM clock_timestamp() - state_change)::float8,
 left(query, 400), application_name"""
# Read by any role: settings, pg_roles and pg_database are public.
_LIMITS = """SELECT current_setting('max_connections')::int,
 current_setting('superuser_reserved_connections')::int,
 coalesce(current_setting('reserved_connections', true), '0')::int,
 (SELECT rolconnlimit FROM pg_roles WHERE rolname = current_user),
 (SELECT datconnlimit FROM pg_database WHERE datname = current_database()),
 (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int,
 (SELECT count(DISTINCT application_name) FROM pg_stat_activity
  WHERE starts_with(application_name, __PREFIX__))::int"""
# pg_blocking_pids() takes every lock-manager partition lock: asked only of lock waiters.
_BLOCKERS = "CASE WHEN wait_event_type = 'Lock' THEN pg_blocking_pids(pid) END"
_CHAIN_ROUNDS = 3  # blockers of blockers read, at most: one statement each
_STATEMENT_TIMEOUT_MS = 2000


class ServerLimits(NamedTuple):
    max_connections: int
    reserved: int  # superuser_reserved_connections + reserved_connections
    role_limit: int | None  # None: no limit
    database_limit: int | None
    connected: int  # client backends at the server now, all of them
    # Processes of this service connected now (distinct application_names of its tagging);
    # None without tagging.
    tagged_processes: int | None = None

    @property
    def allowed(self) -> int:
        """What this role may open to this database, at most."""
        limits = [self.max_connections - self.reserved]
        limits += [limit for limit in (self.role_limit, self.database_limit) if limit is not None]
        return min(limits)


class ServerReading(NamedTuple):
    at: float  # time.time()
    backends: dict[int, Backend]  # the pool's, this process's tagged ones, and their blockers
    limits: ServerLimits | None
    error: str | None  # why the server's view is missing; None when it was read
    asked: frozenset[int]  # the pool's backend PIDs it was asked about



_LITERALS = re.compile(
    r"\$(\w*)\$.*?\$\1\$|[eE]?'(?:[^'\\]|''|\\.)*'|(?<![\w$])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
)


def statement_shape(query: str | None, limit: int = 120) -> str | None:
    """The first line of a statement, its literal values replaced by ``?``: enough to know the
    statement, never a parameter (psycopg2 sends them inlined)."""
    if not query:
        return None
    if query.startswith("<"):  # "<insufficient privilege>", "<IDLE>"
        return query
    line = query.strip().split("\n", 1)[0].strip()
    masked = _LITERALS.sub("?", line)
    return masked if len(masked) <= limit else masked[: limit - 1] + "…"


def _row(row: Any, blockers: Any = None) -> Backend:
    pid, state, wait_type, wait_event, xact_for, state_for, query, app_name = row[:8]
    return Backend(
        int(pid),
        state,
        wait_type,
        wait_event,
        xact_for,
        state_for,
        statement_shape(query),
        app_name,
        tuple(int(b) for b in (blockers or ())),
    )


def _pid_array(pids: Collection[int]) -> str:
    # PIDs are integers the drivers gave: written as literals, so no paramstyle is involved.
    return "ARRAY[" + ",".join(str(int(pid)) for pid in sorted(pids)) + "]::int[]"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _query(
    connect: Callable[[], Any],
    pids: Collection[int],
    tagged_as: str | None,
    service_prefix: str | None,
    with_limits: bool,
) -> tuple[dict[int, Backend], ServerLimits | None]:
    """The read itself, on a DBAPI connection of its own (sync, or in SQLAlchemy's greenlet
    for an async driver)."""
    connection = connect()
    try:
        cursor = connection.cursor()
        cursor.execute(f"SET statement_timeout = {_STATEMENT_TIMEOUT_MS}")
        where = [f"pid = ANY({_pid_array(pids)})"] if pids else []
        if tagged_as is not None:
            where.append(f"application_name = {_literal(tagged_as)}")
        backends: dict[int, Backend] = {}

        def read(condition: str) -> None:
            cursor.execute(
                f"SELECT {_COLUMNS}, {_BLOCKERS} FROM pg_stat_activity WHERE {condition}"
            )
            for row in cursor.fetchall():
                backend = _row(row, row[8])
                backends[backend.pid] = backend

        if where:
            read(f"pid <> pg_backend_pid() AND ({' OR '.join(where)})")
        # The backends in the way, and theirs while they wait on a lock too: a lock queue is a
        # chain (waiters queue behind the first waiter, which waits for the holder).
        for _ in range(_CHAIN_ROUNDS):
            others = {b for backend in backends.values() for b in backend.blocked_by}
            others -= set(backends)
            if not others:
                break
            read(f"pid = ANY({_pid_array(others)})")
        limits = None
        if with_limits:
            cursor.execute(_LIMITS.replace("__PREFIX__", _literal(service_prefix or "")))
            found = cursor.fetchone()
            if found is not None:
                max_connections, superuser, reserved, role, database, connected, tagged = found
                limits = ServerLimits(
                    max_connections,
                    superuser + reserved,
                    None if role is None or role < 0 else role,
                    None if database is None or database < 0 else database,
                    connected,
                    tagged if service_prefix else None,
                )
        cursor.close()
        return backends, limits
    finally:
        connection.close()


def _connect_function(engine: Engine) -> Callable[[], Any]:
    pool = engine.pool
    invoke = pool._invoke_creator  # the engine's own connect, with the app's arguments
    return lambda: invoke(None)  # type: ignore[arg-type]


def _failure(error: BaseException) -> tuple[str, str]:
    """(counted reason, the sentence shown): never the driver's message, which may name hosts
    and users."""
    text = str(error).lower()
    kind = type(error).__name__
    if "too many" in text or "remaining connection slots" in text:
        return "connect", (
            "no free connection slot at the server (max_connections, or a role or database "
            "connection limit, is reached)"
        )
    if "statement timeout" in text or "canceling statement" in text:
        return "timeout", "the server did not answer within the statement_timeout"
    if "permission denied" in text:
        return "query", f"no permission to read pg_stat_activity ({kind})"
    return ("query" if "connect" not in text else "connect"), f"the read failed ({kind})"


def read_server(
    engine: Engine,
    pids: Collection[int],
    *,
    tagged_as: str | None = None,
    service_prefix: str | None = None,
    with_limits: bool = False,
    deadline: float = 3.0,
) -> tuple[ServerReading, str | None]:
    """Read the server's view on a thread of its own; wait for it at most `deadline` seconds.
    Returns the reading and the failure's counted reason (None when it was read)."""
    outcome: dict[str, Any] = {}
    done = threading.Event()
    connect = _connect_function(engine)
    is_async = engine.dialect.is_async

    def work() -> None:
        try:
            if is_async:
                from sqlalchemy.util import greenlet_spawn

                async def in_greenlet() -> Any:
                    return await greenlet_spawn(
                        _query, connect, pids, tagged_as, service_prefix, with_limits
                    )

                outcome["result"] = asyncio.run(in_greenlet())
            else:
                outcome["result"] = _query(connect, pids, tagged_as, service_prefix, with_limits)
        except BaseException as error:  # the read's own failure, reported; never the app's
            outcome["error"] = error
        finally:
            done.set()

    # A daemon thread: a server that never answers cannot hold the process at exit.
    threading.Thread(target=work, name="session_monitor-server-view", daemon=True).start()
    now = time.time()
    asked = frozenset(pids)
    if not done.wait(deadline):
        return (
            ServerReading(now, {}, None, f"the server did not answer within {deadline:g} s", asked),
            "timeout",
        )
    if "error" in outcome:
        reason, sentence = _failure(outcome["error"])
        return ServerReading(now, {}, None, sentence, asked), reason
    backends, limits = outcome["result"]
    return ServerReading(now, backends, limits, None, asked), None
