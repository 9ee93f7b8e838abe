"""Label values: pool names from engine URLs, HTTP methods and route templates.

Every function here returns values from a bounded set, so hostile traffic cannot add series.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import Any

from sqlalchemy.engine import URL

NO_REQUEST = "<none>"
UNMATCHED_ROUTE = "<unmatched>"
OTHER_METHOD = "OTHER"

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


def route_label(scope: MutableMapping[str, Any], root_path: str) -> str | None:
    """Return the template of the route the router matched in this scope, if it has matched one."""
    route = scope.get("route")
    if route is None:
        return None
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    if not isinstance(template, str):
        return None
    # Under a Mount the route's path is relative to the mount point, which the router adds to
    # root_path; put it back so the label names the full template.
    mounted_at = scope.get("root_path", "")
    if isinstance(mounted_at, str) and len(mounted_at) > len(root_path):
        return mounted_at[len(root_path) :] + template
    return template
