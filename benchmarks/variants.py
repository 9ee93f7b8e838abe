"""The instrumentations compared: each one applied to an engine, and removed again."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from sqlalchemy import Engine

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


BARE = Variant("bare", "bare", _bare)
DEFAULT = Variant("default", "session_monitor default", _default)
STACKS = Variant("stacks", "session_monitor capture_stacks=True", _stacks)
OTEL = Variant("otel", "session_monitor + OTel (tracing.py)", _otel)
OTEL_CONTRIB = Variant("otel-contrib", "opentelemetry-instrumentation-sqlalchemy", _otel_contrib)


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
    if importlib.util.find_spec("session_monitor.tracing") is None:
        reason = "session_monitor/tracing.py does not exist yet"
    if reason is None:
        reason = _missing("session_monitor.tracing")
    if reason is None:
        reason = _missing("opentelemetry.sdk.trace") or _probe(OTEL, scratch_db)
    if reason is None:
        chosen.append(OTEL)
    else:
        skipped[OTEL.key] = (OTEL.label, reason)
    reason = _missing("opentelemetry.instrumentation.sqlalchemy") or _probe(
        OTEL_CONTRIB, scratch_db
    )
    if reason is None:
        chosen.append(OTEL_CONTRIB)
    else:
        skipped[OTEL_CONTRIB.key] = (OTEL_CONTRIB.label, reason)
    return chosen, skipped
