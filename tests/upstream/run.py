"""Run SQLAlchemy's own test suite with and without session_monitor, and compare the outcomes.

    python -m tests.upstream.run [--db sqlite|postgresql] [--with-monitor|--without-monitor|--compare]

The suite is the one released with the *installed* SQLAlchemy (``sqlalchemy.__version__``): its
sdist, fetched once with pip and cached under ``.cache/upstream/``, holds ``test/`` and the pytest
plugin it is meant to run with. The tests import the installed package, never the sdist's copy:
only ``lib/sqlalchemy/testing/plugin/`` (which ``test/conftest.py`` loads by path) is extracted
from ``lib/``, and the outcomes plugin refuses a run whose ``sqlalchemy`` resolves into the suite.

``--compare`` (the default) runs the chosen modules twice with the same options, without and with
the monitor, and exits 1 if a test that passes without the monitor fails or errors with it (and
does so again when its module is run once more both ways), if a test disappears, or if the
monitor counted or logged an internal error. Exit 3: the suite could not be obtained; 4: a run
crashed. Each run works in a directory of its own under ``.cache/upstream/runs/``, and runs that
would share it or a PostgreSQL database wait for each other (locks in ``.cache/upstream/locks/``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from tests.sdist_suite.obtain import SuiteUnavailable, exclusive, obtain_suite
from tests.sdist_suite.runs import (
    ROOT,
    Comparison,
    Run,
    RunCrashed,
    change_lines,
    compare,
    run_lines,
    run_suite,
    runs_summary,
)

CACHE = ROOT / ".cache" / "upstream"
POSTGRES_ENV = "SESSION_MONITOR_TEST_POSTGRES_URL"

# What the monitor hooks: pools and checkouts, Connection transactions, Session open/close and
# transactions, the asyncio facades over all of them; then what also goes through those paths
# (invalidation and reconnects, events, binds, scoped sessions, logging, deprecated APIs, flush
# and its rollbacks, sessions over several engines, the drivers' own connection handling).
# Modules a release lacks are left out; those of another dialect collect and skip in a second.
MODULES = (
    "test/engine/test_pool.py",
    "test/engine/test_transaction.py",
    "test/engine/test_execute.py",
    "test/engine/test_reconnect.py",
    "test/engine/test_logging.py",
    "test/engine/test_deprecations.py",
    "test/orm/test_session.py",
    "test/orm/test_transaction.py",
    "test/orm/test_bind.py",
    "test/orm/test_scoping.py",
    "test/orm/test_events.py",
    "test/orm/test_session_state_change.py",
    "test/orm/test_deprecations.py",
    "test/orm/test_unitofworkv2.py",
    "test/orm/test_expire.py",
    "test/orm/test_versioning.py",
    "test/ext/test_horizontal_shard.py",
    "test/ext/asyncio/test_engine.py",
    "test/ext/asyncio/test_session.py",
    "test/ext/asyncio/test_scoping.py",
    "test/ext/asyncio/test_cancellation.py",
    "test/dialect/sqlite/test_dialect.py",
    "test/dialect/postgresql/test_dialect.py",
    "test/dialect/postgresql/test_async_pg.py",
)
# Of the sdist, only what running its tests needs; nothing that could be imported as sqlalchemy.
EXTRACTED = ("test/", "lib/sqlalchemy/testing/plugin/", "setup.cfg", "pyproject.toml")
REQUIRED = ("test/conftest.py", "lib/sqlalchemy/testing/plugin/bootstrap.py")
PIP_TIMEOUT = 900  # pip prepares the sdist's metadata, which installs its build requirements


def dburis_for(db: str, explicit: list[str] | None) -> list[str]:
    if explicit:
        return explicit
    have = importlib.util.find_spec
    if db == "sqlite":
        # The asyncio tests need an async driver; the backend tests run on each URI.
        return ["sqlite:///:memory:"] + (
            ["sqlite+aiosqlite:///:memory:"] if have("aiosqlite") else []
        )
    from sqlalchemy import make_url

    configured = os.environ.get(POSTGRES_ENV)
    if not configured:
        raise SystemExit(
            f"--db postgresql: set {POSTGRES_ENV} to the server and database SQLAlchemy's tests "
            "may use (postgresql+psycopg://user@host:port/<database>), or give --dburi"
        )
    url = make_url(configured)
    uris = [url.render_as_string(hide_password=False)]
    async_driver = "asyncpg" if have("asyncpg") else "psycopg_async" if have("psycopg") else None
    if async_driver is not None:
        async_url = url.set(drivername=f"postgresql+{async_driver}")
        uris.append(async_url.render_as_string(hide_password=False))
    return uris


def database_locks(dburis: list[str]) -> list[str]:
    """A lock per server database the URIs name: two runs' tables must not meet there."""
    from sqlalchemy import make_url

    locks = set()
    for uri in dburis:
        url = make_url(uri)
        if url.get_backend_name() != "sqlite":
            locks.add(f"db-{url.get_backend_name()}-{url.host}-{url.port}-{url.database}")
    return sorted(locks)


def recheck(comparison: Comparison, rerun: Callable[[str, list[str]], Run]) -> None:
    """Run the regressed tests' modules once more both ways; keep what regresses again."""
    if not comparison.regressions:
        return
    modules = sorted({nodeid.split("::", 1)[0] for nodeid in comparison.regressions})
    without, with_ = rerun("without", modules), rerun("with", modules)
    again = compare(without, with_)
    for nodeid in list(comparison.regressions):
        if nodeid not in again.regressions:
            comparison.flaky[nodeid] = comparison.regressions.pop(nodeid)


def report(without: Run | None, with_: Run | None, comparison: Comparison | None) -> list[str]:
    lines = run_lines(without, with_)
    if comparison is None:
        return lines
    if not (comparison.regressions or comparison.flaky or comparison.other):
        lines.append("differences: none")
    details = with_.details if with_ is not None else {}
    for title, changes in (
        ("REGRESSIONS (pass without the monitor, fail with it)", comparison.regressions),
        ("not reproduced when their module ran again (flaky?)", comparison.flaky),
        ("other differences", comparison.other),
    ):
        if changes:
            lines.append(f"{title}: {len(changes)}")
            lines += change_lines(changes, details)
    return lines


# -- the command -------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.upstream.run",
        description="SQLAlchemy's own tests, without and with session_monitor injected.",
        epilog="Arguments after -- go to pytest unchanged (e.g. -- -k pool).",
    )
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument(
        "--dburi",
        action="append",
        metavar="URI",
        help="instead of --db's URIs (repeatable); postgresql: "
        f"${POSTGRES_ENV}, plus its asyncpg twin",
    )
    mode = parser.add_mutually_exclusive_group()
    for flag, const, text in (
        ("--with-monitor", "with", "one run, with the monitor injected"),
        ("--without-monitor", "without", "one run, plain SQLAlchemy"),
        ("--compare", "compare", "both, and compare (the default)"),
    ):
        mode.add_argument(flag, dest="mode", action="store_const", const=const, help=text)
    parser.set_defaults(mode="compare")
    parser.add_argument(
        "--module", action="append", metavar="PATH", help="test module(s) instead of the set"
    )
    parser.add_argument(
        "--backend-only",
        action="store_true",
        help="only SQLAlchemy's backend tests (its way to run a second database: the others "
        "use no database, or the same SQLite whatever --db says)",
    )
    parser.add_argument(
        "--no-recheck",
        action="store_true",
        help="count every regression, without running its module again to rule out flakiness",
    )
    parser.add_argument(
        "--leak-threshold",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="the monitor's leak_threshold (default 1.0, so its age watcher runs); 0 = off",
    )
    parser.add_argument("--no-stacks", action="store_true", help="capture_stacks=False")
    parser.add_argument(
        "--otel", action="store_true", help="the monitor with its OpenTelemetry observer too"
    )
    parser.add_argument(
        "--summary-json", type=Path, metavar="PATH", help="also write the result here as JSON"
    )
    parser.add_argument("pytest_args", nargs="*", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import sqlalchemy

    version = sqlalchemy.__version__
    try:
        suite = obtain_suite(
            "sqlalchemy", version, CACHE, EXTRACTED, REQUIRED, pip_timeout=PIP_TIMEOUT
        )
    except SuiteUnavailable as error:
        print(f"SQLAlchemy {version}'s test suite is unavailable: {error}", file=sys.stderr)
        return 3
    modules = args.module or [m for m in MODULES if (suite / m).is_file()]
    unknown = [m for m in modules if not (suite / m.split("::", 1)[0]).exists()]
    if unknown:
        print(f"not in SQLAlchemy {version}'s suite: {' '.join(unknown)}", file=sys.stderr)
        return 2
    dburis = dburis_for(args.db, args.dburi)
    # SQLAlchemy's own addopts stop at 250 failures: a broken monitor must show all of them.
    options = ["--maxfail=1000000"]
    for uri in dburis:
        options += ["--dburi", uri]
    options += [*(["--backend-only"] if args.backend_only else []), *args.pytest_args]
    work = CACHE / "runs" / f"{version}-{args.db}{'-otel' if args.otel else ''}"
    monitor_options = ["--monitor-leak-threshold", str(args.leak_threshold)]
    if args.no_stacks:
        monitor_options.append("--monitor-no-stacks")
    if args.otel:
        monitor_options.append("--monitor-otel")
    print(f"SQLAlchemy {version} at {Path(sqlalchemy.__file__).parent}")
    print(f"{len(modules)} modules on {' '.join(dburis)}", flush=True)

    def execute(mode: str, targets: list[str], tag: str = "") -> Run:
        return run_suite(
            suite,
            "sqlalchemy",
            mode,
            work,
            targets,
            options,
            monitor_options=monitor_options,
            tag=tag,
        )

    try:
        with contextlib.ExitStack() as locks:
            for name in [f"runs-{work.name}", *database_locks(dburis)]:
                locks.enter_context(exclusive(CACHE, name))
            without = execute("without", modules) if args.mode != "with" else None
            with_ = execute("with", modules) if args.mode != "without" else None
            comparison = None
            if without is not None and with_ is not None:
                comparison = compare(without, with_)
                if not args.no_recheck:
                    recheck(comparison, lambda mode, targets: execute(mode, targets, "-recheck"))
    except RunCrashed as error:
        print(f"CRASHED: {error}")
        return 4
    lines = report(without, with_, comparison)
    print("\n".join(lines))
    errors = with_.internal_errors if with_ else 0
    failed_log = with_.errors_logged if with_ else 0
    regressions = comparison.regressions if comparison else {}
    if args.summary_json:
        args.summary_json.write_text(
            json.dumps(
                {
                    "sqlalchemy": version,
                    "dburis": dburis,
                    "modules": modules,
                    "report": lines,
                    "regressions": regressions,
                    "flaky": comparison.flaky if comparison else {},
                    "other": comparison.other if comparison else {},
                    "internal_errors": with_.monitor["internal_errors"] if with_ else {},
                    "runs": runs_summary(without, with_),
                },
                indent=1,
            )
        )
    if regressions or errors or failed_log:
        print(
            f"FAILED: {len(regressions)} test(s) broken by the monitor, "
            f"{errors} internal error(s) counted, {failed_log} error(s) logged by the monitor"
        )
        return 1
    if comparison is not None:
        print("OK: no test outcome changed by the monitor, and no internal error")
    return 0


if __name__ == "__main__":
    sys.exit(main())
