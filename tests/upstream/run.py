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
import fcntl
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "upstream"
POSTGRES_ENV = "SESSION_MONITOR_TEST_POSTGRES_URL"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

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
PIP_TIMEOUT = 900  # pip prepares the sdist's metadata, which installs its build requirements
BAD = frozenset({"failed", "error"})
GOOD = frozenset({"passed", "xpassed", "xfailed"})


class SuiteUnavailable(Exception):
    pass


class RunCrashed(Exception):
    pass


# -- the suite ---------------------------------------------------------------------------------


def _ignored_cache() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    marker = CACHE / ".gitignore"
    if not marker.exists():
        # Like pytest's and mypy's caches: ignored by git whatever the repository's .gitignore.
        marker.write_text("# created by tests/upstream/run.py\n*\n")
    return CACHE


@contextlib.contextmanager
def exclusive(name: str) -> Iterator[None]:
    """Hold the cache's lock `name`: runs of this script in other processes (another venv,
    another worker's pytest) share the cache and the PostgreSQL database."""
    path = _ignored_cache() / "locks" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.lock"
    path.parent.mkdir(exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another run to release {path.name} ...", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fetch_sdist(version: str) -> Path:
    cache = _ignored_cache()
    sdist = cache / f"sqlalchemy-{version}.tar.gz"
    if sdist.exists():
        return sdist
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as download:
        # --no-binary for sqlalchemy alone: its build requirements may still come as wheels,
        # which is what makes preparing the sdist's metadata take seconds rather than minutes.
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            "sqlalchemy",
            "--disable-pip-version-check",
            f"sqlalchemy=={version}",
            "-d",
            download,
        ]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=PIP_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired:
            raise SuiteUnavailable(
                f"pip download of the sqlalchemy {version} sdist took over {PIP_TIMEOUT}s"
            ) from None
        found = sorted(Path(download).glob("*.tar.gz"))
        if done.returncode != 0 or not found:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            tail = re.sub(r"\b\w+://\S+", "<url>", tail)  # no index address in a message
            raise SuiteUnavailable(
                f"pip could not download the sqlalchemy {version} sdist "
                f"(exit {done.returncode}):\n{tail}"
            )
        os.replace(found[0], sdist)
    return sdist


def _wanted(name: str) -> str | None:
    """The member's path inside the sdist's top directory, if it is one to extract."""
    parts = PurePosixPath(name).parts
    if len(parts) < 2 or any(part in ("", ".", "..") for part in parts) or name.startswith("/"):
        return None
    inner = "/".join(parts[1:])
    if any(inner == want or (want.endswith("/") and inner.startswith(want)) for want in EXTRACTED):
        return inner
    return None


def extract(sdist: Path, destination: Path) -> Path:
    if (destination / ".complete").exists():
        return destination
    work = Path(tempfile.mkdtemp(dir=destination.parent, prefix=".extract-"))
    try:
        with tarfile.open(sdist) as archive:
            for member in archive:
                inner = _wanted(member.name)
                if inner is None or not member.isfile():
                    continue  # no links, devices or directories taken from the archive
                source = archive.extractfile(member)
                assert source is not None
                target = work / inner
                target.parent.mkdir(parents=True, exist_ok=True)
                with source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out)
        for required in ("test/conftest.py", "lib/sqlalchemy/testing/plugin/bootstrap.py"):
            if not (work / required).is_file():
                raise SuiteUnavailable(f"{sdist.name} has no {required}")
        (work / ".complete").write_text(sdist.name + "\n")
        work.chmod(0o755)  # mkdtemp's 0o700 is for the temporary name only
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(work, destination)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return destination


def obtain_suite(version: str) -> Path:
    with exclusive(f"suite-{version}"):
        sdist = fetch_sdist(version)
        try:
            return extract(sdist, CACHE / f"sqlalchemy-{version}")
        except (tarfile.TarError, EOFError, OSError) as error:
            sdist.unlink(missing_ok=True)  # a truncated download: fetched again next time
            raise SuiteUnavailable(f"cannot extract {sdist.name}: {error}") from None


# -- running it --------------------------------------------------------------------------------


@dataclass
class Run:
    mode: str  # "without" or "with"
    outcomes: dict[str, str]
    details: dict[str, str]
    seconds: float
    log: Path
    monitor: dict[str, Any] = field(default_factory=dict)
    sqlalchemy: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for outcome in self.outcomes.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        return counts

    def line(self) -> str:
        counts = self.counts()
        order = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
        shown = ", ".join(f"{counts[o]} {o}" for o in order if counts.get(o))
        return f"{len(self.outcomes)} tests: {shown or 'none'} ({self.seconds:.1f}s)"


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

    url = make_url(os.environ.get(POSTGRES_ENV) or DEFAULT_POSTGRES_URL)
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


def pytest_command(
    suite: Path,
    mode: str,
    files: dict[str, Path],
    dburis: list[str],
    targets: list[str],
    extra: list[str],
    monitor_options: list[str],
) -> list[str]:
    command = [
        sys.executable,
        # No user site: test/conftest.py then leaves sys.path alone.
        "-s",
        "-m",
        "pytest",
        "--rootdir",
        str(suite),
        "-p",
        "no:cacheprovider",
        # session_monitor's own pytest plugin (its pytest11 entry point): only inject.py may
        # bring the monitor in, and the run without it must not import the package at all.
        "-p",
        "no:session_monitor",
        "-p",
        "tests.upstream.outcomes",
        "--upstream-outcomes",
        str(files["outcomes"]),
        "-q",
        "--tb=short",
        "--maxfail=1000000",
    ]
    if mode == "with":
        command += [
            "-p",
            "tests.upstream.inject",
            "--monitor-report",
            str(files["monitor"]),
            *monitor_options,
        ]
    for uri in dburis:
        command += ["--dburi", uri]
    return [*command, *extra, *targets]


def run_suite(
    suite: Path,
    mode: str,
    work: Path,
    dburis: list[str],
    targets: list[str],
    extra: list[str],
    monitor_options: list[str],
    tag: str = "",
) -> Run:
    work.mkdir(parents=True, exist_ok=True)
    files = {
        "outcomes": work / f"outcomes-{mode}{tag}.json",
        "monitor": work / f"monitor{tag}.json",
        "log": work / f"pytest-{mode}{tag}.log",
    }
    outcomes_path, monitor_path, log = files["outcomes"], files["monitor"], files["log"]
    for stale in (outcomes_path, monitor_path if mode == "with" else None):
        if stale is not None:
            stale.unlink(missing_ok=True)
    # Nothing of a pytest this may run under: its options, plugins or current test.
    inherited = ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTEST_CURRENT_TEST")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # Absolute targets and a working directory of the run's own: SQLite's test_schema files
    # and the like are made in the current directory. Node ids stay relative to the suite.
    targets = [str(suite / target) for target in targets]
    command = pytest_command(suite, mode, files, dburis, targets, extra, monitor_options)
    started = time.perf_counter()
    cwd = work / "cwd"
    cwd.mkdir(exist_ok=True)
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1) or not outcomes_path.exists():
        raise RunCrashed(f"the run {mode} the monitor exited {done.returncode}; see {log}")
    data = json.loads(outcomes_path.read_text())
    run = Run(mode, data["outcomes"], data["details"], seconds, log, sqlalchemy=data["sqlalchemy"])
    if mode == "with":
        if not monitor_path.exists():
            raise RunCrashed(f"the monitor plugin wrote no report; see {log}")
        run.monitor = json.loads(monitor_path.read_text())
    return run


# -- comparing ---------------------------------------------------------------------------------


@dataclass
class Comparison:
    regressions: dict[str, tuple[str, str]]  # passes without the monitor, fails or errors with
    other: dict[str, tuple[str, str]]  # any other change (a test skipped only with it, ...)
    flaky: dict[str, tuple[str, str]] = field(default_factory=dict)  # not again on a rerun


def compare(without: Run, with_: Run) -> Comparison:
    regressions: dict[str, tuple[str, str]] = {}
    other: dict[str, tuple[str, str]] = {}
    for nodeid in sorted(set(without.outcomes) | set(with_.outcomes)):
        before = without.outcomes.get(nodeid, "missing")
        after = with_.outcomes.get(nodeid, "missing")
        if before == after:
            continue
        if before in GOOD and (after in BAD or after == "missing"):
            regressions[nodeid] = (before, after)
        else:
            other[nodeid] = (before, after)
    return Comparison(regressions, other)


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


def _relative(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(ROOT))
    return str(path)


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0][:160] if lines else ""


def monitor_lines(monitor: dict[str, Any]) -> list[str]:
    totals = monitor["totals"]
    errors = monitor["internal_errors"]
    lines = [
        "monitor: sessions opened {sessions_opened} closed {sessions_closed}, checkouts "
        "{checkouts} checkins {checkins}, connections created {connections_created}, "
        "invalidations {invalidations}, timeouts {timeouts}".format(**totals),
        f"         leaks {monitor['leaks'] or '{}'}, transactions {monitor['transactions'] or '{}'}",
        f"internal errors: {sum(errors.values())} {errors or ''}".rstrip(),
    ]
    lines += [f"  {_first_line(text)}" for text in monitor["error_logs"]]
    return lines


def report(without: Run | None, with_: Run | None, comparison: Comparison | None) -> list[str]:
    lines = []
    for run in (without, with_):
        if run is not None:
            label = f"{run.mode} monitor:".ljust(16)
            lines.append(f"{label}{run.line()}  log: {_relative(run.log)}")
    if with_ is not None:
        lines += monitor_lines(with_.monitor)
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
            for nodeid, (before, after) in changes.items():
                lines.append(f"  {before} -> {after}  {nodeid}")
                if nodeid in details:
                    lines.append(f"      {_first_line(details[nodeid])}")
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
        f"${POSTGRES_ENV} or {DEFAULT_POSTGRES_URL}, plus its asyncpg twin",
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
        suite = obtain_suite(version)
    except SuiteUnavailable as error:
        print(f"SQLAlchemy {version}'s test suite is unavailable: {error}", file=sys.stderr)
        return 3
    modules = args.module or [m for m in MODULES if (suite / m).is_file()]
    unknown = [m for m in modules if not (suite / m.split("::", 1)[0]).exists()]
    if unknown:
        print(f"not in SQLAlchemy {version}'s suite: {' '.join(unknown)}", file=sys.stderr)
        return 2
    pytest_args = [*(["--backend-only"] if args.backend_only else []), *args.pytest_args]
    dburis = dburis_for(args.db, args.dburi)
    work = CACHE / "runs" / f"{version}-{args.db}{'-otel' if args.otel else ''}"
    monitor_options = ["--monitor-leak-threshold", str(args.leak_threshold)]
    if args.no_stacks:
        monitor_options.append("--monitor-no-stacks")
    if args.otel:
        monitor_options.append("--monitor-otel")
    print(f"SQLAlchemy {version} at {Path(sqlalchemy.__file__).parent}")
    print(f"{len(modules)} modules on {' '.join(dburis)}", flush=True)

    def execute(mode: str, targets: list[str], tag: str = "") -> Run:
        run = run_suite(suite, mode, work, dburis, targets, pytest_args, monitor_options, tag)
        if run.sqlalchemy.get("file") != str(Path(sqlalchemy.__file__).resolve()):
            raise RunCrashed(f"the tests ran {run.sqlalchemy}, not {sqlalchemy.__file__}")
        return run

    try:
        with contextlib.ExitStack() as locks:
            for name in [f"runs-{work.name}", *database_locks(dburis)]:
                locks.enter_context(exclusive(name))
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
    errors = sum(with_.monitor["internal_errors"].values()) if with_ else 0
    failed_log = with_.monitor["error_log_records"] if with_ else 0
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
                    "runs": {
                        run.mode: {"counts": run.counts(), "seconds": round(run.seconds, 1)}
                        for run in (without, with_)
                        if run is not None
                    },
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
