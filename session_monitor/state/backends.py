"""Each pooled connection's server backend, learnt once when the connection is opened.

PostgreSQL gives every connection a backend process; its PID is what ``pg_stat_activity``,
``pg_locks`` and ``pg_blocking_pids()`` speak of. The drivers know it without a round trip
(psycopg 3 ``info.backend_pid``, psycopg2 ``get_backend_pid()``, asyncpg ``get_server_pid()``),
so it is read in the pool's ``connect`` event and kept by connection record (`PoolState.backends`):
nothing is paid per checkout or per statement, and a record reconnected after an invalidation
or a recycle gets its new backend's PID from its next ``connect`` event.

Tagging (``application_name=``, off by default) names each connection after the process that
opened it, ``<service>:<host>:<pid>``, through the driver's connect parameters: the server's own
tools (``pg_stat_activity``, ``log_line_prefix`` with ``%a``) then show which worker holds what.
It costs nothing per statement. An ``application_name`` the app set itself (in the URL or in
``connect_args``) is kept.
"""

from __future__ import annotations

import os
import re
import socket
from typing import Any

# What PostgreSQL keeps of an application_name: 63 bytes, printable ASCII.
_MAX_NAME = 63
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def backend_pid(record: Any) -> int | None:
    """The server PID of a pool record's connection, from its driver; None when the driver
    does not say (SQLite, MySQL, pg8000, a wrapper)."""
    driver = getattr(record, "driver_connection", None)
    info = getattr(driver, "info", None)
    pid = getattr(info, "backend_pid", None)  # psycopg 3, sync and async
    if pid is None:
        for method in ("get_backend_pid", "get_server_pid"):  # psycopg2, asyncpg
            read = getattr(driver, method, None)
            if callable(read):
                pid = read()
                break
    return pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None


def application_name(service: str) -> str:
    """``<service>:<host>:<pid>`` of this process, cut to what PostgreSQL keeps."""
    name = _UNPRINTABLE.sub("?", f"{service}:{socket.gethostname()}:{os.getpid()}")
    # Cut from the left: the PID at the end is what tells two workers apart.
    return name[-_MAX_NAME:]


def process_prefix(service: str) -> str:
    """What every process's application_name of a service on this host starts with."""
    return application_name(service).rpartition(":")[0] + ":"


class ApplicationNameTagger:
    """A ``do_connect`` listener that adds ``application_name`` to a PostgreSQL connect's
    parameters, unless the app gave one."""

    def __init__(self, service: str) -> None:
        self.service = service
        # The names this tagger wrote: on SQLAlchemy 2.0 the parameters dict is the engine's
        # own, kept between connects, so what is in it may be ours from before a fork.
        self._ours: set[str] = set()

    def tag(self, driver: str, cparams: dict[str, Any]) -> None:
        name = application_name(self.service)
        if driver == "asyncpg":
            settings = cparams.get("server_settings")
            settings = {} if settings is None else dict(settings)
            if settings.get("application_name", name) in self._ours | {name}:
                settings["application_name"] = name
                cparams["server_settings"] = settings
                self._ours.add(name)
        elif cparams.get("application_name", name) in self._ours | {name}:
            cparams["application_name"] = name
            self._ours.add(name)
