"""SessionMonitor: the one object an application builds, attaches and can remove."""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
import weakref
from collections.abc import Iterable
from types import FrameType
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, make_asgi_app
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from . import _hooks
from ._listeners import Guard, ListenerSet
from .config import ConfigurationError, MonitorConfig, excluded_path_set
from .context import RequestScope
from .leaks import AgeWatcher, LeakLog
from .metrics import PrometheusCollector, PrometheusMetrics
from .middleware import SessionMonitorMiddleware
from .observer import Fanout, Observer
from .pool import PoolTracker
from .sessions import SessionTracker

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    EngineLike = Engine | AsyncEngine


def _sync_engines(engines: Iterable[Any]) -> list[Engine]:
    found: list[Engine] = []
    for candidate in engines:
        if isinstance(candidate, (list, tuple, set, frozenset)):
            found.extend(_sync_engines(candidate))
        elif isinstance(candidate, Engine):
            found.append(candidate)
        elif isinstance(getattr(candidate, "sync_engine", None), Engine):
            # An AsyncEngine, recognised without importing SQLAlchemy's asyncio extension,
            # which needs greenlet.
            found.append(candidate.sync_engine)
        else:
            raise ConfigurationError(
                "SessionMonitor watches SQLAlchemy engines: pass Engine or AsyncEngine objects "
                "(SessionMonitor(engine) or SessionMonitor(engine_a, engine_b)), or none at all "
                f"to watch every engine in the process; got {type(candidate).__name__}"
            )
    return found


def _register_all(registry: CollectorRegistry | None, collectors: list[Any]) -> None:
    """Register every collector, or none: a name taken already leaves the registry as it was."""
    if registry is None:
        return
    done: list[Any] = []
    try:
        for collector in collectors:
            registry.register(collector)
            done.append(collector)
    except ValueError:
        for collector in done:
            registry.unregister(collector)
        raise


class SessionMonitor:
    """Watch SQLAlchemy sessions and pools, and report them as metrics (and spans).

    ::

        engine = create_engine(DATABASE_URL)
        monitor = SessionMonitor(engine)      # SessionMonitor() watches every engine
        monitor.instrument_app(app)           # middleware, and /metrics unless metrics_path=None
        ...
        monitor.uninstrument()                # removes exactly what was added
    """

    def __init__(
        self,
        *engines: EngineLike | Iterable[EngineLike],
        registry: CollectorRegistry | None = REGISTRY,
        pool_name: str | None = None,
        leak_threshold: float | None = None,
        capture_stacks: bool = False,
        stack_depth: int = 12,
        excluded_paths: Iterable[str] | None = None,
        metrics_path: str | None = "/metrics",
        log_leaks: bool = True,
        opentelemetry: bool | None = None,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        observers: Iterable[Observer] = (),
    ) -> None:
        sync_engines = _sync_engines(engines)
        self.config = MonitorConfig(
            pool_name=pool_name,
            leak_threshold=leak_threshold,
            capture_stacks=capture_stacks,
            stack_depth=stack_depth,
            excluded_paths=excluded_path_set(excluded_paths),
            metrics_path=metrics_path,
            log_leaks=log_leaks,
        )
        if pool_name is not None and len(sync_engines) != 1:
            raise ConfigurationError(
                "pool_name names the pool of exactly one engine; with several engines, or none "
                "(every engine), each pool is named from its URL as host:port/database"
            )
        if registry is not None and not isinstance(registry, CollectorRegistry):
            raise ConfigurationError(
                "registry must be a prometheus_client CollectorRegistry, or None to create "
                f"metrics without registering them; got {type(registry).__name__}"
            )
        self.registry = registry
        # Everything that can fail comes before registering metrics, which is the one step that
        # leaves a trace outside this object.
        otel_observers: list[Observer] = []
        if opentelemetry or (
            opentelemetry is None and (tracer_provider is not None or meter_provider is not None)
        ):
            try:
                from .tracing import OpenTelemetryObserver
            except ImportError as error:
                raise ConfigurationError(
                    f"OpenTelemetry support needs the 'otel' extra ({error}): "
                    "pip install 'session-monitor[otel]'"
                ) from None
            otel_observers.append(
                OpenTelemetryObserver(
                    tracer_provider=tracer_provider, meter_provider=meter_provider
                )
            )
        all_observers: list[Observer] = [*otel_observers, *observers]
        multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        if multiprocess:
            # Workers' values must go through prometheus_client's files to be added up.
            push_metrics = PrometheusMetrics(registry=None)
            all_observers.insert(0, push_metrics)
        # Only what is given besides the metrics: none by default, and then no call is made.
        self.observers: tuple[Observer, ...] = tuple(all_observers)

        self._errors: dict[str, int] = {}
        self._errors_lock = threading.Lock()
        self._guard = Guard(self._count_internal_error)
        self._emit = Fanout(self.observers, self._guard.failed) if self.observers else None
        self._listeners = ListenerSet()
        leak_log = LeakLog(self.config.log_leaks)
        self._sessions = SessionTracker(self.config, self._emit, self._guard, leak_log)
        self._pools = PoolTracker(
            self._sessions,
            self._emit,
            self._guard,
            self._listeners,
            leak_log,
            every_engine=not sync_engines,
            pool_name=pool_name,
        )
        self.metrics: PrometheusCollector | PrometheusMetrics
        if multiprocess:
            self.metrics = push_metrics
            self._collectors: list[Any] = list(push_metrics.collectors())
        else:
            self.metrics = PrometheusCollector(
                self._sessions.snapshot, self._pools.snapshot, self._error_counts
            )
            self._collectors = [self.metrics]
        try:
            _register_all(registry, self._collectors)
        except ValueError as error:
            raise ConfigurationError(
                f"{error}. Another SessionMonitor already registered its metrics in this "
                "registry: build one monitor per process (it can watch several engines), call "
                "uninstrument() on the old one first, or pass registry=CollectorRegistry()."
            ) from None
        self.metrics_app = self._build_metrics_app(registry)
        self._age_watcher: AgeWatcher | None = None
        self._apps: weakref.WeakSet[Any] = weakref.WeakSet()
        self.instrumented = False
        self._instrument(sync_engines)

    # -- wiring -------------------------------------------------------------------------------

    def _build_metrics_app(self, registry: CollectorRegistry | None) -> Any:
        if self.config.metrics_path is None or registry is None:
            return None
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Each worker writes its values to files; a scrape must read all workers' files.
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return make_asgi_app(registry)

    def _instrument(self, engines: list[Engine]) -> None:
        for engine in engines:
            self._pools.add_engine(engine)
        threshold = self.config.leak_threshold
        if threshold is not None:
            self._age_watcher = AgeWatcher(
                threshold,
                self._pools.checkouts,
                lambda checkout: self._pools.report_age(checkout, threshold),
                self._guard.failed,
            )
            self._age_watcher.start()
        _hooks.subscribe(self._subscriber())
        self.instrumented = True

    def instrument_app(self, app: Any) -> Any:
        """Add the middleware (which also serves `metrics_path`) to a Starlette/FastAPI app."""
        if app in self._apps:
            warnings.warn("session_monitor: this app is already instrumented", stacklevel=2)
            return app
        app.add_middleware(SessionMonitorMiddleware, monitor=self)
        self._apps.add(app)
        return app

    def uninstrument(self) -> None:
        """Remove listeners, hooks, middleware and metrics that this monitor added."""
        if not self.instrumented:
            return
        self.instrumented = False  # a middleware already built now passes requests through
        _hooks.unsubscribe(self)
        self._listeners.remove_all()
        if self._age_watcher is not None:
            self._age_watcher.stop()
        for app in list(self._apps):
            user_middleware = getattr(app, "user_middleware", None)
            if isinstance(user_middleware, list):
                user_middleware[:] = [
                    m
                    for m in user_middleware
                    if not (
                        getattr(m, "cls", None) is SessionMonitorMiddleware
                        and getattr(m, "kwargs", {}).get("monitor") is self
                    )
                ]
        self._apps = weakref.WeakSet()
        if self.registry is not None:
            for collector in self._collectors:
                self.registry.unregister(collector)
        if self._emit is not None:
            self._emit.close()

    # -- what the hooks, listeners and middleware call (never raise) -------------------------

    def _count_internal_error(self, listener: str) -> None:
        with self._errors_lock:
            self._errors[listener] = self._errors.get(listener, 0) + 1
        for observer in self.observers:
            with contextlib.suppress(Exception):
                observer.internal_error(listener)

    def _error_counts(self) -> dict[str, int]:
        with self._errors_lock:
            return dict(self._errors)

    def _subscriber(self) -> _hooks.Subscriber:
        pools = self._pools
        return _hooks.Subscriber(
            owner=self,
            acquire=pools.acquire,
            session_acquiring=self._session_acquiring,
            session_closed=self._sessions.close_orm,
            transaction_began=pools.transaction_began,
            transaction_committed=pools.transaction_committed,
            transaction_rolling_back=pools.transaction_rolling_back,
            transaction_closing=pools.transaction_closing,
        )

    def _session_acquiring(
        self, session: Session, bind: Engine | Connection, frame: FrameType
    ) -> None:
        try:
            tracked = self._sessions.tracked(session)
            if tracked is not None and not tracked.closed:
                return
            state = self._pools.state_for(bind.engine)
            if state is not None:
                self._sessions.open_orm(session, state, frame)
        except Exception:
            self._guard.failed("session_open")

    def _request_finished(self, request: RequestScope) -> None:
        try:
            self._sessions.request_finished(request)
        except Exception:
            self._guard.failed("request_end")

    # -- introspection, for tests and the benchmark --------------------------------------------

    @property
    def tracked_sessions(self) -> int:
        """ORM sessions open now that the monitor holds state for."""
        return self._sessions.live_sessions

    @property
    def tracked_checkouts(self) -> int:
        return self._pools.tracked_checkouts
