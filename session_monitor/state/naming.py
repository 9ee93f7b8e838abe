"""Label values: pool names from engine URLs, HTTP methods and route templates.

Every function here returns values from a bounded set, so hostile traffic cannot add series.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from typing import Any

from sqlalchemy.engine import URL

NO_REQUEST = "<none>"
UNMATCHED_ROUTE = "<unmatched>"
OTHER_METHOD = "OTHER"
WEBSOCKET_METHOD = "WS"  # as FastAPI's telemetry names a websocket's span
_MAX_MOUNT_DEPTH = 8

_STANDARD_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)


def pool_name_for(url: URL) -> str:
    """Name a pool `host:port/database`, or a SQLite file by its base name; never a password."""
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if not database or database == ":memory:" or database.startswith("file::memory:"):
            return "memory"
        return os.path.basename(database.split("?", 1)[0]) or "memory"
    host = url.host or "localhost"
    address = f"{host}:{url.port}" if url.port else host
    return f"{address}/{url.database}" if url.database else address


def method_label(method: str) -> str:
    return method if method in _STANDARD_METHODS else OTHER_METHOD


def route_label(scope: MutableMapping[str, Any], entry_root_path: str, app: Any) -> str | None:
    """Return the template of the route matched in this scope, as FastAPI's telemetry reports it
    in `http.route`: the root path the app is served under, each mount's template, then the
    route's own, include_router prefixes included. None while nothing has matched.

    Read from what the routers leave in the scope, never from the request's path, so a label
    is always one of the app's templates: hostile traffic cannot add series.
    """
    template = _leaf_template(scope)
    if template is None:
        return None
    mounted_at = scope.get("root_path", "")
    prefix = entry_root_path.rstrip("/")
    if (
        isinstance(mounted_at, str)
        and len(mounted_at) > len(entry_root_path)
        and mounted_at.startswith(entry_root_path)
    ):
        prefix += _mount_templates(app, mounted_at[len(entry_root_path) :])
    return prefix + template


def _leaf_template(scope: MutableMapping[str, Any]) -> str | None:
    """The matched route's template relative to the innermost mount; "/{path}" for a mounted
    app that routes no further (StaticFiles, a WSGI app), like FastAPI's telemetry."""
    route = scope.get("route")
    endpoint = scope.get("endpoint")
    # FastAPI 0.16x keeps an included router's routes unprefixed and resolves the prefix per
    # request: the effective context has the full path. It is this request's when it names the
    # route or endpoint matched last (a mount's context stays behind when a sub-app matches).
    fastapi_scope = scope.get("fastapi")
    if isinstance(fastapi_scope, dict):
        context = fastapi_scope.get("effective_route_context")
        if context is not None and (
            (route is not None and getattr(context, "original_route", None) is route)
            or (endpoint is not None and getattr(context, "endpoint", None) is endpoint)
        ):
            effective = getattr(context, "starlette_route", None) or context
            if _is_mount(effective):
                return "/{path}"
            template = getattr(effective, "path_format", None)
            if isinstance(template, str):
                return template
    if route is not None and not _is_mount(route):
        template = getattr(route, "path_format", None)
        if isinstance(template, str):
            return template
    # A FastAPI router matches plain Starlette routes (/openapi.json, /docs) and mounts
    # without naming them in the scope; the endpoint it matched finds them.
    if endpoint is not None:
        found = _route_of_endpoint(scope.get("app"), endpoint)
        if _is_mount(found):
            return "/{path}"
        if found is not None:
            template = getattr(found, "path_format", None)
            if isinstance(template, str):
                return template
    if _is_mount(route):
        return "/{path}"
    return None


def _routes(app: Any) -> list[Any]:
    routes = getattr(app, "routes", None)
    return routes if isinstance(routes, list) else []


def _route_of_endpoint(app: Any, endpoint: Any) -> Any:
    for route in _routes(app):
        if _is_mount(route):
            if route.app is endpoint:
                return route
        elif getattr(route, "endpoint", None) is endpoint:
            return route
    return None


def _mount_templates(app: Any, concrete: str) -> str:
    """The templates of the mounts that served `concrete` (the root path they added), found by
    matching it against each level's mounts; the concrete path where that finds none."""
    found = ""
    remaining = concrete
    for _ in range(_MAX_MOUNT_DEPTH):
        if not remaining:
            return found
        for route in _routes(app):
            if not _is_mount(route):
                continue
            match = route.path_regex.match(remaining + "/")
            if match is None:
                continue
            consumed = len(remaining) + 1 - len(match.group("path"))
            if consumed <= 1 and route.path:
                continue
            found += route.path_format.removesuffix("/{path}")
            remaining = remaining[consumed - 1 :] if consumed > 1 else remaining
            app = route.app
            break
        else:
            break
    return found + remaining if remaining else found


def _is_mount(route: Any) -> bool:
    # Starlette is the app's dependency, not ours: its Mount is known once the app loaded it.
    routing = sys.modules.get("starlette.routing")
    return routing is not None and isinstance(route, routing.Mount)
