"""Where the events and counters go out: Prometheus (one metric table, a collector, the
multiprocess form) and OpenTelemetry (spans and metrics). Each is an observer or a collector;
nothing below knows which exporters listen."""
