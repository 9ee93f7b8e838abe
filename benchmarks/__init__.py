"""Benchmarks of session_monitor: its cost per session, checkout and request, against bare.

Run them with ``python -m benchmarks`` (``--quick`` for a smoke run); see benchmarks/README.md.
"""
