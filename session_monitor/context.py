"""The per-request scope the middleware opens, and the ContextVar that carries it.

FastAPI runs sync dependencies in worker threads with a *copy* of the context: a value set there
never reaches the middleware. So the middleware puts one mutable object in the ContextVar before
calling the app, and listeners record into that object from any thread.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from .naming import UNMATCHED_ROUTE, method_label, route_label

if TYPE_CHECKING:
    from .records import TrackedCheckout, TrackedSession


class RequestScope:
    __slots__ = ("_route", "asgi_scope", "checkouts", "method", "root_path", "sessions", "started")

    def __init__(self, asgi_scope: dict[str, Any]) -> None:
        self.asgi_scope = asgi_scope
        self.method = method_label(asgi_scope.get("method", ""))
        self.root_path: str = asgi_scope.get("root_path", "")
        self.started = time.perf_counter()
        self._route: str | None = None
        # Appended from worker threads too: list.append is atomic, and only the middleware reads.
        self.sessions: list[TrackedSession] = []
        self.checkouts: list[TrackedCheckout] = []

    @property
    def route(self) -> str:
        if self._route is None:
            matched = route_label(self.asgi_scope, self.root_path)
            if matched is None:
                # Not matched yet (a session opened by an outer middleware) or never matched.
                return UNMATCHED_ROUTE
            self._route = matched
        return self._route


current_request: ContextVar[RequestScope | None] = ContextVar(
    "session_monitor_request", default=None
)
