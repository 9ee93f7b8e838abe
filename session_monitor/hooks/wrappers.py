"""The places SQLAlchemy offers no event, wrapped once per process for every monitor.

- ``Engine.raw_connection``: no event fires before a checkout or on a pool timeout, so wait
  time, pending callers and timeouts are measured around the call that waits; the checkout
  itself is counted there too, since a pool ``checkout`` listener would put every checkout on
  the pool's slower path.
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
- ``_ConnectionRecord.checkin``: the pool takes a connection back. The checkout a monitor counted
  is kept on the pool's connection record (`CHECKOUT_ATTRIBUTE`) until then, so the checkin finds
  it with one attribute read, and a pool's ``checkin`` listener would send every checkin of that
  engine through SQLAlchemy's event dispatch. A record no monitor counted costs one dict lookup.
- ``Connection._handle_dbapi_exception``: a statement failed (there is no event without putting
  every statement on the slower path); the transaction it failed in ends as ``rollback``. It runs
  only when a statement fails.
- ``AsyncSession.close`` (once SQLAlchemy's asyncio extension is imported: it needs greenlet,
  which we never import): the exception on its way out where the app closes an AsyncSession is
  seen here; the sync close runs in a greenlet (under ``async with``, in a task of its own),
  where ``sys.exc_info()`` no longer shows it.

The first law: each wrapper calls the original exactly once, never inside an ``except`` of ours,
and returns its result or lets its exception through untouched; the monitors' own code is
called before or after it and guards itself. What a wrapper leaves in a ContextVar while the
original runs holds no application object (asyncio copies the context into callbacks that a
connect() schedules, and those copies live on): a weak reference to the Session, and the opening
line as plain strings and numbers, never the frame.

The methods are private, so a SQLAlchemy release may rename one: a group whose method is missing
is not installed, the monitors say so once, and everything else works (see `missing`).
"""

from __future__ import annotations

import inspect
import sys
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from time import perf_counter
from types import FrameType
from typing import Any, NamedTuple

from sqlalchemy.engine import Connection, Engine, RootTransaction, Transaction
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.pool.base import _ConnectionRecord
from sqlalchemy.util.concurrency import in_greenlet as _sqlalchemy_in_greenlet

from .forking import new_lock


class Subscriber(NamedTuple):
    """What one monitor has the hooks call; each of these guards itself and never raises."""

    owner: object  # the monitor, which unsubscribes by itself
    # engine -> a token for acquire_finished or acquire_failed, or None when the monitor does
    # not watch it.
    acquire_started: Callable[[Engine], Any]
    # (token, perf_counter() when it began waiting, the pool's connection proxy, the frame that
    # called raw_connection(): Connection.__init__ for a Core connection or a session's; None
    # when the wrapper is a greenlet's first frame). The frame is for that call only.
    acquire_finished: Callable[[Any, float, Any, FrameType | None], None]
    # (token, perf_counter() when it began waiting, the exception the checkout raised)
    acquire_failed: Callable[[Any, float, BaseException], None]
    # (session, bind, caller) -> the monitor's record of the session, or None
    session_acquiring: Callable[[Session, Any, FrameType | None], Any]
    session_closing: Callable[[Session], None]  # called from _close_impl: see its frames
    session_flushed: Callable[[Session], None]
    session_closed: Callable[[Session], None]
    session_acquire_failed: Callable[[Session, BaseException], None]
    transaction_began: Callable[[Connection], None]
    transaction_committed: Callable[[Connection], None]
    transaction_rolling_back: Callable[[Connection], None]
    transaction_closing: Callable[[Connection, bool], None]
    statement_failed: Callable[[Connection], None]


# The ORM Session whose root transaction is acquiring a connection right now, weakly, and, when
# one monitor is subscribed, its record of the session (the monitor's own object, which refers
# to no application object), so that the checkout finds its session without a lookup.
acquiring_session: ContextVar[tuple[weakref.ref[Session], Any] | None] = ContextVar(
    "session_monitor_acquiring", default=None
)

# The code of Connection.__init__: a raw_connection() called from it opens a Core connection,
# the app's own unless an ORM session is acquiring it (`acquiring_session`).
CONNECTION_INIT = Connection.__init__.__code__

_subscribers: tuple[Subscriber, ...] = ()
_lock = new_lock()  # free again in a forked child
_originals: dict[tuple[type, str], Any] = {}
# Whether ORM sessions are followed: without their hooks an ORM session's connection would look
# like the app's own Core connection. Read on every checkout, so kept up to date rather than
# asked of _originals.
sessions_hooked = False


def subscribed(owner: object) -> bool:
    return any(subscriber.owner is owner for subscriber in _subscribers)


def subscribe(subscriber: Subscriber) -> None:
    global _subscribers
    with _lock:
        if subscribed(subscriber.owner):
            return
        _install()  # what is not installed yet: the AsyncSession group may be new since
        _subscribers = (*_subscribers, subscriber)


def install_new_groups() -> None:
    """Install a group that became possible since the subscribers came: the AsyncSession one,
    once the app imports SQLAlchemy's asyncio extension (before its first AsyncEngine)."""
    with _lock:
        if _subscribers:
            _install()


def unsubscribe(owner: object) -> None:
    global _subscribers
    with _lock:
        if not subscribed(owner):
            return
        _subscribers = tuple(s for s in _subscribers if s.owner is not owner)
        if not _subscribers:
            _uninstall()


def in_greenlet() -> bool:
    """Whether this runs in the greenlet SQLAlchemy's asyncio extension runs sync code in.

    Only an AsyncEngine or AsyncSession makes that greenlet, and greenlet is imported first: until
    it is in sys.modules nothing runs in one. SQLAlchemy 2.1 no longer installs greenlet, and its
    own `in_greenlet` then raises ImportError; without it the answer is simply False, at the cost
    of a dict lookup (a sync app never imports greenlet for us).
    """
    if sys.modules.get("greenlet") is None:  # never imported, or unimportable
        return False
    return _sqlalchemy_in_greenlet()


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


# -- the wrappers ------------------------------------------------------------------------------


def _raw_connection(self: Engine) -> Any:
    # Called by Connection() for engine.connect() and sessions; by the app for a raw DBAPI
    # connection, which is no session. The frame it was called from goes to the monitors after
    # the checkout: f_back, not _getframe(1), since the wrapper may be a greenlet's first frame
    # (AsyncEngine's raw_connection() runs it through greenlet_spawn), where there is no caller.
    subscribers = _subscribers
    if len(subscribers) != 1:
        return _raw_connection_for_many(self, subscribers)
    subscriber = subscribers[0]
    token = subscriber.acquire_started(self)
    if token is None:
        return _orig_raw_connection(self)
    started = perf_counter()
    try:
        proxy = _orig_raw_connection(self)
    except BaseException as error:  # noted for the monitor, and raised on untouched
        subscriber.acquire_failed(token, started, error)
        raise
    # The checkout is counted here, with the pool's proxy in hand, rather than in the pool's
    # checkout event: a checkout listener puts every checkout on the pool's slower path, and
    # the wait, the session and where a Core connection opened are all known here. Pool.connect()
    # called directly, past the engine, is counted neither here nor at its checkin.
    subscriber.acquire_finished(token, started, proxy, sys._getframe().f_back)
    return proxy


def _raw_connection_for_many(engine: Engine, subscribers: tuple[Subscriber, ...]) -> Any:
    watched = [(s, t) for s in subscribers if (t := s.acquire_started(engine)) is not None]
    if not watched:
        return _orig_raw_connection(engine)
    started = perf_counter()
    try:
        proxy = _orig_raw_connection(engine)
    except BaseException as error:  # noted for the monitors, and raised on untouched
        for subscriber, token in watched:
            subscriber.acquire_failed(token, started, error)
        raise
    hook = sys._getframe().f_back  # _raw_connection's
    caller = None if hook is None else hook.f_back
    for subscriber, token in watched:
        subscriber.acquire_finished(token, started, proxy, caller)
    return proxy


def _connection_for_bind(self: SessionTransaction, bind: Any, execution_options: Any) -> Any:
    subscribers = _subscribers
    # Only a root transaction asking for a bind it has no connection for acquires one; only a
    # real Engine or Connection is ours to look at (a test's Mock bind is left alone).
    if (
        not subscribers
        or self._parent is not None
        or not issubclass(type(bind), (Engine, Connection))
        or bind in self._connections
    ):
        return _orig_connection_for_bind(self, bind, execution_options)
    session = self.session
    caller = sys._getframe().f_back  # None when the wrapper is a greenlet's first frame
    if len(subscribers) == 1:
        record = subscribers[0].session_acquiring(session, bind, caller)
    else:
        record = None  # each monitor looks its own up
        for subscriber in subscribers:
            subscriber.session_acquiring(session, bind, caller)
    del caller
    token = acquiring_session.set((weakref.ref(session), record))
    del record
    try:
        connection = _orig_connection_for_bind(self, bind, execution_options)
    except BaseException as error:  # noted for the monitors, and raised on untouched
        acquiring_session.reset(token)
        # No connection came (a pool timeout, a refused connect...).
        for subscriber in subscribers:
            subscriber.session_acquire_failed(session, error)
        raise
    acquiring_session.reset(token)
    return connection


def _close_impl(self: Session, invalidate: bool, is_reset: bool = False) -> None:
    for subscriber in _subscribers:
        subscriber.session_closing(self)
    try:
        _orig_close_impl(self, invalidate, is_reset)
    finally:
        for subscriber in _subscribers:
            subscriber.session_closed(self)


def _flush(self: Session, objects: Any = None) -> None:
    _orig_flush(self, objects)
    for subscriber in _subscribers:
        subscriber.session_flushed(self)


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
    # Only an active root transaction's close() rolls back (RootTransaction._close_impl); after
    # a commit, the Session's usual path, there is nothing to tell.
    if not subscribers or not isinstance(self, RootTransaction) or not self.is_active:
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


def _handle_dbapi_exception(self: Connection, *args: Any, **kw: Any) -> Any:
    # Called inside SQLAlchemy's own except block, only when a statement (or a begin, commit or
    # rollback) failed; the original re-raises.
    for subscriber in _subscribers:
        subscriber.statement_failed(self)
    return _orig_handle_dbapi_exception(self, *args, **kw)


# The attribute of a pool's `_ConnectionRecord` that holds the checkout counted for it while it is
# out: our record, referred to by SQLAlchemy's, never the other way round. Its `watched` is the
# pool that counted it; `next_checkout` a second monitor's of the same checkout.
CHECKOUT_ATTRIBUTE = "_session_monitor_checkout"


def _record_checkin(self: Any, _fairy_was_created: bool = True) -> None:
    # SQLAlchemy checks the record in once per checkout; a second checkin it refuses (a warning)
    # finds no checkout here either, since the first took it.
    checkout = self.__dict__.pop(CHECKOUT_ATTRIBUTE, None)
    if checkout is not None:
        back_to_idle = self.dbapi_connection is not None  # none after an invalidation
        while checkout is not None:
            checkout.watched.checked_in(checkout, back_to_idle)
            checkout = checkout.next_checkout
    _orig_record_checkin(self, _fairy_was_created)


def _async_session_close(self: Any) -> Any:
    # A plain function that returns the original's coroutine: it runs where the app (or the
    # session's __aexit__) calls close(), the one place the exception on its way out is seen.
    try:
        leaving = bool(_subscribers) and exception_leaving(sys._getframe().f_back)
    except Exception:  # an unreadable frame only means that no exception is seen
        leaving = False
    if not leaving:
        return _orig_async_session_close(self)
    return _close_while_leaving(self)


# Still a coroutine function to `inspect` (3.12+), as the original is.
if hasattr(inspect, "markcoroutinefunction"):
    inspect.markcoroutinefunction(_async_session_close)


async def _close_while_leaving(self: Any) -> Any:
    # The greenlet that runs the sync close shares this context (SQLAlchemy passes it on).
    token = closing_while_leaving.set(True)
    try:
        return await _orig_async_session_close(self)
    finally:
        closing_while_leaving.reset(token)


# -- installing them ---------------------------------------------------------------------------

# Each group works only whole: (what it gives, [(class, method, wrapper, module global)]).
GROUPS: tuple[tuple[str, tuple[tuple[type, str, Callable[..., Any], str], ...]], ...] = (
    (
        "pool wait time, pending callers and timeouts",
        ((Engine, "raw_connection", _raw_connection, "_orig_raw_connection"),),
    ),
    (
        "ORM sessions",
        (
            (
                SessionTransaction,
                "_connection_for_bind",
                _connection_for_bind,
                "_orig_connection_for_bind",
            ),
            (Session, "_close_impl", _close_impl, "_orig_close_impl"),
        ),
    ),
    (
        "pool checkins",
        ((_ConnectionRecord, "checkin", _record_checkin, "_orig_record_checkin"),),
    ),
    (
        "changes flushed and never committed (the uncommitted_changes pitfall)",
        ((Session, "_flush", _flush, "_orig_flush"),),
    ),
    (
        "transactions",
        (
            (Connection, "_begin_impl", _begin_impl, "_orig_begin_impl"),
            (Connection, "_commit_impl", _commit_impl, "_orig_commit_impl"),
            (Connection, "_rollback_impl", _rollback_impl, "_orig_rollback_impl"),
            (Transaction, "close", _transaction_close, "_orig_transaction_close"),
            (
                Connection,
                "_handle_dbapi_exception",
                _handle_dbapi_exception,
                "_orig_handle_dbapi_exception",
            ),
        ),
    ),
)


def _groups() -> tuple[tuple[str, tuple[tuple[type, str, Callable[..., Any], str], ...]], ...]:
    """GROUPS, and AsyncSession's once the app has imported SQLAlchemy's asyncio extension."""
    asyncio_session = sys.modules.get("sqlalchemy.ext.asyncio.session")
    async_session = getattr(asyncio_session, "AsyncSession", None)
    if not isinstance(async_session, type):
        return GROUPS
    return (
        *GROUPS,
        (
            "an exception on its way out where an AsyncSession closes (uncommitted_changes)",
            ((async_session, "close", _async_session_close, "_orig_async_session_close"),),
        ),
    )


# The originals, as module globals: the wrappers run on every checkout and transaction.
_orig_raw_connection: Any = None
_orig_connection_for_bind: Any = None
_orig_close_impl: Any = None
_orig_flush: Any = None
_orig_begin_impl: Any = None
_orig_commit_impl: Any = None
_orig_rollback_impl: Any = None
_orig_transaction_close: Any = None
_orig_handle_dbapi_exception: Any = None
_orig_record_checkin: Any = None
_orig_async_session_close: Any = None


def wraps_checkin() -> bool:
    """Whether this SQLAlchemy has the method the checkin hook wraps, as the hook calls it;
    without it, the pool trackers listen to the pools' checkin event instead."""
    original = _ConnectionRecord.__dict__.get("checkin")
    return callable(original) and _takes_the_same_arguments(original, _record_checkin)


def _takes_the_same_arguments(original: Any, wrapper: Callable[..., Any]) -> bool:
    """Whether the wrapper accepts every call the original accepts, as the original does: the
    hot wrappers spell out the parameters (no *args, **kw to pack on every call), so a release
    that changes a signature leaves that group uninstalled rather than break a call."""
    try:
        wanted = inspect.signature(original).parameters.values()
        offered = inspect.signature(wrapper).parameters.values()
    except (TypeError, ValueError):
        return False
    kinds = {p.kind for p in offered}
    if inspect.Parameter.VAR_POSITIONAL in kinds and inspect.Parameter.VAR_KEYWORD in kinds:
        return True
    return [(p.name, p.kind, p.default is p.empty) for p in wanted] == [
        (p.name, p.kind, p.default is p.empty) for p in offered
    ]


def missing() -> list[tuple[str, str, str]]:
    """(what is lost, the method, why: "has no" or "changed the parameters of") for each
    group this SQLAlchemy cannot have."""
    found = []
    for purpose, methods in _groups():
        for cls, name, wrapper, _ in methods:
            original = cls.__dict__.get(name)
            if not callable(original):
                found.append((purpose, f"{cls.__name__}.{name}", "has no"))
            elif not _takes_the_same_arguments(original, wrapper):
                found.append((purpose, f"{cls.__name__}.{name}", "changed the parameters of"))
    return found


def _install() -> None:
    lacking = {method for _, method, _ in missing()}
    module = sys.modules[__name__]
    for _, methods in _groups():
        if any(f"{cls.__name__}.{name}" in lacking for cls, name, _, _ in methods) or any(
            (cls, name) in _originals for cls, name, _, _ in methods
        ):
            continue
        for cls, name, wrapper, slot in methods:
            # Read from the class __dict__ so a subclass never captures an inherited wrapper.
            original = cls.__dict__[name]
            _originals[(cls, name)] = original
            setattr(module, slot, original)
            setattr(cls, name, wrapper)
    _note_sessions_hooked()


def _note_sessions_hooked() -> None:
    global sessions_hooked
    sessions_hooked = (SessionTransaction, "_connection_for_bind") in _originals


def _uninstall() -> None:
    # The module globals keep the originals: a call already inside a wrapper still needs one.
    for (cls, name), original in _originals.items():
        setattr(cls, name, original)
    _originals.clear()
    _note_sessions_hooked()
