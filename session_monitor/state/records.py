"""What the monitor keeps about one request, one session and one checked-out connection (each
refers to the others); the frozen views of them that observers receive are `views.py`'s.

The records are the monitor's own, mutated under its locks; nothing in them refers strongly to an
application object (a Session, a Connection, a frame): the ORM Session and the pool's connection
proxy are held through weak references only, so keeping a record never keeps the app's objects.
The other way round is allowed: while a connection is out, SQLAlchemy's connection record holds
its `TrackedCheckout` (`hooks.wrappers.CHECKOUT_ATTRIBUTE`), where the checkin and transaction
hooks find it without an index of ours.
"""

from __future__ import annotations

import itertools
import time
import weakref
from asyncio import _get_running_loop, current_task
from threading import get_ident
from typing import TYPE_CHECKING, Any

from ..hooks.stacks import Location
from .naming import UNMATCHED_ROUTE, WEBSOCKET_METHOD, method_label, route_label
from .views import CheckoutView, SessionKind, SessionView

if TYPE_CHECKING:
    from .pool_state import WatchedPool
    from .stats import SessionStats

_session_ids = itertools.count(1)
_new_tuple = tuple.__new__


def next_session_id() -> int:
    return next(_session_ids)


class RequestScope:
    """One request, as the middleware opens it: its route, its method, the sessions it opened."""

    __slots__ = (
        "_route",
        "app",
        "asgi_scope",
        "asgi_scope_id",
        "failure",
        "method",
        "responded",
        "root_path",
        "sessions",
        "started",
    )

    def __init__(self, asgi_scope: dict[str, Any]) -> None:
        # Dropped when the request ends (`finish`): copies of this context that asyncio keeps in
        # callbacks must not keep the request's objects (its dependencies, its sessions) alive.
        self.asgi_scope: dict[str, Any] | None = asgi_scope
        # The app the request entered (a mount's template is found from it), let go with the scope.
        self.app: Any = asgi_scope.get("app")
        # Which ASGI scope this is, to know it again in an exception handler; no reference.
        self.asgi_scope_id = id(asgi_scope)
        if asgi_scope.get("type") == "websocket":
            self.method = WEBSOCKET_METHOD
        else:
            self.method = method_label(asgi_scope.get("method", ""))
        self.root_path: str = asgi_scope.get("root_path", "")
        self.started = time.perf_counter()
        self._route: str | None = None
        # Appended from worker threads too: list.append is atomic, and only the middleware reads.
        self.sessions: list[TrackedSession] = []
        self.failure: str | None = None  # "answered 500", "raised KeyError": set by the middleware
        self.responded = False  # the whole response is sent

    @property
    def route(self) -> str:
        if self._route is None:
            if self.asgi_scope is None:
                return UNMATCHED_ROUTE
            matched = route_label(self.asgi_scope, self.root_path, self.app)
            if matched is None:
                # Not matched yet (a session opened by an outer middleware) or never matched.
                return UNMATCHED_ROUTE
            self._route = matched
        return self._route

    @classmethod
    def continuing(cls, failed: RequestScope) -> RequestScope:
        """A scope for the work the app's 500 handler does after `failed` ended: the same
        route and method, sessions of its own (checked when the handler returns)."""
        scope = cls.__new__(cls)
        scope.asgi_scope = None
        scope.app = None
        scope.asgi_scope_id = failed.asgi_scope_id
        scope.method = failed.method
        scope.root_path = failed.root_path
        scope.started = time.perf_counter()
        scope._route = failed.route
        scope.sessions = []
        scope.failure = failed.failure
        scope.responded = False
        return scope

    def finish(self) -> None:
        """The app returned: fix the route label and let go of the ASGI scope."""
        if self._route is None:
            self._route = self.route
        self.asgi_scope = None
        self.app = None


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
    # The SessionTracker of its owner: the one whose transaction hooks count its transactions.
    session_tracker: object = None
    task_ref: weakref.ref[Any] | None = None  # the holder's asyncio task, weakly
    # The idle-in-transaction sampler's notes: since when the holder was seen elsewhere.
    away_since: float | None = None
    idle_reported: float | None = None  # the start of the transaction reported idle
    blocking = False  # a sync session's, made on the event loop's thread (pitfalls.py)
    # Another monitor's count of the same checkout, on the same connection record.
    next_checkout: TrackedCheckout | None = None

    def __init__(
        self,
        watched: WatchedPool,
        record_key: int,
        owner: TrackedSession | None,
        request: RequestScope | None,
        checked_out_at: float,
    ) -> None:
        self.watched = watched  # the pool object it came from, which counts it back
        self.pool_name = watched.label.name
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
    def outlived_its_request(self) -> bool:
        """Whether its request is over while the connection is still out: nobody holds it."""
        request = self.request
        return request is not None and request.asgi_scope is None

    @property
    def held_for(self) -> float:
        return time.perf_counter() - self.checked_out_at
