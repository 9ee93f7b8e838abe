"""What the installed package carries: the dashboard and the alert rules, and the otel extra.

The packaged assets are copies of the canonical files in grafana/ and prometheus/ (the compose
stack, the promtool tests and the e2e test use those); these tests keep the copies byte-identical
and check `python -m session_monitor`. `.ci/wheel_smoke.sh` checks the same from a built wheel.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

import session_monitor
from session_monitor.__main__ import ASSETS, asset

ROOT = Path(__file__).resolve().parents[1]
ASSETS_DIR = Path(session_monitor.__file__).parent / "assets"
CANONICAL = {
    "dashboard": ROOT / "grafana" / "dashboards" / "session_monitor.json",
    "rules": ROOT / "prometheus" / "rules" / "session_monitor.rules.yml",
}


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "session_monitor", *args],
        cwd=cwd,
        capture_output=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("command", sorted(CANONICAL))
def test_packaged_copy_is_byte_identical_to_the_canonical_file(command: str) -> None:
    packaged = ASSETS_DIR / ASSETS[command][0]
    canonical = CANONICAL[command]
    assert packaged.read_bytes() == canonical.read_bytes(), (
        f"copy the canonical file into the package: cp {canonical.relative_to(ROOT)} "
        f"{packaged.relative_to(ROOT)} (edit the canonical one, never the copy)"
    )
    assert asset(command) == canonical.read_bytes()


def test_every_packaged_asset_has_a_command() -> None:
    shipped = {p.name for p in ASSETS_DIR.iterdir() if p.suffix in (".json", ".yml")}
    assert shipped == {name for name, _ in ASSETS.values()}


@pytest.mark.parametrize("command", sorted(CANONICAL))
def test_cli_writes_the_asset_to_stdout(command: str, tmp_path: Path) -> None:
    result = run_cli(command, cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == CANONICAL[command].read_bytes()
    assert result.stderr == b""


@pytest.mark.parametrize("args", [("dashbord",), ()])
def test_cli_bad_or_missing_command_gives_the_advice_first(
    args: tuple[str, ...], tmp_path: Path
) -> None:
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == b""
    first, usage = result.stderr.decode().splitlines()
    assert first.startswith(
        "python -m session_monitor: name the file to write: "
        "`python -m session_monitor dashboard > session_monitor.json` or "
        "`python -m session_monitor rules > session_monitor.rules.yml`"
    )
    if args:
        assert "'dashbord' is not a command" in first
    assert usage == "usage: python -m session_monitor [-h] {dashboard,rules}"


# -- the otel extra: a request span for the sessions to nest under ------------------------------


@pytest.fixture
def tracer() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.mark.anyio
@pytest.mark.parametrize("fastapi_first", [True, False], ids=["fastapi first", "monitor first"])
async def test_readme_otel_lines_nest_sessions_under_fastapis_server_span(
    fastapi_first: bool,
    sqlite_url: str,
    make_engine: Callable[..., Engine],
    make_monitor: Callable[..., session_monitor.SessionMonitor],
    registry: CollectorRegistry,
    tracer: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    tracer_provider, exporter = tracer
    engine = make_engine(sqlite_url)
    app = FastAPI()

    @app.get("/items/{item_id}")
    def item(item_id: int) -> dict[str, int]:
        with Session(engine) as session:
            return {"id": session.execute(text("SELECT :i"), {"i": item_id}).scalar_one()}

    # Either order: the monitor's middleware is built inside Starlette's error handling, where
    # FastAPI's instrumentation puts its own, around everything else.
    if fastapi_first:
        FastAPIInstrumentor.instrument_app(app, tracer_provider=tracer_provider)
    monitor = make_monitor(engine, registry=registry, tracer_provider=tracer_provider)
    monitor.instrument_app(app)
    if not fastapi_first:
        FastAPIInstrumentor.instrument_app(app, tracer_provider=tracer_provider)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/items/3")).json() == {"id": 3}
    finally:
        FastAPIInstrumentor.uninstrument_app(app)

    spans = {s.context.span_id: s for s in exporter.get_finished_spans() if s.context}
    (session_span,) = [s for s in spans.values() if s.name == "db.session"]
    assert session_span.parent is not None
    parent = spans[session_span.parent.span_id]
    assert parent.kind is SpanKind.SERVER
    assert parent.name == "GET /items/{item_id}"
    assert session_span.end_time is not None and parent.end_time is not None
    assert session_span.end_time <= parent.end_time
    assert session_span.attributes is not None
    assert session_span.attributes["http.route"] == "/items/{item_id}"
