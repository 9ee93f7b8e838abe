"""SessionMonitor: the one object an application builds, attaches and can remove.

It wires the owners of each event together and creates nothing on the hot path itself: the
hooks call the session tracker (`sessions.py`) and the pool tracker (`pool.py`) directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry
from sqlalchemy.engine import Engine

from .config import (
    ConfigurationError,
    MonitorConfig,
    excluded_path_set,
    package_names,
    sync_engines_of,
)
from .exporters.metrics import PrometheusCollector, register_all
from .exporters.multiprocess import metrics_app
from .findings.database_view import DatabaseView
from .findings.holders import (
    ExhaustionReporter,
    PoolEvent,
    PoolUsage,
    holder_views,
)
from .findings.idle import IdleInTransactionSampler
from .findings.leaks import AgeWatcher, LeakDetector
from .findings.pitfalls import Pitfall, PitfallDetector
from .hooks import wrappers
from .hooks.forking import Stage, in_child, new_lock, new_rlock
from .hooks.guard import Guard
from .hooks.stacks import add_library_packages
from .state.observer import Fanout, Observer
from .state.pool import PoolTracker
from .state.records import RequestScope
from .state.sessions import SessionTracker
from .state.views import HolderView, SessionView
from .web.diagnostics import DiagnosticsApp, worker_answer
from .web.middleware import insert_middleware, remove_middleware
from .web.workers import WorkerSocket

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine
    from sqlalchemy.orm import Session

    from .exporters.tracing import OpenTelemetryObserver

    EngineLike = Engine | AsyncEngine

logger = logging.getLogger("session_monitor")


def _off_the_loop(call: str, arguments: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        f"Call {call} off the event loop, e.g. await asyncio.to_thread({arguments}): it waits "
        "for the database server, which would block every request of this worker meanwhile"
    )


class SessionMonitor:
    """Watch SQLAlchemy sessions and pools, and report them as metrics (and spans).

    ::

        engine = create_engine(DATABASE_URL)
        monitor = SessionMonitor(engine)      # SessionMonitor() watches every engine
        monitor.instrument_app(app)           # middleware, and /metrics unless metrics_path=None
        ...
        monitor.uninstrument()                # stops watching; instrument() resumes
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
        idle_in_transaction_threshold: float | None = 5.0,
        timeout_log_interval: float = 10.0,
        diagnostics_path: str | None = None,
        diagnostics_token: str | None = None,
        diagnostics_deadline: float = 1.0,
        opentelemetry: bool | None = None,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        observers: Iterable[Observer] = (),
        library_packages: Iterable[str] = (),
        server_view: bool = True,
        server_view_interval: float = 5.0,
        application_name: str | None = None,
    ) -> None:
        sync_engines = sync_engines_of(engines)
        self.config = MonitorConfig(
            pool_name=pool_name,
            leak_threshold=leak_threshold,
            capture_stacks=capture_stacks,
            stack_depth=stack_depth,
            excluded_paths=excluded_path_set(excluded_paths),
            metrics_path=metrics_path,
            log_leaks=log_leaks,
            idle_in_transaction_threshold=idle_in_transaction_threshold,
            timeout_log_interval=timeout_log_interval,
            diagnostics_path=diagnostics_path,
            diagnostics_token=diagnostics_token,
            diagnostics_deadline=diagnostics_deadline,
            library_packages=package_names(library_packages),
            server_view=server_view,
            server_view_interval=server_view_interval,
            application_name=application_name,
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
        self._errors: dict[str, int] = {}
        self._errors_lock = new_lock()
        # First of this monitor's owners in a forked child: the failures of the others there
        # are the child's own.
        in_child(Stage.FORGET, self._forked)
        self._guard = Guard(self._count_internal_error)
        # Everything that can fail comes before `instrument()`, the one step that leaves a
        # trace outside this object.
        self._otel: OpenTelemetryObserver | None = None
        if opentelemetry or (
            opentelemetry is None and (tracer_provider is not None or meter_provider is not None)
        ):
            try:
                from .exporters.tracing import OpenTelemetryObserver
            except ImportError as error:
                raise ConfigurationError(
                    f"OpenTelemetry support needs the 'otel' extra ({error}): "
                    "pip install 'session-monitor[otel]'"
                ) from None
            self._otel = OpenTelemetryObserver(
                tracer_provider=tracer_provider, meter_provider=meter_provider
            )
        all_observers: list[Observer] = [*([self._otel] if self._otel else []), *observers]
        multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        if multiprocess:
            # Workers' values must go through prometheus_client's files to be added up.
            from .exporters.multiprocess import PrometheusMetrics

            push_metrics = PrometheusMetrics(registry=None)
            all_observers.insert(0, push_metrics)
        # Only what is given besides the metrics: none by default, and then no call is made.
        self.observers: tuple[Observer, ...] = tuple(all_observers)
        emit = Fanout(self.observers, self._guard.failed) if self.observers else None
        self._emit = emit
        # The findings the trackers hand what they see, sharing the session tracker's lock.
        lock = new_rlock()
        self._leaks = LeakDetector(lock, emit, self.config.log_leaks)
        self._pitfalls = PitfallDetector(lock, emit, self.config.log_leaks)
        self._sessions = SessionTracker(
            self.config, emit, self._guard, lock, self._leaks, self._pitfalls
        )
        self._exhaustion = ExhaustionReporter(timeout_log_interval)
        self._pools = PoolTracker(
            self._sessions,
            emit,
            self._guard,
            every_engine=not sync_engines,
            pool_name=pool_name,
            stack_depth=stack_depth if capture_stacks else 0,
            exhaustion=self._exhaustion,
            application_name=application_name,
        )
        self._database = DatabaseView(
            self._pools,
            emit,
            self._guard,
            enabled=server_view,
            interval=server_view_interval,
            service=application_name,
        )
        if server_view:
            self._pools.first_connected = self._database.first_connected
            self._pools.server_report = self._database.timeout_lines
        self._sessions.entry_for = self._pools.entry_for
        if self._otel is not None:
            self._otel.bind(self._sessions.session_for, self._guard.failed)
            self._pools.engine_added.append(self._otel.listen)
        self.metrics: Any
        if multiprocess:
            self.metrics = push_metrics
            self._collectors: list[Any] = list(push_metrics.collectors())
        else:
            self.metrics = PrometheusCollector(
                self._sessions.snapshot, self._pools.snapshot, self._error_counts
            )
            self._collectors = [self.metrics]
        self.metrics_app = (
            None
            if self.config.metrics_path is None or registry is None
            else metrics_app(registry, self._guard.failed)
        )
        # Every worker on the page: each listens for the others (`workers.py`).
        self._worker_socket = (
            WorkerSocket(
                os.environ["PROMETHEUS_MULTIPROC_DIR"],
                _answer_of(weakref.ref(self)),
                self._guard.failed,
            )
            if multiprocess and diagnostics_path is not None
            else None
        )
        self.diagnostics_app = (
            None
            if diagnostics_path is None
            else DiagnosticsApp(
                self,
                diagnostics_path,
                diagnostics_token,
                self._guard.failed,
                workers=self._worker_socket,
                deadline=diagnostics_deadline,
            )
        )
        self._engines = [weakref.ref(engine) for engine in sync_engines]
        self._age_watcher: AgeWatcher | None = None
        self._idle_sampler: IdleInTransactionSampler | None = None
        self._apps: weakref.WeakSet[Any] = weakref.WeakSet()
        self.instrumented = False
        self.instrument()

    # -- wiring -------------------------------------------------------------------------------

    def instrument(self) -> None:
        """Start watching: metrics, listeners and hooks. Done by the constructor; again after
        `uninstrument()` it picks up where the counters were. A second call does nothing."""
        if self.instrumented:
            return
        add_library_packages(self.config.library_packages)
        if self.registry is not None:
            register_all(self.registry, self._collectors)
        self._pools.follow_again()
        for ref in self._engines:
            engine = ref()
            if engine is not None:
                self._pools.add_engine(engine)
        threshold = self.config.leak_threshold
        if threshold is not None:
            self._age_watcher = AgeWatcher(
                threshold,
                self._pools.checkouts,
                self._leaks.held_too_long,
                self._guard.failed,
            )
            self._age_watcher.start()
        idle_threshold = self.config.idle_in_transaction_threshold
        if idle_threshold is not None:
            self._idle_sampler = IdleInTransactionSampler(
                idle_threshold,
                self._pools.checkouts,
                self._sessions.idle_in_transaction,
                self._guard.failed,
                log=self.config.log_leaks,
            )
            self._idle_sampler.start()
        for purpose, method, why in wrappers.missing():
            # A SQLAlchemy release without one of the private methods we wrap, or with other
            # parameters: that piece is off, everything else works.
            self._guard.count_once(
                f"hook:{method}",
                f"session_monitor cannot see {purpose}: this SQLAlchemy {why} {method}. "
                "Everything else is monitored; please report it with your SQLAlchemy version.",
            )
        wrappers.subscribe(
            wrappers.Subscriber(
                owner=self,
                acquire_started=self._pools.acquire_started,
                acquire_finished=self._pools.acquire_finished,
                acquire_failed=self._pools.acquire_failed,
                session_acquiring=self._sessions.session_acquiring,
                session_closing=self._sessions.session_closing,
                session_flushed=self._sessions.session_flushed,
                session_closed=self._sessions.session_closed,
                session_acquire_failed=self._sessions.session_acquire_failed,
                transaction_began=self._sessions.transaction_began,
                transaction_committed=self._sessions.transaction_committed,
                transaction_rolling_back=self._sessions.transaction_rolling_back,
                transaction_closing=self._sessions.transaction_closing,
                statement_failed=self._sessions.statement_failed,
            )
        )
        self.instrumented = True

    def instrument_app(self, app: Any) -> Any:
        """Put the middleware (which also serves `metrics_path`) into a Starlette/FastAPI app.

        It is built as the outermost user middleware, whatever is added after this call: a
        middleware that closes the request's sessions (``scoped_session.remove()``) must have
        run before the request-end leak check does."""
        if app in self._apps:
            warnings.warn("session_monitor: this app is already instrumented", stacklevel=2)
            return app
        insert_middleware(app, self)
        self._apps.add(app)
        return app

    def uninstrument(self) -> None:
        """Stop watching: hooks, middleware and metrics are removed; the engines' listeners stay,
        switched off, because SQLAlchemy cannot remove a listener safely while another thread
        may be running that event. Sessions and connections open now are counted closed."""
        if not self.instrumented:
            return
        self.instrumented = False  # a middleware already built now passes requests through
        wrappers.unsubscribe(self)
        self._pools.stop_following()  # listeners stay, switched off: see its docstring
        self._sessions.stop_following()
        if self._age_watcher is not None:
            self._age_watcher.stop()
            self._age_watcher = None
        if self._idle_sampler is not None:
            self._idle_sampler.stop()
            self._idle_sampler = None
        if self._worker_socket is not None:
            self._worker_socket.stop()
        for app in list(self._apps):
            remove_middleware(app, self)
        self._apps = weakref.WeakSet()
        if self.registry is not None:
            for collector in self._collectors:
                with contextlib.suppress(KeyError):
                    self.registry.unregister(collector)
        if self._emit is not None:
            self._emit.close()

    # -- what the middleware calls (never raises) ---------------------------------------------

    def _request_finished(self, request: RequestScope) -> None:
        try:
            self._leaks.request_finished(request)
        except Exception:
            self._guard.failed("request_end")

    def _serving(self, serving: bool) -> None:
        """The app's lifespan: this process starts (or stops) serving requests, as a worker."""
        try:
            if self._worker_socket is not None:
                if serving:
                    self._worker_socket.start()
                else:
                    self._worker_socket.stop()
        except Exception:
            self._guard.failed("worker_socket")

    def _count_internal_error(self, listener: str) -> None:
        with self._errors_lock:
            self._errors[listener] = self._errors.get(listener, 0) + 1
        for observer in self.observers:
            with contextlib.suppress(Exception):
                observer.internal_error(listener)

    def _forked(self) -> None:
        self._errors = {}  # a forked child counts from zero, as a new process (`forking.py`)

    def _error_counts(self) -> dict[str, int]:
        with self._errors_lock:
            return dict(self._errors)

    # -- who holds the pool ---------------------------------------------------------------------

    def holders(self, server_view: bool = False) -> list[HolderView]:
        """Every connection checked out from a watched pool now, oldest first: what holds it,
        where it was opened, its transaction, and where its holder (thread or task) is now.

        With ``server_view=True``, each PostgreSQL holder also carries what the server says of
        its connection (`HolderView.server`: running, waiting on a lock and behind whom, idle in
        a transaction), from a reading at most ``server_view_interval`` old. That reading may
        open a connection and wait for the server, so call it off the event loop:
        ``await asyncio.to_thread(monitor.holders, server_view=True)``."""
        holders = holder_views(self._pools.checkouts(), self._pools.backend_pids())
        if not server_view:
            return holders
        _off_the_loop("holders(server_view=True)", "monitor.holders, server_view=True")
        return self._database.joined(holders)

    def database_report(self, holders: list[HolderView] | None = None) -> list[dict[str, Any]]:
        """Each pool's server side (PostgreSQL): what its holders are doing at the server,
        connections the pools lost, and the sizing verdicts. Waits for the server like
        ``holders(server_view=True)``: call it off the event loop. `holders`: whose to join,
        e.g. every worker's (the diagnostics page); by default this process's."""
        _off_the_loop("database_report()", "monitor.database_report")
        return [self._database.pool_report(state, holders) for state in self._pools.states()]

    def pool_usage(self) -> list[PoolUsage]:
        """Each watched pool now: connections used and idle, callers waiting, its bound."""
        return [
            PoolUsage(state.name, *self._pools.usage(state)) for state in self._pools.states()
        ]

    def recent_leaks(self) -> list[tuple[float, str, SessionView]]:
        """The last leaks, oldest first: (time.time(), reason, the session)."""
        return list(self._leaks.recent)

    def recent_pitfalls(self) -> list[Pitfall]:
        """The last pitfalls caught, oldest first (docs/pitfalls.md)."""
        return list(self._pitfalls.recent)

    def pool_events(self) -> list[PoolEvent]:
        """The last pool timeouts and cancelled waits, newest last, with who held the pool."""
        return list(self._exhaustion.recent)

    # -- introspection, for tests and the benchmark --------------------------------------------

    @property
    def tracked_sessions(self) -> int:
        """ORM sessions open now that the monitor holds state for."""
        return self._sessions.live_sessions

    @property
    def tracked_checkouts(self) -> int:
        return self._pools.tracked_checkouts

    def view_of(self, session: Session) -> SessionView | None:
        """The view of an ORM session this monitor counts as open now; None if it has not used
        the database yet, is closed, or is on an engine not watched."""
        tracked = self._sessions.tracked(session)
        return None if tracked is None else tracked.view


def _answer_of(monitor: weakref.ref[SessionMonitor]) -> Callable[[], bytes]:
    # Weakly: the listening thread must not keep a monitor alive that nobody uses.
    def answer() -> bytes:
        alive = monitor()
        if alive is None:
            raise RuntimeError("the monitor is gone")
        return worker_answer(alive)

    return answer
