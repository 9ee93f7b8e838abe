"""The ContextVars that carry the per-request scope (`records.RequestScope`) and the lifespan's
phase.

FastAPI runs sync dependencies in worker threads with a *copy* of the context: a value set there
never reaches the middleware. So the middleware puts one mutable object in the ContextVar before
calling the app, and listeners record into that object from any thread.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from .records import RequestScope


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
