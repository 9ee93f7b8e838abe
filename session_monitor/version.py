"""The package's version, one line: read by `__init__` and by the OpenTelemetry scope."""

__version__ = "0.1.0"
