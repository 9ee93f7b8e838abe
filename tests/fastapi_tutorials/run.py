"""Run FastAPI's own tutorial tests with and without session_monitor, and compare.

    python -m tests.fastapi_tutorials.run [--summary-json PATH] [-- pytest args]

The tests are those released with the *installed* FastAPI (``fastapi.__version__``): its sdist,
fetched once with pip and cached under ``.cache/fastapi_tutorials/``, holds ``tests/test_tutorial/``
and the tutorial apps they import (``docs_src/``). Only those two folders are extracted, never
the sdist's ``fastapi/``, and the outcomes plugin refuses a run whose ``fastapi`` is not the
installed one (``tests/sdist_suite/``: what this bed shares with SQLAlchemy's). The chosen
tutorials are those of an app with a database or a request's life around it: SQL databases,
bigger applications, dependencies, events and lifespan, WebSockets, sub-applications, behind a
proxy, background tasks, middleware, testing dependencies.

Both runs enable FastAPI's own telemetry (a tracer provider that exports nowhere), so FastAPI
reports the route of every request it serves. The second run adds one ``SessionMonitor()``
watching every engine (``tests/sdist_suite/plugins/inject.py``) and instruments every app the
tests build (``tutorial_apps.py``). It fails (exit 1) if any test's outcome differs, if FastAPI's
own view of the requests differs, if the monitor counted or logged an internal error or logged
any WARNING, or if a request's route label is not the route FastAPI reports for it. Exit 3: the
tests could not be obtained (no network, or an sdist without them); 4: a run crashed.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

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

CACHE = ROOT / ".cache" / "fastapi_tutorials"
# This bed's plugins are loaded as top-level modules from this folder: FastAPI's suite is a
# package named `tests` too, and must be the one its modules' `from tests.utils import ...` finds.
PLUGIN_DIR = Path(__file__).resolve().parent
ROUTES = "tutorial_routes"  # both runs: the requests FastAPI served, with FastAPI's routes
APPS = "tutorial_apps"  # with the monitor: every app instrumented, its labels and warnings
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
REQUIRED = ("tests/test_tutorial/", "docs_src/")
# Starlette before 0.37.2 (FastAPI 0.110.0's) builds its TestClient with httpx's `app=` shortcut,
# which httpx 0.27 deprecates; FastAPI's own tests then ran on an older httpx.
OLD_TESTCLIENT = "ignore:The 'app' shortcut is now deprecated:DeprecationWarning"
PIP_TIMEOUT = 600
UNMATCHED = "<unmatched>"  # session_monitor.state.naming.UNMATCHED_ROUTE: no route matched


# -- the tests ---------------------------------------------------------------------------------


def write_pytest_ini(suite: Path) -> None:
    (suite / "pytest.ini").write_text(pytest_ini(suite / "pyproject.toml"))


def pytest_ini(pyproject: Path) -> str:
    """FastAPI's own pytest settings for this release (its warning filters, strict xfail), less
    its plugins (timeout, xdist) and options, which it is not run with here."""
    filters = ["error"]
    if pyproject.is_file():
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # the oldest end's Python: pytest's own TOML reader
            import tomli as tomllib

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


def run_tests(suite: Path, mode: str, work: Path, targets: list[str], extra: list[str]) -> Run:
    return run_suite(
        suite,
        "fastapi",
        mode,
        work,
        targets,
        ["-c", str(suite / "pytest.ini"), *extra],
        plugins={ROUTES: "--tutorial-routes"},
        # The leak threshold's age watcher runs too; the tutorials hold no session that long.
        monitored_plugins={APPS: "--tutorial-labels"},
        plugin_dirs=[PLUGIN_DIR],
    )


# -- comparing ---------------------------------------------------------------------------------


def fastapi_view(run: Run) -> dict[str, collections.Counter[tuple[Any, ...]]]:
    """Per test, the requests FastAPI served: kind, method, route and status, counted."""
    view = {}
    for test, requests in run.reports[ROUTES]["requests"].items():
        view[test] = collections.Counter(
            (r["type"], r["method"], r["route"], r["status"]) for r in requests
        )
    return view


def view_changes(without: Run, with_: Run) -> list[str]:
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
    it redirects to, whose code never ran; session_monitor says `<unmatched>` (docs/metrics.md)."""
    return ours == UNMATCHED and request["status"] == 307 and request["route"] is not None


def label_check(with_: Run) -> dict[str, Any]:
    """Each request FastAPI served in the monitored run, against the label the monitor gave it."""
    routes = with_.reports[ROUTES]["requests"]
    labels = with_.reports[APPS]["labels"]
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
    with_: Run,
    comparison: Comparison,
    changes: list[str],
    labels: dict[str, Any],
) -> list[str]:
    lines = run_lines(without, with_)
    apps = with_.reports[APPS]
    lines.append(f"apps instrumented: {apps['apps_instrumented']}")
    differences = {**comparison.regressions, **comparison.other}
    lines.append(f"outcome differences: {len(differences) or 'none'}")
    lines += change_lines(differences, with_.details)
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
        suite = obtain_suite(
            "fastapi",
            version,
            CACHE,
            EXTRACTED,
            REQUIRED,
            pip_timeout=PIP_TIMEOUT,
            prepare=write_pytest_ini,
        )
    except SuiteUnavailable as error:
        print(f"FastAPI {version}'s tutorial tests are unavailable: {error}", file=sys.stderr)
        return 3
    targets = targets_in(suite)
    print(f"FastAPI {version} at {Path(fastapi.__file__).parent}")
    print(f"{len(targets)} tutorial folders: {' '.join(Path(t).name for t in targets)}", flush=True)
    work = CACHE / "runs" / version
    try:
        with exclusive(CACHE, f"runs-{version}"):
            without = run_tests(suite, "without", work, targets, args.pytest_args)
            with_ = run_tests(suite, "with", work, targets, args.pytest_args)
    except RunCrashed as error:
        print(f"CRASHED: {error}")
        return 4
    comparison = compare(without, with_)
    changes = view_changes(without, with_)
    telemetry = with_.reports[ROUTES]["telemetry"]
    labels = label_check(with_)
    lines = report(without, with_, comparison, changes, labels)
    if not telemetry:
        lines.append(f"FastAPI {version} has no telemetry of its own: routes not compared")
    print("\n".join(lines))
    apps = with_.reports[APPS]
    problems = {
        "outcome differences": len(comparison.regressions) + len(comparison.other),
        "changes in FastAPI's view": len(changes),
        "internal errors counted": with_.internal_errors,
        "errors logged": with_.errors_logged,
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
                    "runs": runs_summary(without, with_),
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
