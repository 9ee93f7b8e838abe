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
from types import FrameType
from typing import Any, NamedTuple

from sqlalchemy.engine import Connection, Engine, RootTransaction, Transaction
from sqlalchemy.orm import Session, SessionTransaction


class Subscriber(NamedTuple):
    """What one monitor has the hooks call; each of these guards itself and never raises."""

    owner: object  # the monitor, which unsubscribes by itself
    # (engine, call, opening_frame) -> what call(engine) returns; opening_frame is the frame of
    # the Connection being opened, None for a raw DBAPI connection.
    acquire: Callable[..., Any]
    session_acquiring: Callable[[Session, Any, FrameType], None]
    session_closed: Callable[[Session], None]
    transaction_began: Callable[[Connection], None]
    transaction_committed: Callable[[Connection], None]
    transaction_rolling_back: Callable[[Connection], None]
    transaction_closing: Callable[[Connection, bool], None]


# The Session whose root transaction is acquiring a connection right now (in this context).
acquiring_session: ContextVar[Session | None] = ContextVar(
    "session_monitor_acquiring", default=None
)

_CONNECTION_INIT = Connection.__init__.__code__

_subscribers: tuple[Subscriber, ...] = ()
_lock = threading.Lock()
_originals: dict[tuple[type, str], Any] = {}


def subscribed(owner: object) -> bool:
    return any(subscriber.owner is owner for subscriber in _subscribers)


def subscribe(subscriber: Subscriber) -> None:
    global _subscribers
    with _lock:
        if subscribed(subscriber.owner):
            return
        if not _subscribers:
            _install()
        _subscribers = (*_subscribers, subscriber)


def unsubscribe(owner: object) -> None:
    global _subscribers
    with _lock:
        if not subscribed(owner):
            return
        _subscribers = tuple(s for s in _subscribers if s.owner is not owner)
        if not _subscribers:
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
    caller = sys._getframe(1)
    opening = caller if caller.f_code is _CONNECTION_INIT else None
    subscribers = _subscribers
    if len(subscribers) == 1:
        return subscribers[0].acquire(self, _orig_raw_connection, opening)
    call: Callable[[Engine], Any] = _orig_raw_connection
    for subscriber in subscribers:
        call = functools.partial(subscriber.acquire, call=call, opening=opening)
    return call(self)


def _connection_for_bind(
    self: SessionTransaction, bind: Any, execution_options: Any = None, *args: Any, **kw: Any
) -> Any:
    original = _orig_connection_for_bind
    subscribers = _subscribers
    # Only a root transaction asking for a bind it has no connection for acquires one.
    if not subscribers or self._parent is not None or bind in self._connections:
        return original(self, bind, execution_options, *args, **kw)
    session = self.session
    caller = sys._getframe(1)
    for subscriber in subscribers:
        subscriber.session_acquiring(session, bind, caller)
    token = acquiring_session.set(session)
    try:
        return original(self, bind, execution_options, *args, **kw)
    finally:
        acquiring_session.reset(token)


def _close_impl(self: Session, *args: Any, **kw: Any) -> Any:
    try:
        return _orig_close_impl(self, *args, **kw)
    finally:
        for subscriber in _subscribers:
            subscriber.session_closed(self)


def _begin_impl(self: Connection, transaction: Any) -> None:
    _orig_begin_impl(self, transaction)
    for subscriber in _subscribers:
        subscriber.transaction_began(self)


def _commit_impl(self: Connection) -> None:
    _orig_commit_impl(self)
    for subscriber in _subscribers:
        subscriber.transaction_committed(self)


def _rollback_impl(self: Connection) -> None:
    for subscriber in _subscribers:
        subscriber.transaction_rolling_back(self)
    _orig_rollback_impl(self)


def _transaction_close(self: Transaction) -> None:
    subscribers = _subscribers
    if not subscribers or not isinstance(self, RootTransaction):
        _orig_transaction_close(self)
        return
    connection = self.connection
    for subscriber in subscribers:
        subscriber.transaction_closing(connection, True)
    try:
        _orig_transaction_close(self)
    finally:
        for subscriber in subscribers:
            subscriber.transaction_closing(connection, False)
