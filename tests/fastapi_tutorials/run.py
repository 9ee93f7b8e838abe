"""Run FastAPI's own tutorial tests with and without session_monitor, and compare.

    python -m tests.fastapi_tutorials.run [--summary-json PATH] [-- pytest args]

The tests are those released with the *installed* FastAPI (``fastapi.__version__``): its sdist,
fetched once with pip and cached under ``.cache/fastapi_tutorials/``, holds ``tests/test_tutorial/``
and the tutorial apps they import (``docs_src/``). Only those two folders are extracted, never
the sdist's ``fastapi/``, and ``tutorial_routes.py`` refuses a run whose ``fastapi`` is not the
installed one. The chosen tutorials are those of an app with a database or a request's life
around it: SQL databases, bigger applications, dependencies, events and lifespan, WebSockets,
sub-applications, behind a proxy, background tasks, middleware, testing dependencies.

Both runs enable FastAPI's own telemetry (a tracer provider that exports nowhere), so FastAPI
reports the route of every request it serves. The second run adds one ``SessionMonitor()``
watching every engine (``tests/upstream/inject.py``) and instruments every app the tests build
(``tutorial_apps.py``). It fails (exit 1) if any test's outcome differs, if FastAPI's own view of
the requests differs, if the monitor counted or logged an internal error or logged any WARNING,
or if a request's route label is not the route FastAPI reports for it. Exit 3: the tests could
not be obtained (no network, or an sdist without them); 4: a run crashed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
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
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from tests.upstream.run import (
    Comparison,
    Run,
    RunCrashed,
    SuiteUnavailable,
    compare,
    exclusive,
    monitor_lines,
)

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "fastapi_tutorials"
# The plugins are loaded as top-level modules from their folders: FastAPI's suite is a package
# named `tests` too, and must be the one its modules' `from tests.utils import ...` finds.
PLUGIN_DIRS = (ROOT / "tests" / "upstream", ROOT / "tests" / "fastapi_tutorials")
TUTORIALS = (
    "test_sql_databases*",
    "test_bigger_applications",
    "test_dependencies",
    "test_events",
    "test_websockets",
    "test_sub_applications",
    "test_behind_a_proxy",
    "test_background_tasks",
    "test_middleware",
    "test_testing_dependencies",
)
EXTRACTED = ("tests/", "docs_src/", "pyproject.toml")
REQUIRED = ("tests/test_tutorial", "docs_src")
# Starlette before 0.37.2 (FastAPI 0.110.0's) builds its TestClient with httpx's `app=` shortcut,
# which httpx 0.27 deprecates; FastAPI's own tests then ran on an older httpx.
OLD_TESTCLIENT = "ignore:The 'app' shortcut is now deprecated:DeprecationWarning"
PIP_TIMEOUT = 600
UNMATCHED = "<unmatched>"  # session_monitor.naming.UNMATCHED_ROUTE: no route matched


# -- the tests ---------------------------------------------------------------------------------


def _ignored_cache() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    marker = CACHE / ".gitignore"
    if not marker.exists():
        marker.write_text("# created by tests/fastapi_tutorials/run.py\n*\n")
    return CACHE


def fetch_sdist(version: str) -> Path:
    cache = _ignored_cache()
    sdist = cache / f"fastapi-{version}.tar.gz"
    if sdist.exists():
        return sdist
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as download:
        # --no-binary for fastapi alone: its build backend may still come as a wheel.
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        command += ["--no-binary", "fastapi", "--disable-pip-version-check"]
        command += [f"fastapi=={version}", "-d", download]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=PIP_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired:
            raise SuiteUnavailable(
                f"pip download of the fastapi {version} sdist took over {PIP_TIMEOUT}s"
            ) from None
        found = sorted(Path(download).glob("*.tar.gz"))
        if done.returncode != 0 or not found:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            tail = re.sub(r"\b\w+://\S+", "<url>", tail)  # no index address in a message
            raise SuiteUnavailable(
                f"pip could not download the fastapi {version} sdist (exit {done.returncode}):"
                f"\n{tail}"
            )
        os.replace(found[0], sdist)
    return sdist


def pytest_ini(pyproject: Path) -> str:
    """FastAPI's own pytest settings for this release (its warning filters, strict xfail), less
    its plugins (timeout, xdist) and options, which it is not run with here."""
    filters = ["error"]
    if pyproject.is_file():
        import tomllib

        tool = tomllib.loads(pyproject.read_text()).get("tool", {})
        settings = tool.get("pytest", {})
        settings = settings.get("ini_options", settings)
        filters = [str(f) for f in settings.get("filterwarnings", filters) if _resolves(str(f))]
    lines = ["[pytest]", "xfail_strict = true", "filterwarnings ="]
    lines += [f"    {f}" for f in [*filters, OLD_TESTCLIENT]]
    lines += ["markers =", "    xdist_group: pytest-xdist's grouping, unused here", ""]
    return "\n".join(lines)


def _resolves(warning_filter: str) -> bool:
    """Whether pytest can import the filter's category (``ignore::trio.X`` needs trio)."""
    parts = warning_filter.split(":")
    category = parts[2].strip() if len(parts) > 2 else ""
    module = category.rpartition(".")[0]
    return not module or importlib.util.find_spec(module.split(".")[0]) is not None


def _wanted(name: str) -> str | None:
    parts = PurePosixPath(name).parts
    if len(parts) < 2 or any(part in ("", ".", "..") for part in parts) or name.startswith("/"):
        return None
    inner = "/".join(parts[1:])
    return inner if any(inner.startswith(want) for want in EXTRACTED) else None


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
        missing = [required for required in REQUIRED if not (work / required).is_dir()]
        if missing:
            raise SuiteUnavailable(
                f"{sdist.name} has no {' or '.join(f'{m}/' for m in missing)}: "
                "this release does not ship its tutorial tests"
            )
        (work / "pytest.ini").write_text(pytest_ini(work / "pyproject.toml"))
        (work / ".complete").write_text(sdist.name + "\n")
        work.chmod(0o755)
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(work, destination)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return destination


def obtain_suite(version: str) -> Path:
    with exclusive(f"fastapi-suite-{version}"):
        sdist = fetch_sdist(version)
        try:
            return extract(sdist, CACHE / f"fastapi-{version}")
        except (tarfile.TarError, EOFError, OSError) as error:
            sdist.unlink(missing_ok=True)  # a truncated download: fetched again next time
            raise SuiteUnavailable(f"cannot extract {sdist.name}: {error}") from None


def targets_in(suite: Path) -> list[str]:
    found: list[str] = []
    for pattern in TUTORIALS:
        found += sorted(
            str(path.relative_to(suite))
            for path in (suite / "tests" / "test_tutorial").glob(pattern)
            if path.is_dir()
        )
    return found


# -- running it --------------------------------------------------------------------------------


@dataclass
class Tutorials:
    run: Run  # outcomes, and the monitor's counts (tests/upstream/inject.py) with it
    routes: dict[str, Any]  # tutorial_routes.py: the requests FastAPI served, its routes
    apps: dict[str, Any] = field(default_factory=dict)  # tutorial_apps.py: labels, warnings


def run_tests(
    suite: Path, mode: str, work: Path, targets: list[str], extra: list[str]
) -> Tutorials:
    work.mkdir(parents=True, exist_ok=True)
    files = {
        name: work / f"{name}-{mode}.json" for name in ("outcomes", "routes", "monitor", "labels")
    }
    log = work / f"pytest-{mode}.log"
    for stale in files.values():
        stale.unlink(missing_ok=True)
    inherited = ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTEST_CURRENT_TEST")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    env["PYTHONPATH"] = os.pathsep.join(
        [*(str(d) for d in PLUGIN_DIRS), *filter(None, [env.get("PYTHONPATH")])]
    )
    command = [sys.executable, "-s", "-m", "pytest", "--rootdir", str(suite)]
    command += ["-c", str(suite / "pytest.ini"), "-p", "no:cacheprovider"]
    # The package's own pytest plugin (its entry point) stays out of both runs: only inject.py
    # brings the monitor in.
    command += ["-p", "no:session_monitor", "-q", "--tb=short"]
    command += ["-p", "outcomes", "--upstream-outcomes", str(files["outcomes"])]
    command += ["-p", "tutorial_routes", "--tutorial-routes", str(files["routes"])]
    if mode == "with":
        # The leak threshold's age watcher runs too; the tutorials hold no session that long.
        command += ["-p", "inject", "--monitor-report", str(files["monitor"])]
        command += ["-p", "tutorial_apps", "--tutorial-labels", str(files["labels"])]
    command += [*extra, *(str(suite / target) for target in targets)]
    # A working directory per run: the background-task tutorials write log.txt into it.
    cwd = work / f"cwd-{mode}"
    shutil.rmtree(cwd, ignore_errors=True)
    cwd.mkdir()
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    wanted = [files["outcomes"], files["routes"]]
    if mode == "with":
        wanted += [files["monitor"], files["labels"]]
    if done.returncode not in (0, 1) or not all(path.exists() for path in wanted):
        raise RunCrashed(f"the run {mode} the monitor exited {done.returncode}; see {log}")
    outcomes = json.loads(files["outcomes"].read_text())
    run = Run(mode, outcomes["outcomes"], outcomes["details"], seconds, log)
    tutorials = Tutorials(run, json.loads(files["routes"].read_text()))
    if mode == "with":
        run.monitor = json.loads(files["monitor"].read_text())
        tutorials.apps = json.loads(files["labels"].read_text())
    return tutorials


# -- comparing ---------------------------------------------------------------------------------


def fastapi_view(tutorials: Tutorials) -> dict[str, collections.Counter[tuple[Any, ...]]]:
    """Per test, the requests FastAPI served: kind, method, route and status, counted."""
    view = {}
    for test, requests in tutorials.routes["requests"].items():
        view[test] = collections.Counter(
            (r["type"], r["method"], r["route"], r["status"]) for r in requests
        )
    return view


def view_changes(without: Tutorials, with_: Tutorials) -> list[str]:
    before, after = fastapi_view(without), fastapi_view(with_)
    lines = []
    for test in sorted(set(before) | set(after)):
        old, new = before.get(test, collections.Counter()), after.get(test, collections.Counter())
        if old != new:
            lines.append(
                f"  {test}: only without {sorted((old - new).elements())}, "
                f"only with {sorted((new - old).elements())}"
            )
    return lines


def _same_route(ours: str | None, fastapi: str | None) -> bool:
    return ours == fastapi or (fastapi is None and ours == UNMATCHED)


def _slash_redirect(ours: str | None, request: dict[str, Any]) -> bool:
    """The router's answer to `/items` for a route `/items/`: FastAPI labels it with the route
    it redirects to, whose code never ran; session_monitor says `<unmatched>` (README)."""
    return ours == UNMATCHED and request["status"] == 307 and request["route"] is not None


def label_check(with_: Tutorials) -> dict[str, Any]:
    """Each request FastAPI served in the monitored run, against the label the monitor gave it."""
    routes = with_.routes["requests"]
    labels = with_.apps["labels"]
    by_span: dict[str, list[dict[str, Any]]] = {}
    for label in labels:
        by_span.setdefault(label["span_id"], []).append(label)
    served = 0
    agreed = 0
    redirects = 0
    mismatches: list[dict[str, Any]] = []
    unlabelled: list[dict[str, Any]] = []
    for test, requests in sorted(routes.items()):
        for request in requests:
            served += 1
            ours = by_span.pop(request["span_id"], [])
            where = {
                "test": test,
                "type": request["type"],
                "method": request["method"],
                "path": request["path"] or request["name"],
                "status": request["status"],
                "fastapi": request["route"],
            }
            if not ours:
                unlabelled.append(where)
                continue
            # A mounted app instrumented too labels the same request a second time.
            fastapi_route = where["fastapi"]
            if all(_slash_redirect(label["ours"], request) for label in ours):
                redirects += 1
                continue
            wrong = [label["ours"] for label in ours if not _same_route(label["ours"], fastapi_route)]
            if wrong:
                mismatches.append({**where, "ours": wrong if len(ours) > 1 else wrong[0]})
            else:
                agreed += 1
    # Labels of no FastAPI request: telemetry off for it (FastAPI before 0.165, or excluded).
    orphans = [label for spans in by_span.values() for label in spans]
    return {
        "served": served,
        "agreed": agreed,
        "slash_redirects": redirects,
        "mismatches": mismatches,
        "unlabelled": unlabelled,
        "labels_without_fastapi_route": orphans,
    }


def report(
    without: Run,
    with_: Tutorials,
    comparison: Comparison,
    changes: list[str],
    labels: dict[str, Any],
) -> list[str]:
    lines = [
        f"{run.mode} monitor:".ljust(16) + f"{run.line()}  log: {_relative(run.log)}"
        for run in (without, with_.run)
    ]
    lines += monitor_lines(with_.run.monitor)
    apps = with_.apps
    lines.append(f"apps instrumented: {apps['apps_instrumented']}")
    differences = {**comparison.regressions, **comparison.other}
    lines.append(f"outcome differences: {len(differences) or 'none'}")
    for nodeid, (before, after) in differences.items():
        lines.append(f"  {before} -> {after}  {nodeid}")
        if nodeid in with_.run.details:
            lines.append(f"      {with_.run.details[nodeid].strip().splitlines()[0][:160]}")
    lines.append(f"FastAPI's own view of the requests changed: {len(changes) or 'no'}")
    lines += changes
    warnings = apps["warnings"]
    lines.append(f"session_monitor WARNINGs or worse: {len(warnings) or 'none'}")
    lines += [f"  [{w['test']}] {w['level']} {w['message'].splitlines()[0][:200]}" for w in warnings]
    lines += [f"  bed error: {error}" for error in apps["bed_errors"]]
    lines.append(
        f"route labels: {labels['served']} requests FastAPI served, {labels['agreed']} labelled "
        f"as FastAPI's http.route, {labels['slash_redirects']} slash redirects `<unmatched>` "
        f"(no route ran), {len(labels['mismatches'])} not, {len(labels['unlabelled'])} with no label"
    )
    for kind, entries in (("MISMATCH", labels["mismatches"]), ("NO LABEL", labels["unlabelled"])):
        for e in entries:
            ours = f" ours {e['ours']!r}" if "ours" in e else ""
            status = f" ({e['status']})" if e["status"] else ""
            lines.append(
                f"  {kind} {e['test']}: {e['method'] or e['type']} {e['path']}{status}"
                f"{ours} FastAPI's {e['fastapi']!r}"
            )
    return lines


def _relative(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(ROOT))
    return str(path)


# -- the command -------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fastapi_tutorials.run",
        description="FastAPI's tutorial tests, without and with session_monitor on every app.",
        epilog="Arguments after -- go to pytest unchanged (e.g. -- -k websocket).",
    )
    parser.add_argument(
        "--summary-json", type=Path, metavar="PATH", help="also write the result here as JSON"
    )
    parser.add_argument("pytest_args", nargs="*", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import fastapi

    version = fastapi.__version__
    try:
        suite = obtain_suite(version)
    except SuiteUnavailable as error:
        print(f"FastAPI {version}'s tutorial tests are unavailable: {error}", file=sys.stderr)
        return 3
    targets = targets_in(suite)
    print(f"FastAPI {version} at {Path(fastapi.__file__).parent}")
    print(f"{len(targets)} tutorial folders: {' '.join(Path(t).name for t in targets)}", flush=True)
    work = CACHE / "runs" / version
    try:
        with exclusive(f"fastapi-runs-{version}"):
            without = run_tests(suite, "without", work, targets, args.pytest_args)
            with_ = run_tests(suite, "with", work, targets, args.pytest_args)
    except RunCrashed as error:
        print(f"CRASHED: {error}")
        return 4
    for tutorials in (without, with_):
        fastapi_used = tutorials.routes["fastapi"]
        if fastapi_used.get("file") != str(Path(fastapi.__file__).resolve()):
            print(f"CRASHED: the tests ran {fastapi_used}, not {fastapi.__file__}")
            return 4
    comparison = compare(without.run, with_.run)
    changes = view_changes(without, with_)
    telemetry = with_.routes["telemetry"]
    labels = label_check(with_)
    lines = report(without.run, with_, comparison, changes, labels)
    if not telemetry:
        lines.append(f"FastAPI {version} has no telemetry of its own: routes not compared")
    print("\n".join(lines))
    apps = with_.apps
    problems = {
        "outcome differences": len(comparison.regressions) + len(comparison.other),
        "changes in FastAPI's view": len(changes),
        "internal errors counted": sum(with_.run.monitor["internal_errors"].values()),
        "errors logged": with_.run.monitor["error_log_records"],
        "warnings logged": len(apps["warnings"]),
        "bed errors": len(apps["bed_errors"]),
        "route mismatches": len(labels["mismatches"]) if telemetry else 0,
        "requests without a label": len(labels["unlabelled"]) if telemetry else 0,
    }
    if args.summary_json:
        args.summary_json.write_text(
            json.dumps(
                {
                    "fastapi": version,
                    "targets": targets,
                    "report": lines,
                    "problems": problems,
                    "outcome_differences": {**comparison.regressions, **comparison.other},
                    "labels": labels,
                    "warnings": apps["warnings"],
                    "runs": {
                        run.mode: {"counts": run.counts(), "seconds": round(run.seconds, 1)}
                        for run in (without.run, with_.run)
                    },
                },
                indent=1,
            )
        )
    failed = {name: count for name, count in problems.items() if count}
    if failed:
        print("FAILED: " + ", ".join(f"{count} {name}" for name, count in failed.items()))
        return 1
    labelled = "every route label FastAPI's" if telemetry else "routes not compared"
    print(f"OK: same outcomes, no internal error or warning, {labelled}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
