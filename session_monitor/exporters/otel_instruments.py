"""The OpenTelemetry instruments, one per row of the metrics table that has an OpenTelemetry name
(`metric_table.py`): names, units, help and buckets come from there."""

from __future__ import annotations

from typing import Any

from opentelemetry import metrics

from . import metric_table as table


def _instrument(meter: metrics.Meter, spec: table.MetricSpec) -> Any:
    """The OpenTelemetry instrument of one row of the metrics table."""
    if spec.kind == "histogram":
        return meter.create_histogram(
            spec.otel_name,
            spec.unit,
            spec.documentation,
            explicit_bucket_boundaries_advisory=spec.buckets,
        )
    if spec.kind == "gauge":  # the conventions make pool sizes UpDownCounters
        return meter.create_up_down_counter(spec.otel_name, spec.unit, spec.documentation)
    return meter.create_counter(spec.otel_name, spec.unit, spec.documentation)


class Instruments:
    def __init__(self, meter: metrics.Meter) -> None:
        made = {spec.name: _instrument(meter, spec) for spec in table.ALL_METRICS if spec.otel_name}
        self.connection_count = made[table.CONNECTION_COUNT.name]
        self.connection_max = made[table.CONNECTION_MAX.name]
        self.pending_requests = made[table.PENDING_REQUESTS.name]
        self.timeouts = made[table.TIMEOUTS.name]
        self.wait_time = made[table.WAIT_TIME.name]
        self.use_time = made[table.USE_TIME.name]
        self.create_time = made[table.CREATE_TIME.name]
        self.invalidations = made[table.INVALIDATIONS.name]
        self.closed_connections = made[table.CONNECTIONS_CLOSED.name]
        self.server_view_failures = made[table.SERVER_VIEW_FAILURES.name]
        self.sessions_opened = made[table.SESSIONS_OPENED.name]
        self.sessions_closed = made[table.SESSIONS_CLOSED.name]
        self.sessions_active = made[table.SESSIONS_ACTIVE.name]
        self.session_duration = made[table.SESSION_DURATION.name]
        self.sessions_leaked = made[table.SESSIONS_LEAKED.name]
        self.transactions = made[table.TRANSACTIONS.name]
        self.transaction_duration = made[table.TRANSACTION_DURATION.name]
        self.internal_errors = made[table.INTERNAL_ERRORS.name]
        self.waited_checkouts = made[table.WAITED.name]
        self.cancelled_waits = made[table.CANCELLED_WAITS.name]
        self.idle_in_transaction = made[table.IDLE_IN_TRANSACTION.name]
        self.pitfalls = made[table.PITFALLS.name]
