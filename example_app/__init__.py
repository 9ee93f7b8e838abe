"""The example application of session_monitor: FastAPI's SQL tutorial, monitored, plus failures.

- `example_app.app`: the app (`create_app()`, and `app` for `uvicorn example_app.app:app`).
- `example_app.db`: engine with a deliberately small pool, `SessionLocal`, `Item`, `get_db`.
- `example_app.demo`: the `/demo` router reproducing leaks, rollbacks and pool exhaustion.
- `example_app.loadgen`: traffic with a realistic mix of those, and a summary of what it caused.

`python -m example_app` serves it on http://127.0.0.1:8000 (see /docs, /metrics, and
/_session_monitor: who holds the pool right now).
"""
