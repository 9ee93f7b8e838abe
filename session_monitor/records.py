"""What the monitor knows about one session and one checked-out connection."""

from __future__ import annotations

import time
import weakref
from typing import TYPE_CHECKING, Any, Literal

from .stacks import Location

if TYPE_CHECKING:
    from .context import RequestScope
    from .stats import SessionStats

SessionKind = Literal["session", "connection"]


class TrackedSession:
    """One unit of database work: an ORM Session, or a Core Connection the app checked out itself.

    A Session is opened when it first asks for a connection and closed by close() (or a context
    manager, or the garbage collector). A Core Connection is opened at checkout, closed at checkin.
    """

    __slots__ = (
        "checkouts",
        "closed",
        "db_system",
        "kind",
        "leak_reason",
        "location",
        "method",
        "opened_at",
        "pool_name",
        "request",
        "route",
        "session_ref",
        "span",
        "stack",
        "stats",
        "transaction_count",
    )

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
        self.kind: SessionKind = kind
        self.pool_name = pool_name
        self.db_system = db_system  # the dialect name: postgresql, sqlite, mysql, ...
        self.route = route
        self.method = method
        self.request = request
        self.location = location
        self.stack = stack
        self.opened_at = time.perf_counter()
        self.closed = False
        self.leak_reason: str | None = None
        self.checkouts: list[TrackedCheckout] = []
        self.transaction_count = 0
        # Free for an observer that needs per-session state (the OpenTelemetry span).
        self.span: Any = None
        self.stats = stats  # the counters of its (route, method)
        # The weak reference to its ORM Session, whose callback reports it dropped unclosed.
        self.session_ref: weakref.ref[Any] | None = None

    def holds_connection_from(self, request: RequestScope) -> bool:
        return any(checkout.request is request for checkout in self.checkouts)

    @property
    def age(self) -> float:
        return time.perf_counter() - self.opened_at


class TrackedCheckout:
    """One checkout of a pooled connection, from checkout to checkin.

    `owner` is the session it belongs to; None for a raw DBAPI connection
    (`engine.raw_connection()`), which only the pool metrics count.
    """

    __slots__ = (
        "__weakref__",
        "age_reported",
        "checked_out_at",
        "connection_key",
        "fairy_ref",
        "owner",
        "pool_name",
        "proxy_key",
        "record_key",
        "request",
        "returned",
        "transaction_closing",
        "transaction_started_at",
    )

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
        self.age_reported = False
        self.returned = False
        self.fairy_ref: weakref.ref[Any] | None = None
        # A transaction belongs to a connection: when it began, and whether the rollback that
        # may come next is Transaction.close()'s (outcome "close") rather than the app's.
        self.transaction_started_at: float | None = None
        self.transaction_closing = False
        self.connection_key: int | None = None  # id() of the Connection that began it
        self.proxy_key: int | None = None  # id() of the pool's connection proxy

    @property
    def collected(self) -> bool:
        """Whether the connection proxy was garbage collected: read when the pool takes the
        connection back (a sync pool checks it in, an async pool detaches it)."""
        return self.fairy_ref is not None and self.fairy_ref() is None

    @property
    def held_for(self) -> float:
        return time.perf_counter() - self.checked_out_at
