"""session_monitor: see every SQLAlchemy session and pooled connection of a FastAPI app.

::

    from session_monitor import SessionMonitor

    engine = create_engine(DATABASE_URL)       # or create_async_engine(...)
    monitor = SessionMonitor(engine)           # or SessionMonitor() for every engine
    monitor.instrument_app(app)                # pure-ASGI middleware and /metrics

See docs/metrics.md and docs/counting.md for every metric, the leak definitions and their limits.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:
    from .config import ConfigurationError, MonitorConfig
    from .findings.holders import PoolEvent, PoolUsage
    from .monitor import SessionMonitor
    from .state.naming import NO_REQUEST, UNMATCHED_ROUTE, pool_name_for
    from .state.observer import Observer
    from .state.views import CheckoutView, HolderView, SessionView
    from .web.middleware import SessionMonitorMiddleware


# Imported when first used: the pytest plugin's entry point imports this package in every test
# run of every project that has it installed, and must not import SQLAlchemy there.
_EXPORTS = {
    "ConfigurationError": "config",
    "MonitorConfig": "config",
    "HolderView": "state.views",
    "PoolEvent": "findings.holders",
    "PoolUsage": "findings.holders",
    "SessionMonitorMiddleware": "web.middleware",
    "SessionMonitor": "monitor",
    "NO_REQUEST": "state.naming",
    "UNMATCHED_ROUTE": "state.naming",
    "pool_name_for": "state.naming",
    "Observer": "state.observer",
    "CheckoutView": "state.views",
    "SessionView": "state.views",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'session_monitor' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value

__all__ = [
    "NO_REQUEST",
    "UNMATCHED_ROUTE",
    "CheckoutView",
    "ConfigurationError",
    "HolderView",
    "MonitorConfig",
    "Observer",
    "PoolEvent",
    "PoolUsage",
    "SessionMonitor",
    "SessionMonitorMiddleware",
    "SessionView",
    "__version__",
    "pool_name_for",
]
