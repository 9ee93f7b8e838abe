"""OpenTelemetry spans and metrics from the monitor's events.

::

    monitor = SessionMonitor(
        engine,
        tracer_provider=tracer_provider,    # default: the global one
        meter_provider=meter_provider,      # default: the global one
    )                                       # or opentelemetry=True to use the global providers

Every tracked session (an ORM Session, or a Core connection the app checked out itself) becomes
one span, ``db.session`` or ``db.connection``, from its open to its close, child of the span that
was current where the session first touched the database (the HTTP server span under
opentelemetry-instrumentation-fastapi). While one of its statements runs, the session's span is
the current span, so the statement spans of opentelemetry-instrumentation-sqlalchemy become its
children. A leaked session's span ends when the leak is found, with status ERROR and a
``session.leaked`` event, so it is exported even if the session is never closed.

The pool, session and transaction metrics mirror the Prometheus ones, under the OpenTelemetry
database semantic-convention names. docs/opentelemetry.md lists every span attribute, event and
metric. This module is imported only when OpenTelemetry is switched on, and sets no global state.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from sqlalchemy import event
from sqlalchemy.engine import Engine

from . import __version__
from .naming import NO_REQUEST, OTHER_METHOD, UNMATCHED_ROUTE
from .stacks import format_stack
from .stats import CREATE_BUCKETS, HOLD_BUCKETS, WAIT_BUCKETS

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import Span, TracerProvider
    from sqlalchemy.engine import Connection, ExceptionContext, ExecutionContext

    from .records import TrackedCheckout, TrackedSession

AttributeValue = str | bool | int | float
Attributes = dict[str, AttributeValue]

logger = logging.getLogger("session_monitor")

SCOPE = "session_monitor"
SESSION_SPAN = "db.session"
CONNECTION_SPAN = "db.connection"

# Semantic-convention attributes.
DB_SYSTEM_NAME = "db.system.name"
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

# SQLAlchemy dialect names whose db.system.name differs from the dialect's name.
_DB_SYSTEM_NAMES = {"mssql": "microsoft.sql_server", "oracle": "oracle.db"}


def _method(method: str) -> str:
    # The conventions spell a method outside the standard set "_OTHER".
    return "_OTHER" if method == OTHER_METHOD else method


def _request_attributes(route: str, method: str) -> Attributes:
    """http.route and http.request.method, left out where there is no request or no route."""
    if method == NO_REQUEST:
        return {}
    attributes: Attributes = {HTTP_METHOD: _method(method)}
    if route != UNMATCHED_ROUTE:
        attributes[HTTP_ROUTE] = route
    return attributes


class _SessionSpan:
    """The span of one session, and the sums it reports when it ends."""

    __slots__ = ("checkouts", "ended", "last_outcome", "lock", "span", "use_time", "wait_time")

    def __init__(self, span: Span) -> None:
        self.span = span
        # Events arrive from the session's thread, the age watcher and garbage collection:
        # the lock makes "not ended yet, so record" one step.
        self.lock = threading.Lock()
        self.ended = False
        self.checkouts = 0
        self.wait_time = 0.0
        self.use_time = 0.0
        self.last_outcome: str | None = None

    def add_event(self, name: str, attributes: Attributes) -> None:
        with self.lock:
            if not self.ended:
                self.span.add_event(name, attributes)

    def checked_out(self, wait: float) -> None:
        with self.lock:
            self.checkouts += 1
            self.wait_time += wait
            if not self.ended:
                self.span.add_event("connection.checkout", {WAIT_TIME: wait})

    def checked_in(self, use: float) -> None:
        with self.lock:
            self.use_time += use
            if not self.ended:
                self.span.add_event("connection.checkin", {USE_TIME: use})

    def transaction_ended(self, outcome: str, duration: float) -> None:
        with self.lock:
            self.last_outcome = outcome
            if not self.ended:
                self.span.add_event(
                    outcome, {TRANSACTION_OUTCOME: outcome, TRANSACTION_DURATION: duration}
                )

    def fail(self, description: str) -> None:
        with self.lock:
            if not self.ended:
                self.span.set_status(Status(StatusCode.ERROR, description))

    def end(self, session: TrackedSession, leak: Attributes | None = None) -> None:
        with self.lock:
            if self.ended:
                return
            self.ended = True
            checkouts, wait_time, use_time = self.checkouts, self.wait_time, self.use_time
            last_outcome = self.last_outcome
        # Ended is set: no other thread touches the span now, and an exporter that runs inside
        # end() (SimpleSpanProcessor) does not hold up the session's other events.
        session.span = None
        # A leaked session may still hold connections: count their use so far.
        held = sum(
            checkout.held_for for checkout in list(session.checkouts) if not checkout.returned
        )
        summary: Attributes = {
            TRANSACTION_COUNT: session.transaction_count,
            CHECKOUTS: checkouts,
            WAIT_TIME: wait_time,
            USE_TIME: use_time + held,
        }
        if last_outcome is not None:
            summary[TRANSACTION_LAST_OUTCOME] = last_outcome
        span = self.span
        if leak is not None:
            reason = str(leak[LEAK_REASON])
            summary[LEAKED] = True
            summary[LEAK_REASON] = reason
            span.add_event("session.leaked", leak)
            span.set_status(Status(StatusCode.ERROR, f"session leaked ({reason})"))
        span.set_attributes(summary)
        span.end()


class OpenTelemetryObserver:
    """Turn the monitor's events into spans and metrics. Built by SessionMonitor, not by hand."""

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        # None falls back to the global providers, resolved by the API when first used.
        self._tracer = trace.get_tracer(SCOPE, __version__, tracer_provider)
        meter = metrics.get_meter(SCOPE, __version__, meter_provider)
        self._create_instruments(meter)
        self._session_attributes: dict[tuple[str, str], Attributes] = {}
        self._outcome_attributes: dict[tuple[str, str, str], Attributes] = {}
        self._pool_attributes: dict[str, Attributes] = {}
        self._state_attributes: dict[str, tuple[Attributes, Attributes]] = {}
        # Last published sizes per pool: the conventions make these UpDownCounters, so a size
        # is published as its change. pool_usage and pool_capacity are called under the pool's
        # lock, so the changes of one pool arrive in order.
        self._usage: dict[str, tuple[int, int]] = {}
        self._capacity: dict[str, int] = {}
        # Where a connection's pool entry keeps (a weak reference to) its current checkout, and
        # where an execution keeps the token of the context attached for its statement.
        self._info_key = object()
        self._token_attribute = f"_session_monitor_otel_{id(self):x}"
        self._logged: set[str] = set()
        self._listening = False
        self._listen()

    def _create_instruments(self, meter: metrics.Meter) -> None:
        self.connection_count = meter.create_up_down_counter(
            "db.client.connection.count",
            "{connection}",
            "Pooled connections by state (idle: open in the pool, used: checked out).",
        )
        self.connection_max = meter.create_up_down_counter(
            "db.client.connection.max",
            "{connection}",
            "Most connections the pool allows (pool_size + max_overflow).",
        )
        self.pending_requests = meter.create_up_down_counter(
            "db.client.connection.pending_requests",
            "{request}",
            "Callers waiting for a connection from the pool right now.",
        )
        self.timeouts = meter.create_counter(
            "db.client.connection.timeouts",
            "{timeout}",
            "Checkouts that gave up waiting for a connection (pool TimeoutError).",
        )
        self.wait_time = meter.create_histogram(
            "db.client.connection.wait_time",
            "s",
            "Time to obtain a connection from the pool, new connections included.",
            explicit_bucket_boundaries_advisory=WAIT_BUCKETS,
        )
        self.use_time = meter.create_histogram(
            "db.client.connection.use_time",
            "s",
            "Time from checkout to checkin of a pooled connection.",
            explicit_bucket_boundaries_advisory=HOLD_BUCKETS,
        )
        self.create_time = meter.create_histogram(
            "db.client.connection.create_time",
            "s",
            "Time to open a new DBAPI connection.",
            explicit_bucket_boundaries_advisory=CREATE_BUCKETS,
        )
        self.invalidations = meter.create_counter(
            "session_monitor.connection.invalidations",
            "{connection}",
            "Pooled connections invalidated (soft: recycled at next checkout).",
        )
        self.sessions_opened = meter.create_counter(
            "db.client.session.opened",
            "{session}",
            "Sessions that started using the database (ORM sessions and Core connections).",
        )
        self.sessions_closed = meter.create_counter(
            "db.client.session.closed",
            "{session}",
            "Sessions closed, by close() or reclaimed by the garbage collector.",
        )
        self.sessions_active = meter.create_up_down_counter(
            "db.client.session.active", "{session}", "Sessions open now."
        )
        self.session_duration = meter.create_histogram(
            "db.client.session.duration",
            "s",
            "Time from a session's open to its close.",
            explicit_bucket_boundaries_advisory=HOLD_BUCKETS,
        )
        self.sessions_leaked = meter.create_counter(
            "db.client.session.leaked",
            "{session}",
            "Leaked sessions, each counted once, by how the leak was found.",
        )
        self.transactions = meter.create_counter(
            "db.client.transaction.count",
            "{transaction}",
            "Transactions ended, by outcome: commit, rollback, or close (ended by close()).",
        )
        self.transaction_duration = meter.create_histogram(
            "db.client.transaction.duration",
            "s",
            "Time from a transaction's begin to its end.",
            explicit_bucket_boundaries_advisory=HOLD_BUCKETS,
        )
        self.internal_errors = meter.create_counter(
            "session_monitor.internal_errors",
            "{error}",
            "Failures inside session_monitor's listeners, swallowed so the app never sees them.",
        )

    # -- attribute sets, built once per key like the Prometheus children ----------------------

    def _pool(self, pool_name: str) -> Attributes:
        attributes = self._pool_attributes.get(pool_name)
        if attributes is None:
            attributes = self._pool_attributes[pool_name] = {POOL_NAME: pool_name}
        return attributes

    def _session(self, session: TrackedSession) -> Attributes:
        key = (session.route, session.method)
        attributes = self._session_attributes.get(key)
        if attributes is None:
            attributes = self._session_attributes[key] = _request_attributes(*key)
        return attributes

    def _with(self, session: TrackedSession, name: str, value: str) -> Attributes:
        key = (session.route, session.method, value)
        attributes = self._outcome_attributes.get(key)
        if attributes is None:
            attributes = {**self._session(session), name: value}
            self._outcome_attributes[key] = attributes
        return attributes

    # -- sessions ------------------------------------------------------------------------------

    def session_opened(self, session: TrackedSession) -> None:
        attributes = self._session(session)
        self.sessions_opened.add(1, attributes)
        self.sessions_active.add(1, attributes)
        span_attributes: Attributes = {
            DB_SYSTEM_NAME: _DB_SYSTEM_NAMES.get(session.db_system, session.db_system),
            POOL_NAME: session.pool_name,
            LEAKED: False,
            **attributes,
        }
        if session.location is not None:
            filename, line, function = session.location
            span_attributes[CODE_FILE_PATH] = filename
            span_attributes[CODE_LINE_NUMBER] = line
            span_attributes[CODE_FUNCTION_NAME] = function
        # The current context here is the code that first used the session: the request's.
        span = self._tracer.start_span(
            SESSION_SPAN if session.kind == "session" else CONNECTION_SPAN,
            kind=SpanKind.INTERNAL,
            attributes=span_attributes,
        )
        if span.is_recording():
            session.span = _SessionSpan(span)

    def session_closed(self, session: TrackedSession, duration: float) -> None:
        attributes = self._session(session)
        self.sessions_closed.add(1, attributes)
        self.sessions_active.add(-1, attributes)
        self.session_duration.record(duration, attributes)
        state: _SessionSpan | None = session.span
        if state is not None:
            state.end(session)

    def session_leaked(self, session: TrackedSession, reason: str) -> None:
        self.sessions_leaked.add(1, self._with(session, LEAK_REASON, reason))
        state: _SessionSpan | None = session.span
        if state is None:
            return
        leak: Attributes = {LEAK_REASON: reason, SESSION_AGE: session.age}
        if session.location is not None:
            filename, line, function = session.location
            leak[CODE_FILE_PATH] = filename
            leak[CODE_LINE_NUMBER] = line
            leak[CODE_FUNCTION_NAME] = function
        if session.stack:
            leak[CODE_STACKTRACE] = format_stack(session.stack)
        # Ended now, not at close: a leaked session may never be closed, and a span that never
        # ends is never exported.
        state.end(session, leak)

    def transaction_ended(self, session: TrackedSession, outcome: str, duration: float) -> None:
        attributes = self._with(session, TRANSACTION_OUTCOME, outcome)
        self.transactions.add(1, attributes)
        self.transaction_duration.record(duration, attributes)
        state: _SessionSpan | None = session.span
        if state is not None:
            state.transaction_ended(outcome, duration)

    # -- connections ---------------------------------------------------------------------------

    def connection_created(self, pool_name: str, seconds: float) -> None:
        self.create_time.record(seconds, self._pool(pool_name))

    def connection_checked_out(self, checkout: TrackedCheckout, wait: float) -> None:
        self.wait_time.record(wait, self._pool(checkout.pool_name))
        state: _SessionSpan | None = None if checkout.owner is None else checkout.owner.span
        if state is not None:
            state.checked_out(wait)
        fairy = checkout.fairy_ref() if checkout.fairy_ref is not None else None
        if fairy is None:
            return
        # The pool entry's info is the Connection's info: the statement listeners find the
        # session here. Weak, so a returned checkout is not kept alive by its connection.
        if state is not None:
            fairy.info[self._info_key] = weakref.ref(checkout)
        else:
            fairy.info.pop(self._info_key, None)

    def connection_checked_in(self, checkout: TrackedCheckout, use: float) -> None:
        self.use_time.record(use, self._pool(checkout.pool_name))
        state: _SessionSpan | None = None if checkout.owner is None else checkout.owner.span
        if state is not None:
            state.checked_in(use)

    def connection_invalidated(
        self, pool_name: str, soft: bool, checkout: TrackedCheckout | None
    ) -> None:
        self.invalidations.add(1, {POOL_NAME: pool_name, SOFT: soft})
        state: _SessionSpan | None = (
            None if checkout is None or checkout.owner is None else checkout.owner.span
        )
        if state is not None:
            state.add_event("connection.invalidated", {SOFT: soft})

    def checkout_timed_out(
        self, pool_name: str, waited: float, session: TrackedSession | None
    ) -> None:
        self.timeouts.add(1, self._pool(pool_name))
        attributes: Attributes = {POOL_NAME: pool_name, WAIT_TIME: waited}
        state: _SessionSpan | None = None if session is None else session.span
        if state is not None:
            state.add_event("pool.timeout", attributes)
            state.fail(f"connection pool timeout after {waited:.3f}s")
            return
        # A Core connect() that timed out never became a session: tell the caller's span.
        # This runs synchronously in the thread that waited, so the current span is the caller's.
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event("pool.timeout", attributes)

    # -- pools ---------------------------------------------------------------------------------

    def pool_usage(self, pool_name: str, idle: int, used: int) -> None:
        last_idle, last_used = self._usage.get(pool_name, (0, 0))
        self._usage[pool_name] = (idle, used)
        states = self._state_attributes.get(pool_name)
        if states is None:
            pool = self._pool(pool_name)
            states = self._state_attributes[pool_name] = (
                {**pool, CONNECTION_STATE: "idle"},
                {**pool, CONNECTION_STATE: "used"},
            )
        if idle != last_idle:
            self.connection_count.add(idle - last_idle, states[0])
        if used != last_used:
            self.connection_count.add(used - last_used, states[1])

    def pool_pending(self, pool_name: str, delta: int) -> None:
        self.pending_requests.add(delta, self._pool(pool_name))

    def pool_capacity(self, pool_name: str, maximum: int) -> None:
        last = self._capacity.get(pool_name, 0)
        self._capacity[pool_name] = maximum
        if maximum != last:
            self.connection_max.add(maximum - last, self._pool(pool_name))

    def internal_error(self, listener: str) -> None:
        self.internal_errors.add(1, {LISTENER: listener})

    # -- the session's span is current while its statements run --------------------------------

    def _listen(self) -> None:
        # On the Engine class, like SessionMonitor() with no engine: every engine, including
        # ones created later. The statement listeners of other instrumentations are registered
        # on engine instances, so these run before theirs and their spans get the session's
        # span as parent. Detaching runs first (insert=True) so monitors unwind in reverse.
        event.listen(Engine, "before_cursor_execute", self._before_cursor_execute_evt)
        event.listen(Engine, "after_cursor_execute", self._after_cursor_execute_evt, insert=True)
        event.listen(Engine, "handle_error", self._handle_error_evt, insert=True)
        self._listening = True

    def close(self) -> None:
        if not self._listening:
            return
        self._listening = False
        event.remove(Engine, "before_cursor_execute", self._before_cursor_execute_evt)
        event.remove(Engine, "after_cursor_execute", self._after_cursor_execute_evt)
        event.remove(Engine, "handle_error", self._handle_error_evt)

    def _before_cursor_execute_evt(
        self,
        conn: Connection,
        cursor: object,
        statement: str,
        parameters: object,
        context: ExecutionContext | None,
        executemany: bool,
    ) -> None:
        try:
            if context is None or conn.invalidated:
                return
            ref: weakref.ref[TrackedCheckout] | None = conn.info.get(self._info_key)
            checkout = None if ref is None else ref()
            if checkout is None or checkout.returned:
                return
            state: _SessionSpan | None = None if checkout.owner is None else checkout.owner.span
            if state is None or state.ended or hasattr(context, self._token_attribute):
                return
            token = otel_context.attach(trace.set_span_in_context(state.span))
            setattr(context, self._token_attribute, token)
        except Exception:
            self._failed("otel_before_cursor_execute")

    def _after_cursor_execute_evt(
        self,
        conn: Connection,
        cursor: object,
        statement: str,
        parameters: object,
        context: ExecutionContext | None,
        executemany: bool,
    ) -> None:
        self._detach(context)

    def _handle_error_evt(self, exception_context: ExceptionContext) -> None:
        self._detach(exception_context.execution_context)

    def _detach(self, context: ExecutionContext | None) -> None:
        if context is None:
            return
        try:
            token = vars(context).pop(self._token_attribute, None)
            if token is not None:
                otel_context.detach(token)
        except Exception:
            self._failed("otel_after_cursor_execute")

    def _failed(self, listener: str) -> None:
        # These listeners are outside the monitor's guard: count and log the way it does.
        self.internal_error(listener)
        if listener not in self._logged:
            self._logged.add(listener)
            logger.exception(
                "session_monitor listener %r failed; the application was not affected. "
                "Further failures are only counted in session_monitor.internal_errors.",
                listener,
            )
