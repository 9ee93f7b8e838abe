"""The diagnostics page over ASGI: who may see it, what it shows, and that it never breaks the app.

The page in a real browser is tests/test_diagnostics_browser.py."""

# No `from __future__ import annotations`: FastAPI must resolve endpoints' local annotations.

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from conftest import total
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from session_monitor import ConfigurationError, SessionMonitor

pytestmark = pytest.mark.anyio

TOKEN = "a-token-of-some-length"
HOSTILE_ROUTE = "/<script>alert(1)</script>/{item}"


def client(app: Any, host: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(host, 51000))
    return httpx.AsyncClient(transport=transport, base_url="http://t")


def leaky_app(engine: Engine, kept: list[Session]) -> FastAPI:
    app = FastAPI()

    @app.get(HOSTILE_ROUTE)
    def leak(item: str) -> str:
        session = Session(engine)
        session.execute(text("select 1"))
        kept.append(session)
        return item

    return app


async def test_loopback_sees_pools_holders_and_leaks_as_json_and_a_page(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    engine = make_engine(sqlite_url)
    monitor = make_monitor(engine, registry=registry, diagnostics_path="/_sm")
    kept: list[Session] = []
    app = leaky_app(engine, kept)
    monitor.instrument_app(app)
    async with client(app) as http:
        assert (await http.get("/<script>alert(1)</script>/x")).status_code == 200
        page = await http.get("/_sm")
        data = (await http.get("/_sm/json")).json()
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<script>alert(1)</script>" not in page.text  # app strings reach it as data only
    assert "http" not in page.text.split("<script>", 1)[0].lower()  # no external asset
    (holder,) = data["holders"]
    assert holder["route"] == HOSTILE_ROUTE and holder["kind"] == "session"
    assert holder["opened_at"]["function"] == "leak"
    assert data["groups"][0]["count"] == 1
    assert [leak["reason"] for leak in data["leaks"]] == ["request_end"]
    assert data["pools"][0]["used"] == 1
    assert data["pitfalls"] == []  # a sync endpoint, its own session: none
    # The page's own requests are not the app's: not counted, not leak-checked.
    assert total(registry, "sqlalchemy_sessions_opened_total") == 1
    for session in kept:
        session.close()


@pytest.mark.parametrize(
    ("host", "headers", "query", "status"),
    [
        ("10.1.2.3", {}, "", 403),
        ("127.0.0.1", {}, "", 403),  # with a token configured, loopback needs it too
        ("10.1.2.3", {"X-Session-Monitor-Token": TOKEN}, "", 200),
        ("10.1.2.3", {}, f"?token={TOKEN}", 200),
        ("10.1.2.3", {"X-Session-Monitor-Token": TOKEN + "x"}, "", 403),
    ],
)
async def test_a_token_opens_the_page_to_other_hosts(
    host: str,
    headers: dict[str, str],
    query: str,
    status: int,
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    engine = make_engine(sqlite_url)
    monitor = make_monitor(
        engine, registry=registry, diagnostics_path="/_sm", diagnostics_token=TOKEN
    )
    app = FastAPI()
    monitor.instrument_app(app)
    async with client(app, host) as http:
        response = await http.get(f"/_sm/json{query}", headers=headers)
    assert response.status_code == status
    if status == 403:
        assert "token" in response.text


async def test_without_a_token_other_hosts_are_told_how_to_get_in(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    monitor = make_monitor(make_engine(sqlite_url), registry=registry, diagnostics_path="/_sm")
    app = FastAPI()
    monitor.instrument_app(app)
    async with client(app, "192.168.0.9") as http:
        response = await http.get("/_sm")
    assert response.status_code == 403
    assert response.text.startswith("session_monitor diagnostics answer loopback clients only")


async def test_a_failing_page_is_an_internal_error_and_the_app_goes_on(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = make_engine(sqlite_url)
    monitor = make_monitor(engine, registry=registry, diagnostics_path="/_sm")
    app = FastAPI()

    @app.get("/ok")
    def ok() -> int:
        with Session(engine) as session:
            return int(session.execute(text("select 1")).scalar_one())

    def broken() -> list[Any]:
        raise RuntimeError("a bug of the monitor's")

    monkeypatch.setattr(monitor, "holders", broken)
    monitor.instrument_app(app)
    async with client(app) as http:
        assert (await http.get("/_sm/json")).status_code == 500
        assert (await http.get("/ok")).json() == 1
    assert total(registry, "session_monitor_internal_errors_total", listener="diagnostics") == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"diagnostics_path": "diag"}, "diagnostics_path must be a URL path"),
        ({"diagnostics_path": "/metrics"}, "other than metrics_path"),
        ({"diagnostics_path": "/d", "diagnostics_token": "short"}, "at least 16 characters"),
        ({"idle_in_transaction_threshold": 0}, "idle_in_transaction_threshold must be"),
        ({"timeout_log_interval": None}, "timeout_log_interval must be"),
    ],
)
def test_bad_diagnostics_options_say_what_to_fix(
    options: dict[str, Any], message: str, make_engine: Callable[..., Engine], sqlite_url: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        SessionMonitor(make_engine(sqlite_url), registry=CollectorRegistry(), **options)


async def test_pitfalls_are_listed_with_their_route_and_line(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    engine = make_engine(sqlite_url)
    monitor = make_monitor(engine, registry=registry, diagnostics_path="/_sm")
    app = FastAPI()

    @app.get("/blocking")
    async def blocking() -> int:
        with Session(engine) as session:  # a sync session on the event loop's thread
            return int(session.execute(text("select 1")).scalar_one())

    monitor.instrument_app(app)
    async with client(app) as http:
        assert (await http.get("/blocking")).json() == 1
        data = (await http.get("/_sm/json")).json()
    (pitfall,) = data["pitfalls"]
    assert (pitfall["kind"], pitfall["route"]) == ("blocking_event_loop", "/blocking")
    assert pitfall["at_line"].endswith("in blocking")
