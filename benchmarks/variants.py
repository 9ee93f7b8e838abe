"""The instrumentations compared: each one applied to an engine, and removed again."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, event

from session_monitor import SessionMonitor

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

Undo = Callable[[], None]


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    instrument: Callable[[Engine], Undo]


def _bare(engine: Engine) -> Undo:
    return lambda: None


def monitor(engine: Engine, **options: Any) -> SessionMonitor:
    """session_monitor on `engine`, its metrics in a registry of its own."""
    return SessionMonitor(engine, registry=CollectorRegistry(), **options)


def _default(engine: Engine) -> Undo:
    return monitor(engine).uninstrument


def _stacks(engine: Engine) -> Undo:
    return monitor(engine, capture_stacks=True).uninstrument


def otel_providers() -> tuple[TracerProvider, MeterProvider]:
    """SDK providers that do all the work of recording but export nowhere."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class Discard(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tracer_provider = TracerProvider(shutdown_on_exit=False)
    tracer_provider.add_span_processor(SimpleSpanProcessor(Discard()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()], shutdown_on_exit=False)
    return tracer_provider, meter_provider


def _otel(engine: Engine) -> Undo:
    tracer_provider, meter_provider = otel_providers()
    watched = monitor(engine, tracer_provider=tracer_provider, meter_provider=meter_provider)

    def undo() -> None:
        watched.uninstrument()
        tracer_provider.shutdown()
        meter_provider.shutdown()

    return undo


def _otel_contrib(engine: Engine) -> Undo:
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    tracer_provider, meter_provider = otel_providers()
    # Its declared range stops below SQLAlchemy 2.1; it works there, so skip the check.
    SQLAlchemyInstrumentor().instrument(
        engine=engine,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        skip_dep_check=True,
    )

    def undo() -> None:
        SQLAlchemyInstrumentor().uninstrument()
        tracer_provider.shutdown()
        meter_provider.shutdown()

    return undo


# fastapi-sqlalchemy-monitor ships no py.typed: it is imported by name, its objects typed Any.
PEER_PACKAGE = "fastapi_sqlalchemy_monitor"


def peer_actions() -> list[Any]:
    """The actions of fastapi-sqlalchemy-monitor's README quick start, as it configures them."""
    action = importlib.import_module(f"{PEER_PACKAGE}.action")
    return [action.WarnMaxTotalInvocation(max_invocations=10), action.PrintStatistics()]


def peer_middleware() -> Any:
    """fastapi-sqlalchemy-monitor's middleware class, for ``app.add_middleware``."""
    return importlib.import_module(PEER_PACKAGE).SQLAlchemyMonitor


async def _no_app(scope: Any, receive: Any, send: Any) -> None:
    """Stands for the ASGI app the middleware wraps: the micro benchmark serves no request."""


def _fastapi_sqlalchemy_monitor(engine: Engine) -> Undo:
    # What one request under the middleware of the README's quick start does to the database
    # work, without HTTP: Starlette builds the middleware with the app it wraps and the
    # add_middleware() keywords, and its __init__ registers the two cursor-execute listeners on
    # the engine; at the start of each request dispatch() sets the ContextVar those listeners
    # update (init_statistics). The actions run after the response, never during the database
    # work, so they are passed as the README does but not called here.
    middleware = peer_middleware()(_no_app, engine=engine, actions=peer_actions())
    middleware.init_statistics()

    def undo() -> None:
        # The package never removes its listeners; the benchmark does, to leave bare blocks bare.
        event.remove(engine, "before_cursor_execute", middleware.before_cursor_execute)
        event.remove(engine, "after_cursor_execute", middleware.after_cursor_execute)
        middleware.request_context.set(None)

    return undo


BARE = Variant("bare", "bare", _bare)
DEFAULT = Variant("default", "session_monitor default", _default)
STACKS = Variant("stacks", "session_monitor capture_stacks=True", _stacks)
OTEL = Variant("otel", "session_monitor + OTel (tracing.py)", _otel)
OTEL_CONTRIB = Variant("otel-contrib", "opentelemetry-instrumentation-sqlalchemy", _otel_contrib)
FASTAPI_SQLALCHEMY_MONITOR = Variant(
    "fastapi-sqlalchemy-monitor", "fastapi-sqlalchemy-monitor", _fastapi_sqlalchemy_monitor
)
# The other libraries session_monitor's default cost is compared with, op by op.
PEERS = (OTEL_CONTRIB, FASTAPI_SQLALCHEMY_MONITOR)


def _missing(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except ImportError as error:
        return f"{module} cannot be imported ({error})"
    except Exception as error:  # a module being written may fail in any way
        return f"{module} fails to import ({type(error).__name__}: {error})"
    return None


def _probe(variant: Variant, path: str) -> str | None:
    """Instrument and uninstrument a scratch engine once; return why it failed, if it did."""
    from .common import file_engine

    engine = file_engine(path)
    try:
        variant.instrument(engine)()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    finally:
        engine.dispose()
    return None


def available(scratch_db: str) -> tuple[list[Variant], dict[str, tuple[str, str]]]:
    """The variants this installation can run, and (label, why) for each one skipped."""
    chosen = [BARE, DEFAULT, STACKS]
    skipped: dict[str, tuple[str, str]] = {}
    reason = None
    if importlib.util.find_spec("session_monitor.exporters.tracing") is None:
        reason = "session_monitor/tracing.py does not exist yet"
    if reason is None:
        reason = _missing("session_monitor.exporters.tracing")
    if reason is None:
        reason = _missing("opentelemetry.sdk.trace") or _probe(OTEL, scratch_db)
    if reason is None:
        chosen.append(OTEL)
    else:
        skipped[OTEL.key] = (OTEL.label, reason)
    for peer, module in (
        (OTEL_CONTRIB, "opentelemetry.instrumentation.sqlalchemy"),
        (FASTAPI_SQLALCHEMY_MONITOR, PEER_PACKAGE),
    ):
        reason = _missing(module) or _probe(peer, scratch_db)
        if reason is None:
            chosen.append(peer)
        else:
            skipped[peer.key] = (peer.label, reason)
    return chosen, skipped


def peer_missing() -> str | None:
    """Why fastapi-sqlalchemy-monitor cannot be used, or None."""
    return _missing(PEER_PACKAGE)
