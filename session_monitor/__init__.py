"""session_monitor: see every SQLAlchemy session and pooled connection of a FastAPI app.

::

    from session_monitor import SessionMonitor

    engine = create_engine(DATABASE_URL)       # or create_async_engine(...)
    monitor = SessionMonitor(engine)           # or SessionMonitor() for every engine
    monitor.instrument_app(app)                # pure-ASGI middleware and /metrics

See the README for every metric, the leak definitions and their limits.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import ConfigurationError, MonitorConfig
    from .holders import HolderView, PoolEvent, PoolUsage
    from .middleware import SessionMonitorMiddleware
    from .monitor import SessionMonitor
    from .naming import NO_REQUEST, UNMATCHED_ROUTE, pool_name_for
    from .observer import Observer
    from .records import CheckoutView, SessionView

__version__ = "0.1.0"

# Imported when first used: the pytest plugin's entry point imports this package in every test
# run of every project that has it installed, and must not import SQLAlchemy there.
_EXPORTS = {
    "ConfigurationError": "config",
    "MonitorConfig": "config",
    "HolderView": "holders",
    "PoolEvent": "holders",
    "PoolUsage": "holders",
    "SessionMonitorMiddleware": "middleware",
    "SessionMonitor": "monitor",
    "NO_REQUEST": "naming",
    "UNMATCHED_ROUTE": "naming",
    "pool_name_for": "naming",
    "Observer": "observer",
    "CheckoutView": "records",
    "SessionView": "records",
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
