"""The three places SQLAlchemy offers no event, wrapped once per process for every monitor.

- ``Engine.raw_connection``: no event fires before a checkout or on a pool timeout, so wait
  time, pending callers and timeouts are measured around the call that waits.
- ``SessionTransaction._connection_for_bind``: a session's first connection request is the
  earliest moment it touches the database; marking it lets a checkout tell an ORM session's
  connection from one the app checked out through Core.
- ``Session._close_impl``: there is no close event; close(), invalidate(), reset() and context
  manager exit all pass through here.
- ``Connection._begin_impl`` / ``_commit_impl`` / ``_rollback_impl``: transactions, ORM and Core
  alike. The engine's begin/commit/rollback events would do, but listening to any Connection
  event puts every statement of that engine on SQLAlchemy's slower event-dispatching path, for
  good (``Engine._has_events`` is never reset); these calls happen once per transaction.
- ``Transaction.close``: a root transaction closed without commit or rollback is rolled back by
  SQLAlchemy; that rollback is the outcome ``close`` (the normal read path), not ``rollback``.

Each wrapper calls the original unchanged and lets its exceptions through; the monitors' own code
runs guarded. The originals are restored when the last monitor unsubscribes.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection, Engine, RootTransaction, Transaction
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
    global _orig_raw_connection, _orig_connection_for_bind, _orig_close_impl
    global _orig_begin_impl, _orig_commit_impl, _orig_rollback_impl, _orig_transaction_close
    _orig_raw_connection = _patch(Engine, "raw_connection", _raw_connection)
    _orig_connection_for_bind = _patch(
        SessionTransaction, "_connection_for_bind", _connection_for_bind
    )
    _orig_close_impl = _patch(Session, "_close_impl", _close_impl)
    _orig_begin_impl = _patch(Connection, "_begin_impl", _begin_impl)
    _orig_commit_impl = _patch(Connection, "_commit_impl", _commit_impl)
    _orig_rollback_impl = _patch(Connection, "_rollback_impl", _rollback_impl)
    _orig_transaction_close = _patch(Transaction, "close", _transaction_close)


def _uninstall() -> None:
    for (cls, name), original in _originals.items():
        setattr(cls, name, original)
    _originals.clear()


def _patch(cls: type, name: str, wrapper: Callable[..., Any]) -> Any:
    # Read from the class __dict__ so a subclass never captures an inherited wrapper.
    original = cls.__dict__[name]
    _originals[(cls, name)] = original
    setattr(cls, name, wrapper)
    return original


# The originals, as module globals: the wrappers run on every checkout and transaction.
_orig_raw_connection: Any = Engine.raw_connection
_orig_connection_for_bind: Any = SessionTransaction._connection_for_bind
_orig_close_impl: Any = Session._close_impl
_orig_begin_impl: Any = Connection._begin_impl
_orig_commit_impl: Any = Connection._commit_impl
_orig_rollback_impl: Any = Connection._rollback_impl
_orig_transaction_close: Any = Transaction.close


def _raw_connection(self: Engine) -> Any:
    # Called by Connection() for engine.connect() and sessions; by the app for a raw DBAPI
    # connection, which is no session.
    for_connection = sys._getframe(1).f_code is _CONNECTION_INIT
    monitors = _monitors
    if len(monitors) == 1:
        return monitors[0]._acquire(self, _orig_raw_connection, for_connection)
    call: Callable[[Engine], Any] = _orig_raw_connection
    for monitor in monitors:
        call = functools.partial(monitor._acquire, call=call, for_connection=for_connection)
    return call(self)


def _connection_for_bind(
    self: SessionTransaction, bind: Any, execution_options: Any = None, *args: Any, **kw: Any
) -> Any:
    original = _orig_connection_for_bind
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
    return connection


def _close_impl(self: Session, *args: Any, **kw: Any) -> Any:
    try:
        return _orig_close_impl(self, *args, **kw)
    finally:
        for monitor in _monitors:
            monitor._session_closed(self)


def _begin_impl(self: Connection, transaction: Any) -> None:
    _orig_begin_impl(self, transaction)
    for monitor in _monitors:
        monitor._transaction_step(self, "begin")


def _commit_impl(self: Connection) -> None:
    _orig_commit_impl(self)
    for monitor in _monitors:
        monitor._transaction_step(self, "commit")


def _rollback_impl(self: Connection) -> None:
    for monitor in _monitors:
        monitor._transaction_step(self, "rollback")
    _orig_rollback_impl(self)


def _transaction_close(self: Transaction) -> None:
    if not isinstance(self, RootTransaction):
        _orig_transaction_close(self)
        return
    connection = self.connection
    for monitor in _monitors:
        monitor._transaction_step(connection, "close")
    try:
        _orig_transaction_close(self)
    finally:
        for monitor in _monitors:
            monitor._transaction_step(connection, "closed")
