"""FastAPI's own tutorial tests, run with and without session_monitor: `python -m tests.fastapi_tutorials.run`."""
