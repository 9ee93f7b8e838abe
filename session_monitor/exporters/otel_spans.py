"""The OpenTelemetry span of one session: its attribute names, and what it records until it ends.

`tracing.py` decides when a span starts and ends; this module is what a span carries.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from opentelemetry.trace import Status, StatusCode

from ..state.naming import NO_REQUEST, OTHER_METHOD, UNMATCHED_ROUTE, WEBSOCKET_METHOD

if TYPE_CHECKING:
    from opentelemetry.trace import Span
    from sqlalchemy.engine import URL

    from ..state.views import CheckoutView

AttributeValue = str | bool | int | float
Attributes = dict[str, AttributeValue]

SCOPE = "session_monitor"
SESSION_SPAN = "db.session"
CONNECTION_SPAN = "db.connection"

# Semantic-convention attributes.
DB_SYSTEM_NAME = "db.system.name"
DB_NAMESPACE = "db.namespace"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
ERROR_TYPE = "error.type"
POOL_NAME = "db.client.connection.pool.name"
CONNECTION_STATE = "db.client.connection.state"
HTTP_ROUTE = "http.route"
HTTP_METHOD = "http.request.method"
CODE_FILE_PATH = "code.file.path"
CODE_LINE_NUMBER = "code.line.number"
CODE_FUNCTION_NAME = "code.function.name"
CODE_STACKTRACE = "code.stacktrace"

# Ours.
LEAKED = "session_monitor.leaked"
LEAK_REASON = "session_monitor.leak.reason"
SESSION_AGE = "session_monitor.session.age"
TRANSACTION_COUNT = "session_monitor.transaction.count"
TRANSACTION_OUTCOME = "session_monitor.transaction.outcome"
TRANSACTION_LAST_OUTCOME = "session_monitor.transaction.last_outcome"
TRANSACTION_DURATION = "session_monitor.transaction.duration"
CHECKOUTS = "session_monitor.connection.checkouts"
WAIT_TIME = "session_monitor.connection.wait_time"
USE_TIME = "session_monitor.connection.use_time"
SOFT = "session_monitor.connection.soft"
LISTENER = "session_monitor.listener"
HOLDERS = "session_monitor.pool.holders"
IDLE_FOR = "session_monitor.session.idle_for"
INVALIDATION_REASON = "session_monitor.connection.invalidation_reason"
CLOSE_REASON = "session_monitor.connection.close_reason"
SERVER_VIEW_FAILURE = "session_monitor.server_view.failure"
SERVER_VIEW_SPAN = "session_monitor.server_view"
# Server-side facts under the names of the OpenTelemetry Collector's PostgreSQL receiver.
PG_PID = "postgresql.pid"
PG_STATE = "postgresql.state"
PG_WAIT_EVENT_TYPE = "postgresql.wait_event_type"
PG_WAIT_EVENT = "postgresql.wait_event"
PG_BLOCKING_PIDS = "postgresql.blocking.pids"
PG_QUERY_SHAPE = "db.query.text"  # sanitized: the first line, every literal a "?"
PITFALL_KIND = "session_monitor.pitfall.kind"

# SQLAlchemy dialect names whose db.system.name differs from the dialect's name.
DB_SYSTEM_NAMES = {"mssql": "microsoft.sql_server", "oracle": "oracle.db"}

# error.type of a session span whose status is ERROR: the canonical name of the exception
# SQLAlchemy raised (as FastAPI's telemetry writes it on the server span when it propagates),
# or, for a leak, which raises nothing, a value of our own.
POOL_TIMEOUT_ERROR = "sqlalchemy.exc.TimeoutError"
LEAK_ERROR = "session_leaked"

_SQLITE_MEMORY = ("", ":memory:")


def connection_attributes(url: URL) -> Attributes:
    """db.namespace, server.address and server.port of an engine's URL; never its user name,
    password or query."""
    attributes: Attributes = {}
    # A SQLite URI's parameters can end up in the database part (as in pool_name_for).
    database = (url.database or "").split("?", 1)[0]
    if url.get_backend_name() == "sqlite":
        if database not in _SQLITE_MEMORY and not database.startswith("file::memory:"):
            attributes[DB_NAMESPACE] = database
        return attributes  # no server
    if database:
        # PostgreSQL's convention is "{database}|{schema}"; the schema is the search_path's,
        # known only by asking the server, so the database alone, as the convention allows.
        attributes[DB_NAMESPACE] = database
    if url.host:
        attributes[SERVER_ADDRESS] = url.host
        if url.port:
            attributes[SERVER_PORT] = url.port
    return attributes


def _method(method: str) -> str:
    # The conventions spell a method outside the standard set "_OTHER".
    return "_OTHER" if method == OTHER_METHOD else method


def request_attributes(route: str, method: str) -> Attributes:
    """http.route and http.request.method, left out where there is no request or no route.
    A WebSocket has no HTTP method: FastAPI's telemetry sets none on its span either."""
    if method == NO_REQUEST:
        return {}
    attributes: Attributes = {} if method == WEBSOCKET_METHOD else {HTTP_METHOD: _method(method)}
    if route != UNMATCHED_ROUTE:
        attributes[HTTP_ROUTE] = route
    return attributes


class SessionSpan:
    """The span of one session, and the sums it reports when it ends."""

    __slots__ = (
        "checkouts",
        "ended",
        "held_since",
        "last_outcome",
        "lock",
        "span",
        "transactions",
        "use_time",
        "wait_time",
    )

    def __init__(self, span: Span) -> None:
        self.span = span
        # Events arrive from the session's thread, the age watcher and garbage collection:
        # the lock makes "not ended yet, so record" one step.
        self.lock = threading.Lock()
        self.ended = False
        self.checkouts = 0
        self.transactions = 0
        self.wait_time = 0.0
        self.use_time = 0.0
        self.held_since: list[float] = []  # checkouts not returned yet
        self.last_outcome: str | None = None

    def add_event(self, name: str, attributes: Attributes) -> None:
        with self.lock:
            if not self.ended:
                self.span.add_event(name, attributes)

    def checked_out(self, checkout: CheckoutView, wait: float) -> None:
        with self.lock:
            self.checkouts += 1
            self.wait_time += wait
            self.held_since.append(checkout.checked_out_at)
            if not self.ended:
                self.span.add_event("connection.checkout", {WAIT_TIME: wait})

    def checked_in(self, checkout: CheckoutView, use: float) -> None:
        with self.lock:
            self.use_time += use
            if checkout.checked_out_at in self.held_since:
                self.held_since.remove(checkout.checked_out_at)
            if not self.ended:
                self.span.add_event("connection.checkin", {USE_TIME: use})

    def transaction_ended(self, outcome: str, duration: float) -> None:
        with self.lock:
            self.transactions += 1
            self.last_outcome = outcome
            if not self.ended:
                self.span.add_event(
                    outcome, {TRANSACTION_OUTCOME: outcome, TRANSACTION_DURATION: duration}
                )

    def fail(self, error_type: str, description: str) -> None:
        with self.lock:
            if not self.ended:
                self.span.set_attribute(ERROR_TYPE, error_type)
                self.span.set_status(Status(StatusCode.ERROR, description))

    def end(self, leak: Attributes | None = None) -> None:
        with self.lock:
            if self.ended:
                return
            self.ended = True
            now = time.perf_counter()
            # A leaked session may still hold connections: count their use so far.
            held = sum(now - since for since in self.held_since)
            summary: Attributes = {
                TRANSACTION_COUNT: self.transactions,
                CHECKOUTS: self.checkouts,
                WAIT_TIME: self.wait_time,
                USE_TIME: self.use_time + held,
            }
            if self.last_outcome is not None:
                summary[TRANSACTION_LAST_OUTCOME] = self.last_outcome
        # Ended is set: no other thread touches the span now, and an exporter that runs inside
        # end() (SimpleSpanProcessor) does not hold up the session's other events.
        span = self.span
        if leak is not None:
            reason = str(leak[LEAK_REASON])
            summary[LEAKED] = True
            summary[LEAK_REASON] = reason
            summary[ERROR_TYPE] = LEAK_ERROR
            span.add_event("session.leaked", leak)
            span.set_status(Status(StatusCode.ERROR, f"session leaked ({reason})"))
        span.set_attributes(summary)
        span.end()
