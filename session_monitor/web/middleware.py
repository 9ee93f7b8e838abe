"""Pure-ASGI middleware: opens a request scope for the listeners and checks it when the call ends.

Pure ASGI rather than BaseHTTPMiddleware: the call returns only after the response is sent,
yield-dependency cleanup has run and background tasks are done, which is the moment a leak is
certain; and ContextVars set here reach the app. It creates no state of its own: Starlette may
build it lazily, and more than once.

`SessionMonitor.instrument_app` makes it the outermost user middleware when Starlette builds the
stack, whenever the others were added: a middleware that closes the request's sessions
(``scoped_session.remove()``) has finished when this one checks.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Protocol

from ..state.context import (
    LifespanPhase,
    app_path,
    current_request,
    failed_request,
    lifespan_phase,
)
from ..state.records import RequestScope

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, MutableMapping

    from ..config import MonitorConfig
    from ..hooks.guard import Guard
    from .diagnostics import DiagnosticsApp

    Scope = MutableMapping[str, Any]
    Message = MutableMapping[str, Any]
    Receive = Callable[[], Awaitable[Message]]
    Send = Callable[[Message], Awaitable[None]]
    ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


_MAX_LAYERS = 8


class Monitor(Protocol):
    """What the middleware uses of the `SessionMonitor` it is given: its settings and pages, and
    the three calls through which it tells the monitor about requests and the lifespan."""

    instrumented: bool
    config: MonitorConfig
    metrics_app: Any
    diagnostics_app: DiagnosticsApp | None
    _guard: Guard

    def _request_finished(self, request: RequestScope) -> None: ...

    def _serving(self, serving: bool) -> None: ...


class SessionMonitorMiddleware:
    def __init__(self, app: ASGIApp, *, monitor: Monitor) -> None:
        self.app = app
        self.monitor = monitor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        monitor = self.monitor
        kind = scope["type"]
        if kind == "lifespan" and monitor.instrumented:
            await self._lifespan(scope, receive, send)
            return
        if kind not in ("http", "websocket") or not monitor.instrumented:
            await self.app(scope, receive, send)
            return
        path = app_path(scope)
        if kind == "http":
            if path == monitor.config.metrics_path and monitor.metrics_app is not None:
                await monitor.metrics_app(scope, receive, send)
                return
            diagnostics = monitor.diagnostics_app
            if diagnostics is not None and diagnostics.handles(path):
                await diagnostics(scope, receive, send, path)
                return
        outer = current_request.get()
        if path in monitor.config.excluded_paths or (
            # A mounted app instrumented too: the request is already the outer app's.
            outer is not None and outer.asgi_scope_id == id(scope)
        ):
            await self.app(scope, receive, send)
            return
        request = RequestScope(scope)  # type: ignore[arg-type]
        token = current_request.set(request)

        async def send_noting_status(message: Message) -> None:
            # An error status tells a leak's WARNING that the endpoint may have raised past a
            # get_db without finally (an HTTPException is answered inside, never reaches here).
            try:
                kind = message["type"]
                if kind == "http.response.start" and message.get("status", 200) >= 400:
                    request.failure = f"answered {message['status']}"
                elif kind == "http.response.body" and not message.get("more_body", False):
                    request.responded = True  # what runs now is cleanup and background tasks
            except Exception:  # an odd message is the app's business, not ours to fail on
                monitor._guard.failed("middleware_send")
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status if kind == "http" else send)
        except BaseException as error:
            request.failure = f"raised {type(error).__name__}"
            # Starlette's ServerErrorMiddleware, outside this one, runs the app's 500 handler
            # next: its database work belongs to this request (`attribute_error_handler`).
            failed_request.set(request)
            raise
        finally:
            current_request.reset(token)
            request.finish()
            monitor._request_finished(request)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Startup and shutdown serve no request, so their work on the event loop blocks none.
        phase = LifespanPhase()
        token = lifespan_phase.set(phase)

        async def receive_noting_shutdown() -> Message:
            message = await receive()
            if message.get("type") == "lifespan.shutdown":
                phase.serving = False
                self.monitor._serving(False)
            return message

        async def send_noting_startup(message: Message) -> None:
            if message.get("type") in ("lifespan.startup.complete", "lifespan.startup.failed"):
                phase.serving = True
                if message["type"] == "lifespan.startup.complete":
                    self.monitor._serving(True)
            await send(message)

        try:
            await self.app(scope, receive_noting_shutdown, send_noting_startup)
        finally:
            lifespan_phase.reset(token)


def insert_middleware(app: Any, monitor: Monitor) -> None:
    """Make the middleware the outermost user middleware of a Starlette/FastAPI app, whenever
    the others are added (see `SessionMonitor.instrument_app`)."""
    build = getattr(app, "build_middleware_stack", None)
    user_middleware = getattr(app, "user_middleware", None)
    if (
        callable(build)
        and isinstance(user_middleware, list)
        and getattr(app, "middleware_stack", ...) is None
    ):
        from starlette.middleware import Middleware  # an app of Starlette's: it is there

        def build_middleware_stack() -> Any:
            # The outermost of the user middleware, whenever the others were added: inside
            # Starlette's error handling, where OpenTelemetry's FastAPI instrumentation
            # expects to find it and puts its server span around everything else.
            ours = Middleware(SessionMonitorMiddleware, monitor=monitor)
            user_middleware.insert(0, ours)
            try:
                stack = build()
            finally:
                user_middleware.remove(ours)
            try:
                attribute_error_handler(stack, monitor)
            except Exception:
                monitor._guard.failed("middleware_build")
            return stack

        build_middleware_stack.session_monitor = monitor  # type: ignore[attr-defined]
        app.build_middleware_stack = build_middleware_stack
    else:  # not Starlette's shape, or already serving: Starlette says which
        app.add_middleware(SessionMonitorMiddleware, monitor=monitor)


def attribute_error_handler(stack: Any, monitor: Monitor) -> None:
    """Run the app's 500 handler (`exception_handler(500)` or `(Exception)`) as part of the
    request that failed: Starlette's ServerErrorMiddleware calls it outside this middleware,
    once the request has ended here."""
    from starlette._utils import is_async_callable
    from starlette.middleware.errors import ServerErrorMiddleware

    layer = stack
    # The ServerErrorMiddleware nearest this middleware: OpenTelemetry's FastAPI
    # instrumentation puts a second one, without the app's handler, around its own.
    for _ in range(_MAX_LAYERS):
        if layer is None or isinstance(layer, SessionMonitorMiddleware):
            return
        if isinstance(layer, ServerErrorMiddleware) and layer.handler is not None:
            break
        layer = getattr(layer, "app", None)
    else:
        return
    handler = layer.handler
    if getattr(handler, "session_monitor", None) is monitor:
        return

    def continued(request: Any) -> RequestScope | None:
        try:
            failed = failed_request.get()
            if failed is None or failed.asgi_scope_id != id(request.scope):
                return None
            failed_request.set(None)
            return RequestScope.continuing(failed) if monitor.instrumented else None
        except Exception:
            monitor._guard.failed("error_handler")
            return None

    def finished(continuation: RequestScope) -> None:
        continuation.finish()
        monitor._request_finished(continuation)

    # The same kind of callable as the app's: Starlette runs a plain function in a thread.
    wrapped: Any
    if is_async_callable(handler):

        async def wrapped(request: Any, exc: Exception) -> Any:
            continuation = continued(request)
            if continuation is None:
                return await handler(request, exc)
            token = current_request.set(continuation)
            try:
                return await handler(request, exc)
            finally:
                current_request.reset(token)
                finished(continuation)

    else:

        def wrapped(request: Any, exc: Exception) -> Any:
            continuation = continued(request)
            if continuation is None:
                return handler(request, exc)
            token = current_request.set(continuation)
            try:
                return handler(request, exc)
            finally:
                current_request.reset(token)
                finished(continuation)

    functools.update_wrapper(wrapped, handler)
    wrapped.session_monitor = monitor
    layer.handler = wrapped


def remove_middleware(app: Any, monitor: Monitor) -> None:
    """Undo `insert_middleware`. A stack built already keeps the middleware, which passes
    requests through once the monitor is uninstrumented."""
    if getattr(vars(app).get("build_middleware_stack"), "session_monitor", None) is monitor:
        del app.build_middleware_stack
    user_middleware = getattr(app, "user_middleware", None)
    if isinstance(user_middleware, list):
        user_middleware[:] = [
            m
            for m in user_middleware
            if not (
                getattr(m, "cls", None) is SessionMonitorMiddleware
                and getattr(m, "kwargs", {}).get("monitor") is monitor
            )
        ]
