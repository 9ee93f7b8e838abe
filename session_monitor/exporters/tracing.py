"""OpenTelemetry spans and metrics from the monitor's events.

::

    monitor = SessionMonitor(
        engine,
        tracer_provider=tracer_provider,    # default: the global one
        meter_provider=meter_provider,      # default: the global one
    )                                       # or opentelemetry=True to use the global providers

Every tracked session (an ORM Session, or a Core connection the app checked out itself) becomes
one span, ``db.session`` or ``db.connection``, from its open to its close, child of the span that
was current where the session first touched the database: in a request, FastAPI's own server
span (FastAPI 0.142 and later, ``FastAPI(telemetry=...)``) or one of its operation spans
(``fastapi.endpoint``, ``fastapi.dependencies``); on an older FastAPI, the server span of
opentelemetry-instrumentation-fastapi. While one of its statements runs, the session's span is
the current span, so the statement spans of opentelemetry-instrumentation-sqlalchemy become its
children. A leaked session's span ends when the leak is found, with status ERROR and a
``session.leaked`` event, so it is exported even if the session is never closed.

The pool, session and transaction metrics mirror the Prometheus ones, under the OpenTelemetry
database semantic-convention names. docs/opentelemetry.md lists every span attribute, event and
metric. This module is imported only when OpenTelemetry is switched on, and sets no global state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind
from sqlalchemy.engine import Engine

from ..hooks.forking import Stage, in_child
from ..hooks.stacks import format_stack
from ..state.naming import pool_name_for
from ..version import __version__
from .otel_instruments import Instruments
from .otel_spans import (
    CLOSE_REASON,
    CODE_FILE_PATH,
    CODE_FUNCTION_NAME,
    CODE_LINE_NUMBER,
    CODE_STACKTRACE,
    CONNECTION_SPAN,
    CONNECTION_STATE,
    DB_SYSTEM_NAME,
    DB_SYSTEM_NAMES,
    HOLDERS,
    IDLE_FOR,
    INVALIDATION_REASON,
    LEAK_REASON,
    LEAKED,
    LISTENER,
    PG_BLOCKING_PIDS,
    PG_PID,
    PG_QUERY_SHAPE,
    PG_STATE,
    PG_WAIT_EVENT,
    PG_WAIT_EVENT_TYPE,
    PITFALL_KIND,
    POOL_NAME,
    POOL_TIMEOUT_ERROR,
    SCOPE,
    SERVER_VIEW_FAILURE,
    SERVER_VIEW_SPAN,
    SESSION_AGE,
    SESSION_SPAN,
    SOFT,
    TRANSACTION_OUTCOME,
    WAIT_TIME,
    Attributes,
    SessionSpan,
    connection_attributes,
    request_attributes,
)
from .otel_statements import StatementContext

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider
    from sqlalchemy.engine import Connection

    from ..hooks.stacks import Location
    from ..state.views import CheckoutView, HolderView, SessionView

class OpenTelemetryObserver:
    """Turn the monitor's events into spans and metrics. Built by SessionMonitor, not by hand."""

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        # None falls back to the global providers, resolved by the API when first used.
        self._tracer = trace.get_tracer(SCOPE, __version__, tracer_provider)
        self.instruments = Instruments(metrics.get_meter(SCOPE, __version__, meter_provider))
        self._session_attributes: dict[tuple[str, str], Attributes] = {}
        self._outcome_attributes: dict[tuple[str, str, str], Attributes] = {}
        self._pool_attributes: dict[str, Attributes] = {}
        self._state_attributes: dict[str, tuple[Attributes, Attributes]] = {}
        # db.namespace, server.address and server.port of each pool's engines, by the pool's
        # name as named from the URL; see `_connection`.
        self._connection_attributes: dict[str, Attributes] = {}
        # Last published sizes per pool: the conventions make these UpDownCounters, so a size
        # is published as its change. pool_usage and pool_capacity are called under the pool's
        # lock, so the changes of one pool arrive in order.
        self._usage: dict[str, tuple[int, int]] = {}
        self._capacity: dict[str, int] = {}
        # The span of each open session, by SessionView.id.
        self._spans: dict[int, SessionSpan] = {}
        # While a statement of a session runs, the session's span is current.
        self.statements = StatementContext(self._spans)
        in_child(Stage.FORGET, self.forked)

    def forked(self) -> None:
        """In a forked child: the spans open at the fork are the parent's sessions', which the
        parent ends and exports; the child never touches them (nor their locks, which a thread
        of the parent may have held). The pool sizes are published again by the pool tracker."""
        self._spans.clear()

    def bind(
        self,
        session_for: Callable[[Connection], SessionView | None],
        failed: Callable[[str], None],
    ) -> None:
        """Given by the monitor: which session a Connection is in, and its guard."""
        self.statements.session_for = session_for
        self.statements.failed = failed

    # -- attribute sets, built once per key like the Prometheus children ----------------------

    def _pool(self, pool_name: str) -> Attributes:
        attributes = self._pool_attributes.get(pool_name)
        if attributes is None:
            attributes = self._pool_attributes[pool_name] = {POOL_NAME: pool_name}
        return attributes

    def _session(self, session: SessionView) -> Attributes:
        key = (session.route, session.method)
        attributes = self._session_attributes.get(key)
        if attributes is None:
            attributes = self._session_attributes[key] = request_attributes(*key)
        return attributes

    def _with(self, session: SessionView, name: str, value: str) -> Attributes:
        key = (session.route, session.method, value)
        attributes = self._outcome_attributes.get(key)
        if attributes is None:
            attributes = {**self._session(session), name: value}
            self._outcome_attributes[key] = attributes
        return attributes

    def _connection(self, pool_name: str) -> Attributes:
        attributes = self._connection_attributes.get(pool_name)
        if attributes is not None:
            return attributes
        # A pool_name= given to SessionMonitor names the pool of its one engine, so a name that
        # no URL gave is that engine's.
        if len(self._connection_attributes) == 1:
            return next(iter(self._connection_attributes.values()))
        return {}

    def _span_of(self, session: SessionView | None) -> SessionSpan | None:
        return None if session is None else self._spans.get(session.id)

    # -- sessions ------------------------------------------------------------------------------

    def session_opened(self, session: SessionView) -> None:
        attributes = self._session(session)
        self.instruments.sessions_opened.add(1, attributes)
        self.instruments.sessions_active.add(1, attributes)
        span_attributes: Attributes = {
            DB_SYSTEM_NAME: DB_SYSTEM_NAMES.get(session.db_system, session.db_system),
            **self._connection(session.pool_name),
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
            self._spans[session.id] = SessionSpan(span)

    def session_closed(self, session: SessionView, duration: float) -> None:
        attributes = self._session(session)
        self.instruments.sessions_closed.add(1, attributes)
        self.instruments.sessions_active.add(-1, attributes)
        self.instruments.session_duration.record(duration, attributes)
        state = self._spans.pop(session.id, None)
        if state is not None:
            state.end()

    def session_leaked(self, session: SessionView, reason: str) -> None:
        self.instruments.sessions_leaked.add(1, self._with(session, LEAK_REASON, reason))
        state = self._span_of(session)
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
        state.end(leak)

    def transaction_ended(self, session: SessionView, outcome: str, duration: float) -> None:
        attributes = self._with(session, TRANSACTION_OUTCOME, outcome)
        self.instruments.transactions.add(1, attributes)
        self.instruments.transaction_duration.record(duration, attributes)
        state = self._span_of(session)
        if state is not None:
            state.transaction_ended(outcome, duration)

    # -- connections ---------------------------------------------------------------------------

    def connection_created(self, pool_name: str, seconds: float) -> None:
        self.instruments.create_time.record(seconds, self._pool(pool_name))

    def connection_checked_out(self, checkout: CheckoutView, wait: float) -> None:
        self.instruments.wait_time.record(wait, self._pool(checkout.pool_name))
        state = self._span_of(checkout.session)
        if state is not None:
            state.checked_out(checkout, wait)

    def connection_checked_in(self, checkout: CheckoutView, use: float) -> None:
        self.instruments.use_time.record(use, self._pool(checkout.pool_name))
        state = self._span_of(checkout.session)
        if state is not None:
            state.checked_in(checkout, use)

    def connection_invalidated(
        self, pool_name: str, soft: bool, checkout: CheckoutView | None, reason: str
    ) -> None:
        attributes = {POOL_NAME: pool_name, SOFT: soft, INVALIDATION_REASON: reason}
        self.instruments.invalidations.add(1, attributes)
        state = None if checkout is None else self._span_of(checkout.session)
        if state is not None:
            state.add_event("connection.invalidated", {SOFT: soft, INVALIDATION_REASON: reason})

    def connection_closed(self, pool_name: str, reason: str) -> None:
        self.instruments.closed_connections.add(1, {**self._pool(pool_name), CLOSE_REASON: reason})

    def server_limits(self, pool_name: str, allowed: int) -> None:
        pass  # a Prometheus gauge only: the alert compares it with the workers' pools summed

    def server_view_read(self, pool_name: str, holders: tuple[HolderView, ...]) -> None:
        """One span per read made for a pool timeout, an event per holder: what the server
        said of its connection beside the route and the line that opened it."""
        span = self._tracer.start_span(SERVER_VIEW_SPAN, attributes=self._pool(pool_name))
        try:
            for holder in holders:
                attributes: dict[str, Any] = dict(request_attributes(holder.route, holder.method))
                if holder.opened_at is not None:
                    attributes[CODE_FILE_PATH] = holder.opened_at[0]
                    attributes[CODE_LINE_NUMBER] = holder.opened_at[1]
                    attributes[CODE_FUNCTION_NAME] = holder.opened_at[2]
                if holder.backend_pid is not None:
                    attributes[PG_PID] = holder.backend_pid
                side = holder.server
                backend = None if side is None else side.backend
                if side is not None and backend is not None:
                    if backend.state is not None:
                        attributes[PG_STATE] = backend.state
                    if backend.wait_event_type is not None:
                        attributes[PG_WAIT_EVENT_TYPE] = backend.wait_event_type
                    if backend.wait_event is not None:
                        attributes[PG_WAIT_EVENT] = backend.wait_event
                    if backend.blocked_by:
                        attributes[PG_BLOCKING_PIDS] = list(backend.blocked_by)
                    if backend.query is not None:
                        attributes[PG_QUERY_SHAPE] = backend.query
                span.add_event("holder", attributes)
        finally:
            span.end()

    def server_view_failed(self, pool_name: str, reason: str) -> None:
        self.instruments.server_view_failures.add(
            1, {**self._pool(pool_name), SERVER_VIEW_FAILURE: reason}
        )

    def checkout_waited(self, pool_name: str) -> None:
        self.instruments.waited_checkouts.add(1, self._pool(pool_name))

    def wait_cancelled(self, pool_name: str, waited: float) -> None:
        self.instruments.cancelled_waits.add(1, self._pool(pool_name))

    def session_pitfall(self, session: SessionView, kind: str, location: Location | None) -> None:
        self.instruments.pitfalls.add(1, self._with(session, PITFALL_KIND, kind))
        state = self._span_of(session)
        if state is not None:
            attributes: Attributes = {PITFALL_KIND: kind}
            if location is not None:
                attributes.update(
                    {
                        CODE_FILE_PATH: location[0],
                        CODE_LINE_NUMBER: location[1],
                        CODE_FUNCTION_NAME: location[2],
                    }
                )
            state.add_event("session.pitfall", attributes)

    def session_idle_in_transaction(self, session: SessionView, away: float) -> None:
        self.instruments.idle_in_transaction.add(1, self._session(session))
        state = self._span_of(session)
        if state is not None:
            state.add_event("session.idle_in_transaction", {IDLE_FOR: away})

    def checkout_timed_out(
        self, pool_name: str, waited: float, session: SessionView | None, holders: tuple[str, ...]
    ) -> None:
        self.instruments.timeouts.add(1, self._pool(pool_name))
        attributes: Attributes = {POOL_NAME: pool_name, WAIT_TIME: waited}
        if holders:
            attributes[HOLDERS] = "\n".join(holders)
        state = self._span_of(session)
        if state is not None:
            state.add_event("pool.timeout", attributes)
            state.fail(POOL_TIMEOUT_ERROR, f"connection pool timeout after {waited:.3f}s")
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
            self.instruments.connection_count.add(idle - last_idle, states[0])
        if used != last_used:
            self.instruments.connection_count.add(used - last_used, states[1])

    def pool_pending(self, pool_name: str, delta: int) -> None:
        self.instruments.pending_requests.add(delta, self._pool(pool_name))

    def pool_capacity(self, pool_name: str, maximum: int | None) -> None:
        last = self._capacity.get(pool_name, 0)
        self._capacity[pool_name] = maximum or 0
        if (maximum or 0) != last:
            self.instruments.connection_max.add((maximum or 0) - last, self._pool(pool_name))

    def internal_error(self, listener: str) -> None:
        self.instruments.internal_errors.add(1, {LISTENER: listener})

    def close(self) -> None:
        pass  # the statement listeners stay, idle: no session is followed any more

    def listen(self, engine: Engine) -> None:
        """Called for each engine the monitor watches, as it starts watching it."""
        self.statements.listen(engine)
        name = pool_name_for(engine.url)
        attributes = connection_attributes(engine.url)
        known = self._connection_attributes.get(name)
        if known is not None:
            # Two URLs, one pool name (a host left out and "localhost", say): what they share.
            attributes = {key: known[key] for key in known if attributes.get(key) == known[key]}
        self._connection_attributes[name] = attributes
