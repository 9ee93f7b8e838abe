"""`python -m example_app`: serve the example app with uvicorn (SQLite by default)."""

from __future__ import annotations

import argparse
import logging

import uvicorn


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m example_app",
        description="Serve the session_monitor example app.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    args = parser.parse_args(argv)

    # Without this the app's own INFO lines (such as where spans go) would be dropped.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")

    # Imported after logging is set up, because building the app logs.
    from sqlalchemy import make_url

    from example_app.app import DIAGNOSTICS_PATH, app
    from example_app.db import DATABASE_URL

    base = f"http://{args.host}:{args.port}"
    print(f"database: {make_url(DATABASE_URL).render_as_string(hide_password=True)}")
    print(f"metrics:  {base}/metrics")
    print(f"holders:  {base}{DIAGNOSTICS_PATH}")
    print(f"docs:     {base}/docs")
    print(f"load:     python -m example_app.loadgen --base-url {base}")
    # One process, no reload: the monitor's gauges live in this process's registry.
    uvicorn.run(app, host=args.host, port=args.port, reload=False)


if __name__ == "__main__":
    main()
