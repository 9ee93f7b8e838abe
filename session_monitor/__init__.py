"""session_monitor: see every SQLAlchemy session and pooled connection of a FastAPI app.

::

    from session_monitor import SessionMonitor

    engine = create_engine(DATABASE_URL)       # or create_async_engine(...)
    monitor = SessionMonitor(engine)           # or SessionMonitor() for every engine
    monitor.instrument_app(app)                # pure-ASGI middleware and /metrics

See the README for every metric, the leak definitions and their limits.
"""

from .config import ConfigurationError, MonitorConfig
from .middleware import SessionMonitorMiddleware
from .monitor import SessionMonitor
from .naming import NO_REQUEST, UNMATCHED_ROUTE, pool_name_for
from .observer import Observer
from .records import CheckoutView, SessionView

__version__ = "0.1.0"

__all__ = [
    "NO_REQUEST",
    "UNMATCHED_ROUTE",
    "CheckoutView",
    "ConfigurationError",
    "MonitorConfig",
    "Observer",
    "SessionMonitor",
    "SessionMonitorMiddleware",
    "SessionView",
    "__version__",
    "pool_name_for",
]
