"""While one of a session's statements runs, the session's span is the current span, so the
statement spans of opentelemetry-instrumentation-sqlalchemy become its children.

The listeners go on each watched engine, not the Engine class: unwatched engines stay off
SQLAlchemy's per-statement dispatch path. insert=True puts them before the statement listeners
of opentelemetry-instrumentation-sqlalchemy, so its spans get the session's span as parent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import trace
from sqlalchemy import event
from sqlalchemy.engine import Engine

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, ExceptionContext, ExecutionContext

    from ..state.views import SessionView
    from .otel_spans import SessionSpan


class StatementContext:
    def __init__(self, spans: dict[int, SessionSpan]) -> None:
        self._spans = spans  # the observer's open session spans, by SessionView.id
        # Where an execution keeps the token of the context attached for its statement.
        self._token_attribute = f"_session_monitor_otel_{id(self):x}"
        # Set by the monitor (OpenTelemetryObserver.bind): a Connection's session, the guard.
        self.session_for: Callable[[Connection], SessionView | None] = lambda connection: None
        self.failed: Callable[[str], None] = lambda listener: None

    def listen(self, engine: Engine) -> None:
        listen = event.listen
        listen(engine, "before_cursor_execute", self._before_cursor_execute_evt, insert=True)
        listen(engine, "after_cursor_execute", self._after_cursor_execute_evt, insert=True)
        listen(engine, "handle_error", self._handle_error_evt, insert=True)

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
            if context is None or conn.invalidated or hasattr(context, self._token_attribute):
                return
            session = self.session_for(conn)
            state = None if session is None else self._spans.get(session.id)
            if state is None or state.ended:
                return
            token = otel_context.attach(trace.set_span_in_context(state.span))
            setattr(context, self._token_attribute, token)
        except Exception:
            self.failed("otel_before_cursor_execute")

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
            self.failed("otel_after_cursor_execute")
