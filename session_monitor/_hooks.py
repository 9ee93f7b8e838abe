"""The three places SQLAlchemy offers no event, wrapped once per process for every monitor.

- ``Engine.raw_connection``: no event fires before a checkout or on a pool timeout, so wait
  time, pending callers and timeouts are measured around the call that waits.
- ``SessionTransaction._connection_for_bind``: a session's first connection request is the
  earliest moment it touches the database; marking it lets a checkout tell an ORM session's
  connection from one the app checked out through Core.
- ``Session._close_impl``: there is no close event; close(), invalidate(), reset() and context
  manager exit all pass through here.
- ``Connection._begin_impl`` / ``_commit_impl`` / ``_rollback_impl``: Core transactions. The
  engine's begin/commit/rollback events would do, but listening to any Connection event puts
  every statement of that engine on SQLAlchemy's slower event-dispatching path, for good
  (``Engine._has_events`` is never reset); these three calls happen once per transaction.

Each wrapper calls the original unchanged and lets its exceptions through; the monitors' own code
runs guarded. The originals are restored when the last monitor unsubscribes.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, SessionTransaction

if TYPE_CHECKING:
    from .monitor import SessionMonitor

# The Session whose root transaction is acquiring a connection right now (in this context).
acquiring_session: ContextVar[Session | None] = ContextVar(
    "session_monitor_acquiring", default=None
)

_CONNECTION_INIT = Connection.__init__.__code__

_monitors: tuple[SessionMonitor, ...] = ()
_lock = threading.Lock()
_originals: dict[tuple[type, str], Any] = {}


def subscribe(monitor: SessionMonitor) -> None:
    global _monitors
    with _lock:
        if monitor in _monitors:
            return
        if not _monitors:
            _install()
        _monitors = (*_monitors, monitor)


def unsubscribe(monitor: SessionMonitor) -> None:
    global _monitors
    with _lock:
        if monitor not in _monitors:
            return
        _monitors = tuple(m for m in _monitors if m is not monitor)
        if not _monitors:
            _uninstall()


def _install() -> None:
    _patch(Engine, "raw_connection", _raw_connection)
    _patch(SessionTransaction, "_connection_for_bind", _connection_for_bind)
    _patch(Session, "_close_impl", _close_impl)
    _patch(Connection, "_begin_impl", _begin_impl)
    _patch(Connection, "_commit_impl", _commit_impl)
    _patch(Connection, "_rollback_impl", _rollback_impl)


def _uninstall() -> None:
    for (cls, name), original in _originals.items():
        setattr(cls, name, original)
    _originals.clear()


def _patch(cls: type, name: str, wrapper: Callable[..., Any]) -> None:
    # Read from the class __dict__ so a subclass never captures an inherited wrapper.
    original = cls.__dict__[name]
    _originals[(cls, name)] = original
    setattr(cls, name, wrapper)


def _original(cls: type, name: str) -> Any:
    return _originals[(cls, name)]


def _raw_connection(self: Engine) -> Any:
    original = _original(Engine, "raw_connection")
    # Called by Connection() for engine.connect() and sessions; by the app for a raw DBAPI
    # connection, which is no session.
    for_connection = sys._getframe(1).f_code is _CONNECTION_INIT
    call: Callable[[], Any] = lambda: original(self)  # noqa: E731
    for monitor in _monitors:
        call = monitor._wrap_acquire(self, call, for_connection)
    return call()


def _connection_for_bind(
    self: SessionTransaction, bind: Any, execution_options: Any = None, *args: Any, **kw: Any
) -> Any:
    original = _original(SessionTransaction, "_connection_for_bind")
    monitors = _monitors
    # Only a root transaction asking for a bind it has no connection for acquires one.
    if not monitors or self._parent is not None or bind in self._connections:
        return original(self, bind, execution_options, *args, **kw)
    session = self.session
    caller = sys._getframe(1)
    for monitor in monitors:
        monitor._session_acquiring(session, bind, caller)
    token = acquiring_session.set(session)
    try:
        connection = original(self, bind, execution_options, *args, **kw)
    finally:
        acquiring_session.reset(token)
    for monitor in monitors:
        monitor._session_transaction_began(session, self)
    return connection


def _close_impl(self: Session, *args: Any, **kw: Any) -> Any:
    original = _original(Session, "_close_impl")
    try:
        return original(self, *args, **kw)
    finally:
        for monitor in _monitors:
            monitor._session_closed(self)


def _begin_impl(self: Connection, transaction: Any) -> None:
    _original(Connection, "_begin_impl")(self, transaction)
    for monitor in _monitors:
        monitor._core_transaction(self, "begin")


def _commit_impl(self: Connection) -> None:
    _original(Connection, "_commit_impl")(self)
    for monitor in _monitors:
        monitor._core_transaction(self, "commit")


def _rollback_impl(self: Connection) -> None:
    for monitor in _monitors:
        monitor._core_transaction(self, "rollback")
    _original(Connection, "_rollback_impl")(self)
