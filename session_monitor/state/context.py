"""The per-request scope the middleware opens, and the ContextVar that carries it.

FastAPI runs sync dependencies in worker threads with a *copy* of the context: a value set there
never reaches the middleware. So the middleware puts one mutable object in the ContextVar before
calling the app, and listeners record into that object from any thread.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from .naming import UNMATCHED_ROUTE, WEBSOCKET_METHOD, method_label, route_label

if TYPE_CHECKING:
    from .records import TrackedSession


class RequestScope:
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


def app_path(scope: dict[str, Any] | Any) -> str:
    """The path as the app's routing sees it: without a proxy's root_path prefix, if present."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        rest = path[len(root_path) :]
        if not rest or rest.startswith("/"):
            return rest or "/"
    return path


current_request: ContextVar[RequestScope | None] = ContextVar(
    "session_monitor_request", default=None
)


class LifespanPhase:
    """Whether the app serves requests yet: False during startup and again from shutdown on.

    Tasks a lifespan starts copy the context, and with it this object: their work while the
    app serves does block requests, and is judged so."""

    __slots__ = ("serving",)

    def __init__(self) -> None:
        self.serving = False


def serving_no_request() -> bool:
    """Whether this code runs in a lifespan's startup or shutdown, when no request is served."""
    phase = lifespan_phase.get()
    return phase is not None and not phase.serving


lifespan_phase: ContextVar[LifespanPhase | None] = ContextVar(
    "session_monitor_lifespan", default=None
)

# The request an exception just left (ours is finished, its ASGI scope let go): read by the
# app's 500 handler, which Starlette runs outside this middleware, in the same task.
failed_request: ContextVar[RequestScope | None] = ContextVar(
    "session_monitor_failed_request", default=None
)
