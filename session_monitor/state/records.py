"""What the monitor keeps about one session and one checked-out connection, and the frozen views
of them that observers receive.

The records are the monitor's own, mutated under its locks; nothing in them refers strongly to an
application object (a Session, a Connection, a frame): the ORM Session and the pool's connection
proxy are held through weak references only, so keeping a record never keeps the app's objects.
"""

from __future__ import annotations

import itertools
import time
import weakref
from asyncio import _get_running_loop, current_task
from threading import get_ident
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from ..hooks.stacks import Location

if TYPE_CHECKING:
    from .context import RequestScope
    from .stats import SessionStats

SessionKind = Literal["session", "connection"]

_session_ids = itertools.count(1)
_new_tuple = tuple.__new__


def next_session_id() -> int:
    return next(_session_ids)


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


class TrackedSession:
    """One unit of database work: an ORM Session, or a Core Connection the app checked out."""

    # Class-level defaults rather than __slots__, as in TrackedCheckout: set when they change.
    closed = False
    leak_reason: str | None = None
    transaction_count = 0
    # The weak reference to its ORM Session, whose callback reports it dropped unclosed.
    session_ref: weakref.ref[Any] | None = None
    session_key = 0  # id() of its ORM Session, while it is open
    shared_in: RequestScope | None = None  # the other request it was last used in
    # Flushed since its last commit or rollback: what close() without commit() throws away.
    flushed_uncommitted = False

    def __init__(
        self,
        kind: SessionKind,
        pool_name: str,
        db_system: str,
        route: str,
        method: str,
        request: RequestScope | None,
        location: Location | None,
        stack: tuple[Location, ...],
        stats: SessionStats,
    ) -> None:
        self.kind = kind
        self.opened_at = opened_at = time.perf_counter()
        # tuple.__new__ rather than SessionView(...): a NamedTuple's own __new__ is a Python
        # function, and this runs for every session.
        self.view = _new_tuple(
            SessionView,
            (
                next(_session_ids),
                kind,
                pool_name,
                db_system,
                route,
                method,
                location,
                stack,
                opened_at,
            ),
        )
        self.request = request
        self.checkouts: list[TrackedCheckout] = []
        self.stats = stats  # the counters of its (route, method)

    def holds_connection_from(self, request: RequestScope) -> bool:
        return any(checkout.request is request for checkout in self.checkouts)


class TrackedCheckout:
    """One checkout of a pooled connection, from checkout to checkin.

    `owner` is the session it belongs to; None for a raw DBAPI connection
    (`engine.raw_connection()`), which only the pool metrics count.
    """

    # Class-level defaults, no __slots__: a checkout is made on every connection's use, and
    # what only the rare paths set (a leak, an idle transaction, a collected proxy) costs
    # nothing until they do.
    age_reported = False
    returned = False
    fairy_ref: weakref.ref[Any] | None = None
    # A transaction belongs to a connection: when it began, and whether the rollback that may
    # come next is Transaction.close()'s (outcome "close") rather than the app's.
    transaction_started_at: float | None = None
    transaction_closing = False
    statement_failed = False  # in this transaction: its end is a rollback unless committed
    connection_key: int | None = None  # id() of the Connection that began it
    proxy_key: int | None = None  # id() of the pool's connection proxy
    task_ref: weakref.ref[Any] | None = None  # the holder's asyncio task, weakly
    # The idle-in-transaction sampler's notes: since when the holder was seen elsewhere.
    away_since: float | None = None
    idle_reported: float | None = None  # the start of the transaction reported idle
    blocking = False  # a sync session's, made on the event loop's thread (pitfalls.py)

    def __init__(
        self,
        pool_name: str,
        record_key: int,
        owner: TrackedSession | None,
        request: RequestScope | None,
        checked_out_at: float,
    ) -> None:
        self.pool_name = pool_name
        self.record_key = record_key
        self.owner = owner
        self.request = request
        self.checked_out_at = checked_out_at
        # The holder, for `holders.py`: all that is learnt on the hot path.
        self.thread_id = get_ident()
        loop = _get_running_loop()
        if loop is not None:
            task = current_task(loop)
            if task is not None:
                self.task_ref = weakref.ref(task)

    def view(self) -> CheckoutView:
        owner = self.owner
        return CheckoutView(
            self.pool_name, None if owner is None else owner.view, self.checked_out_at
        )

    @property
    def collected(self) -> bool:
        """Whether the connection proxy was garbage collected: read when the pool takes the
        connection back (a sync pool checks it in, an async pool detaches it)."""
        return self.fairy_ref is not None and self.fairy_ref() is None

    @property
    def held_for(self) -> float:
        return time.perf_counter() - self.checked_out_at
