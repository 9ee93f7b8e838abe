#!/usr/bin/env bash
# The package without the repository: build the sdist and the wheel from a clean copy of the
# checkout (the wheel is built from the sdist, so a file missing from the sdist fails here),
# install only the wheel into a new venv, and use it from a directory outside the checkout:
# import, a FastAPI app on SQLite that leaks a session, /metrics, the FastAPI server span the
# session span nests under, and `python -m session_monitor dashboard|rules`.
#
#   bash .ci/wheel_smoke.sh              PYTHON=... picks the interpreter that has `build`
#   KEEP=1 bash .ci/wheel_smoke.sh       keep the temporary directory (it is kept on failure)
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$repo/.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON=python3
work="$(mktemp -d "${TMPDIR:-/tmp}/wheel_smoke.XXXXXX")"
started=$SECONDS
step="start"

on_exit() {
  local rc=$?
  if ((rc != 0)); then
    printf '\nwheel_smoke: FAILED at step "%s" (exit %d). Files kept in %s\n' "$step" "$rc" "$work" >&2
  elif [[ -n "${KEEP:-}" ]]; then
    printf 'wheel_smoke: files kept in %s\n' "$work"
  else
    rm -rf "$work"
  fi
}
trap on_exit EXIT

begin() {
  step="$1"
  printf '== %s (%ds)\n' "$step" $((SECONDS - started))
}
# Run a command quietly; on failure show its output and stop.
quiet() {
  local log="$work/$1.log"
  shift
  if ! "$@" >"$log" 2>&1; then
    cat "$log" >&2
    return 1
  fi
}

begin "copy the checkout's files (tracked and untracked, not ignored) to a clean directory"
"$PYTHON" -c 'import build' 2>/dev/null || {
  echo "wheel_smoke: $PYTHON has no \`build\`: pip install -e '.[dev]' (or set PYTHON=...)" >&2
  exit 1
}
mkdir -p "$work/src" "$work/dist" "$work/outside"
# What a commit of the work tree would hold; files deleted but not yet committed are left out.
(cd "$repo" && git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do if [[ -e "$f" ]]; then printf '%s\0' "$f"; fi; done |
  xargs -0 cp --parents -t "$work/src")

begin "build the sdist, then the wheel from the sdist (python -m build)"
quiet build "$PYTHON" -m build --outdir "$work/dist" "$work/src"
sdist=("$work"/dist/*.tar.gz)
wheel=("$work"/dist/*.whl)
[[ ${#sdist[@]} == 1 && -f "${sdist[0]}" && ${#wheel[@]} == 1 && -f "${wheel[0]}" ]] || {
  ls -l "$work/dist" >&2
  echo "wheel_smoke: expected one sdist and one wheel in dist/" >&2
  exit 1
}
echo "   $(basename "${sdist[0]}"), $(basename "${wheel[0]}")"

begin "check what the sdist and the wheel contain"
"$PYTHON" - "${sdist[0]}" "${wheel[0]}" "$repo" <<'PY'
import sys
import tarfile
import zipfile
from pathlib import Path

sdist, wheel, repo = sys.argv[1], sys.argv[2], Path(sys.argv[3])
# packaged copy -> the canonical file in the repository
ASSETS = {
    "session_monitor/assets/session_monitor.json": "grafana/dashboards/session_monitor.json",
    "session_monitor/assets/session_monitor.rules.yml": "prometheus/rules/session_monitor.rules.yml",
}
CODE = ["session_monitor/__init__.py", "session_monitor/__main__.py", "session_monitor/py.typed"]
# every layer's folder (packages.find's include pattern must reach the sub-packages)
LAYERS = ("hooks", "state", "findings", "exporters", "web")
CODE += [f"session_monitor/{layer}/__init__.py" for layer in LAYERS]
problems = []

with tarfile.open(sdist) as tar:
    root = tar.getnames()[0].split("/")[0]
    names = {n.removeprefix(root + "/") for n in tar.getnames()}
    for need in ["PKG-INFO", "pyproject.toml", "README.md", "LICENSE", *CODE, *ASSETS]:
        if need not in names:
            problems.append(f"sdist lacks {need}")

with zipfile.ZipFile(wheel) as whl:
    names = set(whl.namelist())
    dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
    for need in [*CODE, *ASSETS, f"{dist_info}/licenses/LICENSE"]:
        if need not in names:
            problems.append(f"wheel lacks {need}")
    # The example app and the benchmarks live in the checkout; installed, they would be
    # top-level packages named example_app and benchmarks in every user's site-packages.
    for extra in sorted({n.split("/")[0] for n in names} - {"session_monitor", dist_info}):
        problems.append(f"wheel installs {extra}/, which is not the library")
    for packaged, canonical in ASSETS.items():
        if packaged in names and whl.read(packaged) != (repo / canonical).read_bytes():
            problems.append(f"wheel's {packaged} differs from {canonical}: copy it again")
    metadata = whl.read(f"{dist_info}/METADATA").decode()
    for extra in ("async", "otel", "otel-fastapi-legacy", "fastapi"):
        if f"Provides-Extra: {extra}\n" not in metadata:
            problems.append(f"wheel's METADATA has no extra {extra!r}")
    if "Description-Content-Type: text/markdown" not in metadata:
        problems.append("wheel's METADATA carries no README (long description)")

for problem in problems:
    print(f"   {problem}", file=sys.stderr)
if problems:
    sys.exit(1)
print(f"   sdist and wheel have the code, the assets, README and LICENSE ({len(names)} wheel files)")
PY

begin "a new venv with only the wheel, its [async,fastapi,otel] extras, httpx and pyyaml"
"$PYTHON" -m venv "$work/venv"
py="$work/venv/bin/python"
quiet pip "$py" -m pip install --disable-pip-version-check \
  "${wheel[0]}[async,fastapi,otel]" "httpx>=0.27" "pyyaml>=6"

cd "$work/outside"
unset PYTHONPATH
# -I: neither the current directory nor PYTHON* variables reach sys.path
run() { "$py" -I "$@"; }

begin "import session_monitor from the venv, not from the checkout"
run - "$repo" <<'PY'
import sys
from pathlib import Path

import greenlet  # noqa: F401  (the async extra)

import session_monitor

where = Path(session_monitor.__file__).resolve()
assert where.is_relative_to(Path(sys.prefix).resolve()), f"imported from {where}, not the venv"
assert not where.is_relative_to(Path(sys.argv[1]).resolve()), f"imported from the checkout: {where}"
print(f"   session_monitor {session_monitor.__version__} from {where.parent}")
PY

begin "the README's three lines: a FastAPI app on SQLite, a leaked session, /metrics"
cat >"$work/outside/smoke_app.py" <<'PY'
import sys
import warnings

warnings.filterwarnings("ignore", message=".*httpx2")  # Starlette's TestClient, not ours
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker

from session_monitor import SessionMonitor

engine = create_engine("sqlite:///smoke.db")
SessionLocal = sessionmaker(engine)
app = FastAPI()
kept = []  # the leaked session stays referenced: a request_end leak, not a gc one


@app.get("/items/{item_id}")
def item(item_id: int) -> dict[str, int]:
    with SessionLocal() as session:
        return {"id": session.execute(text("SELECT :i"), {"i": item_id}).scalar_one()}


@app.get("/leak")
def leak() -> dict[str, bool]:
    session = SessionLocal()
    session.execute(text("SELECT 1"))
    kept.append(session)
    return {"leaked": True}


monitor = SessionMonitor(engine)
monitor.instrument_app(app)

with TestClient(app) as client:
    assert client.get("/items/7").json() == {"id": 7}
    assert client.get("/leak").status_code == 200
    response = client.get("/metrics")
assert response.status_code == 200, f"/metrics answered {response.status_code}"
body = response.text
assert "sqlalchemy_sessions_leaked_total" in body, "/metrics has no sqlalchemy_sessions_leaked_total"
samples = {
    (s.name, tuple(sorted(s.labels.items()))): s.value
    for family in text_string_to_metric_families(body)
    for s in family.samples
}
leak_key = (
    "sqlalchemy_sessions_leaked_total",
    (("method", "GET"), ("reason", "request_end"), ("route", "/leak")),
)
assert samples.get(leak_key) == 1.0, f"leak not counted once: {samples.get(leak_key)}"
opened = samples.get(("sqlalchemy_sessions_opened_total", (("method", "GET"), ("route", "/items/{item_id}"))))
assert opened == 1.0, f"/items/{{item_id}} session not counted: {opened}"
print("   /metrics: sqlalchemy_sessions_leaked_total{route=\"/leak\",reason=\"request_end\"} 1.0")
sys.exit(0)
PY
run smoke_app.py 2>"$work/app.err" || { cat "$work/app.err" >&2; false; }
grep -q "Leaked session (request_end): GET /leak" "$work/app.err" || {
  cat "$work/app.err" >&2
  echo "   no leak WARNING logged" >&2
  false
}

begin "the otel extra: session spans nest under FastAPI's own server span"
cat >"$work/outside/smoke_otel.py" <<'PY'
import importlib.util
import warnings

warnings.filterwarnings("ignore", message=".*httpx2")
from fastapi import FastAPI
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker

from session_monitor import SessionMonitor

# FastAPI 0.142 and later trace requests themselves; the otel extra leaves the contrib
# instrumentation, which would take over from them, to the otel-fastapi-legacy extra.
assert importlib.util.find_spec("fastapi.telemetry"), "the newest FastAPI has no telemetry"
assert not importlib.util.find_spec("opentelemetry.instrumentation.fastapi"), (
    "the otel extra installed opentelemetry-instrumentation-fastapi"
)
exporter = InMemorySpanExporter()
tracer_provider = TracerProvider()
tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
engine = create_engine("sqlite:///otel.db")
app = FastAPI(telemetry={"tracer_provider": tracer_provider, "operation_spans": False})


@app.get("/items/{item_id}")
def item(item_id: int) -> dict[str, int]:
    with sessionmaker(engine)() as session:
        return {"id": session.execute(text("SELECT :i"), {"i": item_id}).scalar_one()}


monitor = SessionMonitor(engine, registry=CollectorRegistry(), tracer_provider=tracer_provider)
monitor.instrument_app(app)
with TestClient(app) as client:
    assert client.get("/items/3").status_code == 200
spans = {s.context.span_id: s for s in exporter.get_finished_spans()}
session = next((s for s in spans.values() if s.name == "db.session"), None)
assert session is not None, f"no db.session span among {[s.name for s in spans.values()]}"
parent = spans.get(session.parent.span_id) if session.parent else None
assert parent is not None and parent.kind is SpanKind.SERVER, (
    f"db.session's parent is {parent and parent.name!r}, not FastAPI's server span"
)
route = parent.attributes.get("http.route")
assert session.attributes.get("http.route") == route == "/items/{item_id}", (
    f"routes: session {session.attributes.get('http.route')!r}, server {route!r}"
)
print(f"   {parent.name!r} (SERVER, {parent.instrumentation_scope.name}) -> {session.name!r}")
PY
run smoke_otel.py

begin "python -m session_monitor dashboard / rules / a bad command"
run -m session_monitor dashboard >session_monitor.json
run -m session_monitor rules >session_monitor.rules.yml
run - <<'PY'
import json

import yaml

dashboard = json.load(open("session_monitor.json", encoding="utf-8"))
assert dashboard.get("uid") == "session-monitor", f"dashboard uid is {dashboard.get('uid')!r}"
assert dashboard.get("panels"), "dashboard has no panels"
rules = yaml.safe_load(open("session_monitor.rules.yml", encoding="utf-8"))
alerts = [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]
assert "SQLAlchemySessionLeaked" in alerts, f"alerts: {alerts}"
print(f"   dashboard: valid JSON, {len(dashboard['panels'])} panels; rules: valid YAML, {len(alerts)} alerts")
PY
cmp -s session_monitor.json "$repo/grafana/dashboards/session_monitor.json" ||
  { echo "   dashboard output differs from grafana/dashboards/session_monitor.json" >&2; false; }
cmp -s session_monitor.rules.yml "$repo/prometheus/rules/session_monitor.rules.yml" ||
  { echo "   rules output differs from prometheus/rules/session_monitor.rules.yml" >&2; false; }
if command -v promtool >/dev/null 2>&1; then
  quiet promtool promtool check rules session_monitor.rules.yml
  echo "   promtool check rules: SUCCESS"
fi
rc=0
run -m session_monitor dashbord >/dev/null 2>bad.err || rc=$?
if [[ $rc != 2 ]] || ! grep -q "^python -m session_monitor: name the file to write" bad.err; then
  cat bad.err >&2
  echo "   a bad command should exit 2 with the advice first; it exited $rc" >&2
  false
fi
echo "   a bad command: exit 2, advice first"

step="done"
printf 'wheel_smoke: OK in %ds\n' $((SECONDS - started))
