"""SQLAlchemy's own test suite, run with and without session_monitor: `python -m tests.upstream.run`."""
