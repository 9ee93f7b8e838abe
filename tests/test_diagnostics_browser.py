"""The diagnostics page in a real browser: headless Chromium driven by Selenium.

The example app runs under uvicorn on SQLite, with a pool of 2 + 1 connections given up after
0.5 s: two `/demo/leak` calls leak a connection each, a `/demo/hold` keeps the third, and
`GET /items` then times out with 503. The page must show the leaking route with its opening line
(file:line in function), list the timeout with its holders, reverse the holders' order when the
age header is clicked, and expand a stack, which stays open across the page's next refresh. A
second app, in this process, has a route whose path is HTML: the page shows it as text and runs
none of it.

The browser is Debian's, never a download: `chromium` and `chromium-driver` (/usr/bin/chromium,
/usr/bin/chromedriver). The driver's path is given to Selenium, so Selenium Manager is not run
(and SE_OFFLINE keeps it off the network if it were). Without them the tests skip, except on CI,
where that is a failure. With SESSION_MONITOR_SCREENSHOT=docs/diagnostics.png (a path relative
to the checkout) the first test also writes a full-page screenshot, 1280 px wide, for the README.

A third test runs the page under `uvicorn --workers 3` (tests/_workers_servers.py): every worker's
holders, labelled with its pid, on one page that fits the window without cutting a column, and
a worker stopped with SIGSTOP named as not answering (SESSION_MONITOR_WORKERS_SCREENSHOT=<path>
writes a screenshot of each).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from _e2e_servers import (
    HOST,
    ROOT,
    Server,
    Servers,
    eventually,
    free_port,
    http_client,
    wait_for_http,
)
from _workers_servers import Holds, spread, start_server
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import QueuePool

import example_app.demo
from session_monitor import SessionMonitor

try:
    from selenium import webdriver
    from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
except ImportError:  # the dev extra installs it
    webdriver = None

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT_ENV = "SESSION_MONITOR_SCREENSHOT"
WORKERS_SCREENSHOT_ENV = "SESSION_MONITOR_WORKERS_SCREENSHOT"
SCREENSHOT_WIDTH = 1280
CHROMIUM_ARGUMENTS = (
    "--headless=new",
    "--no-sandbox",  # tests run as root here and on CI
    "--disable-dev-shm-usage",
    "--disable-gpu",
    f"--window-size={SCREENSHOT_WIDTH},900",
    "--no-proxy-server",  # everything is on 127.0.0.1
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--lang=en-US",
)
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")

PAGE = "/_session_monitor"
TITLE = "session_monitor: who holds the pool"
POOL = "example_app.db"
# 3 connections; the 4th checkout gives up after 0.5 s.
POOL_ENV = {"POOL_SIZE": "2", "MAX_OVERFLOW": "1", "POOL_TIMEOUT": "0.5"}
HOLD_SECONDS = 30  # the most /demo/hold takes: outlasts the test; the server cancels it at shutdown
STARTUP_TIMEOUT = 30.0
WAIT = 10.0  # for the page to render, or to change


def _line_of(function: Callable[..., Any], code: str) -> int:
    """The line of `function`'s source that contains `code`."""
    lines, first = inspect.getsourcelines(function)
    (offset,) = [i for i, line in enumerate(lines) if code in line]
    return first + offset


DEMO_FILE = str(ROOT / "example_app" / "demo.py")
LEAK_OPENED = f"{DEMO_FILE}:{_line_of(example_app.demo.leak, 'db.execute(')} in leak"
HOLD_OPENED = f"{DEMO_FILE}:{_line_of(example_app.demo.hold, 'db.execute(')} in hold"
HOLD_NOW = f"{DEMO_FILE}:{_line_of(example_app.demo.hold, 'time.sleep(')} in hold"


def require_browser() -> None:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if webdriver is None:
        missing.append("the selenium package (pip install -e '.[dev]')")
    if missing:
        reason = (
            f"no headless browser to drive: {', '.join(missing)} not installed "
            "(Debian/Ubuntu: apt-get install chromium chromium-driver)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must install them", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    require_browser()
    directory = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (*CHROMIUM_ARGUMENTS, f"--user-data-dir={directory / 'profile'}"):
        options.add_argument(argument)
    service = Service(
        executable_path=str(CHROMEDRIVER), log_output=str(directory / "chromedriver.log")
    )
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("SE_OFFLINE", "true")
        for name in PROXY_VARIABLES:  # Selenium's client would send its commands through them
            environment.delenv(name, raising=False)
        driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    started = Servers(tmp_path)
    yield started
    leftovers = started.stop_all()
    assert not leftovers, f"still running after the test: {leftovers}"


def start_example_app(servers: Servers, directory: Path) -> Server:
    port = free_port()
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("PROMETHEUS_MULTIPROC_DIR", "OTEL_EXPORTER_OTLP_ENDPOINT")
    }
    env |= {"DATABASE_URL": f"sqlite:///{directory / POOL}", "PYTHONUNBUFFERED": "1", **POOL_ENV}
    command = [sys.executable, "-m", "uvicorn", "example_app.app:app", "--no-access-log"]
    command += ["--host", HOST, "--port", str(port), "--timeout-graceful-shutdown", "1"]
    app = servers.start("uvicorn", command, port=port, env=env)
    wait_for_http(app, "/metrics", timeout=STARTUP_TIMEOUT)
    return app


def hold_a_connection(base_url: str) -> None:
    """GET /demo/hold until the server is stopped under it."""
    with http_client(base_url) as client, contextlib.suppress(httpx.TransportError):
        client.get("/demo/hold", params={"seconds": HOLD_SECONDS}, timeout=HOLD_SECONDS + 10)


def cells(browser: WebDriver, table: str) -> list[list[str]]:
    """A table's rows as text, header first; a cell with a stack reads as its summary line."""
    rows: list[list[str]] = browser.execute_script(
        "return [...document.getElementById(arguments[0]).rows].map(row => [...row.cells].map("
        "cell => (cell.querySelector('summary') || cell).textContent));",
        table,
    )
    return rows


def status(browser: WebDriver) -> str:
    text: str = browser.find_element(By.ID, "status").text
    return text


def wait_for(check: Callable[[], bool], what: str) -> None:
    assert eventually(check, timeout=WAIT, interval=0.05), f"the page never showed {what}"


def open_page(browser: WebDriver, url: str) -> None:
    browser.get(url)
    wait_for(lambda: status(browser).startswith("updated "), "its data (status: updated …)")


def retry_stale(action: Callable[[], Any]) -> Any:
    """Run `action`, again if the page's refresh replaced the element it found meanwhile."""
    for _ in range(5):
        try:
            return action()
        except StaleElementReferenceException:
            time.sleep(0.05)
    return action()


def expand(browser: WebDriver, table: str) -> None:
    """Click the summary of the first <details> in `table`."""
    retry_stale(lambda: browser.find_element(By.CSS_SELECTOR, f"#{table} summary").click())


def expanded(browser: WebDriver, table: str) -> list[str]:
    """The text of each open <details> in `table` that the browser shows (has a height)."""
    shown: list[str] = browser.execute_script(
        "return [...document.querySelectorAll(`#${arguments[0]} details[open] pre`)]"
        ".filter(pre => pre.offsetHeight > 0).map(pre => pre.textContent);",
        table,
    )
    return shown


def save_screenshot(browser: WebDriver, path: Path) -> None:
    """The whole page, 1280 CSS px wide, as PNG."""
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": SCREENSHOT_WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(path)), f"could not write {path}"
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_the_page_shows_who_holds_the_pool(
    browser: WebDriver, servers: Servers, tmp_path: Path
) -> None:
    app = start_example_app(servers, tmp_path)
    screenshot = os.environ.get(SCREENSHOT_ENV)
    holder = threading.Thread(target=hold_a_connection, args=(app.url,), daemon=True)
    with http_client(app.url) as http:
        assert [http.get("/demo/leak").json() for _ in range(2)] == [
            {"leaked_sessions": 1},
            {"leaked_sessions": 2},
        ]
        if screenshot:
            time.sleep(2)  # so that the picture's holders differ in age
        holder.start()
        assert eventually(
            lambda: len(http.get(f"{PAGE}/json").json()["holders"]) == 3, timeout=WAIT, interval=0.05
        ), "GET /demo/hold never took the pool's last connection"
        exhausted = http.get("/items")
    assert exhausted.status_code == 503, exhausted.text

    open_page(browser, app.url + PAGE)
    assert browser.title == TITLE

    assert cells(browser, "pools") == [
        ["pool", "used", "idle", "waiting", "max"],
        [POOL, "3", "0", "0", "3"],
    ]

    groups = cells(browser, "groups")
    assert groups[0] == ["held", "request", "opened at", "oldest", "pool"]
    assert [row[:3] for row in groups[1:]] == [
        ["2", "GET /demo/leak", LEAK_OPENED],
        ["1", "GET /demo/hold", HOLD_OPENED],
    ]

    holders = cells(browser, "holders")
    assert holders[0] == [
        "age ▼", "request", "kind", "pool", "transaction", "opened at", "holder", "now at"
    ]
    # Oldest first: the two leaks, then the hold.
    assert [row[1:] for row in holders[1:]] == [
        *[
            ["GET /demo/leak", "session", POOL, row[4], LEAK_OPENED,
             "nobody: leaked, its request ended", "—"]
            for row in holders[1:3]
        ],
        ["GET /demo/hold", "session", POOL, holders[3][4], HOLD_OPENED,
         "thread AnyIO worker thread (application)", HOLD_NOW],
    ]
    assert all(row[4].startswith("open ") for row in holders[1:]), holders

    events = cells(browser, "events")
    assert events[0] == [
        "at", "pool", "what", "waited", "in use / max", "idle", "waiting", "held by"
    ]
    (timeout,) = events[1:]
    assert timeout[1:7] == [POOL, "timeout", "0.5 s", "3 / 3", "0", "0"]
    assert timeout[7].startswith(f"2 of 3 held by GET /demo/leak, opened at {LEAK_OPENED}, ")

    leaks = cells(browser, "leaks")
    assert [row[1:] for row in leaks[1:]] == [
        ["request_end", "GET /demo/leak", "session", POOL, LEAK_OPENED]
    ] * 2

    # The age header sorts: a click puts the newest first.
    retry_stale(lambda: browser.find_element(By.CSS_SELECTOR, "#holders th.sort").click())
    wait_for(lambda: cells(browser, "holders")[0][0] == "age ▲", "the age header turned ▲")
    newest_first = cells(browser, "holders")[1:]
    assert [row[1] for row in newest_first] == ["GET /demo/hold", "GET /demo/leak", "GET /demo/leak"]
    ages = [float(row[0].removesuffix(" s")) for row in newest_first]
    assert ages == sorted(ages), newest_first

    # Stacks expand: where the hold's thread is now, and who held the pool at the timeout.
    assert expanded(browser, "holders") == expanded(browser, "events") == []
    expand(browser, "holders")
    expand(browser, "events")
    wait_for(lambda: len(expanded(browser, "holders")) == 1, "the holder's stack expanded")
    wait_for(lambda: len(expanded(browser, "events")) == 1, "the timeout's holders expanded")
    (now_at,) = expanded(browser, "holders")
    assert HOLD_NOW in now_at.splitlines()
    (held_by,) = expanded(browser, "events")
    assert [line.split(", opened at")[0] for line in held_by.splitlines()] == [
        "2 of 3 held by GET /demo/leak",
        "1 of 3 held by GET /demo/hold",
    ]

    # The next refresh (every 5 s) rebuilds the tables, and keeps the reader's choices.
    before = status(browser)
    wait_for(lambda: status(browser) != before, "a refresh within 10 s")
    assert cells(browser, "holders")[0][0] == "age ▲"
    assert len(expanded(browser, "holders")) == len(expanded(browser, "events")) == 1

    # A second click: oldest first again.
    retry_stale(lambda: browser.find_element(By.CSS_SELECTOR, "#holders th.sort").click())
    wait_for(lambda: cells(browser, "holders")[0][0] == "age ▼", "the age header back at ▼")
    assert [row[1] for row in cells(browser, "holders")[1:]] == [
        "GET /demo/leak", "GET /demo/leak", "GET /demo/hold"
    ]
    if screenshot:
        save_screenshot(browser, ROOT / screenshot)


# Markup that would run if the page inserted it as HTML: an image whose error handler (the CSP
# blocks the image, which fires it) renames the page, and a script that opens an alert.
HOSTILE_ROUTE = (
    "/<img src=x onerror=\"document.title='injected'\">/<script>alert('injected')</script>/{item}"
)
TOKEN = "a-token-for-the-browser-test"


@pytest.fixture
def hostile_app(tmp_path: Path) -> Iterator[str]:
    """An app in this process whose one route path is HTML and leaks; serve it, yield its URL."""
    engine = create_engine(
        f"sqlite:///{tmp_path / 'hostile.db'}",
        poolclass=QueuePool,
        connect_args={"check_same_thread": False},
    )
    monitor = SessionMonitor(
        engine,
        registry=CollectorRegistry(),
        log_leaks=False,
        diagnostics_path=PAGE,
        diagnostics_token=TOKEN,
    )
    kept: list[Session] = []
    app = FastAPI()

    @app.get(HOSTILE_ROUTE)
    def leak(item: str) -> str:
        session = Session(engine)
        session.execute(text("select 1"))
        kept.append(session)
        return item

    monitor.instrument_app(app)
    listener = socket.socket()
    listener.bind((HOST, 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        assert eventually(lambda: server.started, timeout=WAIT, interval=0.02), "uvicorn did not start"
        yield f"http://{HOST}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listener.close()
        for session in kept:
            session.close()
        monitor.uninstrument()
        engine.dispose()


def test_html_in_a_route_is_shown_as_text_and_never_runs(
    browser: WebDriver, hostile_app: str
) -> None:
    route_path = HOSTILE_ROUTE.replace("{item}", "x")
    with http_client(hostile_app) as http:
        assert http.get(route_path).status_code == 200

    browser.get(f"{hostile_app}{PAGE}")  # no token: refused, and told how to get in
    assert "Send the token" in browser.find_element(By.TAG_NAME, "body").text

    open_page(browser, f"{hostile_app}{PAGE}?token={TOKEN}")  # the page passes it on to /json
    request = f"GET {HOSTILE_ROUTE}"
    assert [row[1] for row in cells(browser, "holders")[1:]] == [request]
    assert [row[1] for row in cells(browser, "groups")[1:]] == [request]
    assert [row[2] for row in cells(browser, "leaks")[1:]] == [request]
    time.sleep(0.5)  # an injected handler would have run by now
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert  # noqa: B018 (the property raises when no alert is open)
    assert browser.title == TITLE
    assert browser.execute_script(
        "return [document.images.length, document.scripts.length]"
    ) == [0, 1]

    # The string is live: inserted as markup into this page, under its CSP, its handler runs.
    browser.execute_script(
        "const probe = document.createElement('div'); probe.innerHTML = arguments[0];"
        "document.body.appendChild(probe);",
        route_path,
    )
    wait_for(lambda: browser.title == "injected", "the probe's handler run")


# 2026-01-31 23:59:58+01:00: ISO 8601 date and time, with the zone's offset from UTC.
ISO_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d\d:\d\d")


def wider_than_the_window(browser: WebDriver) -> list[str]:
    """The tables that would need a horizontal scroll at the window's width, by id."""
    wide: list[str] = browser.execute_script(
        "return [...document.querySelectorAll('table')].filter(t => t.offsetParent !== null &&"
        " t.scrollWidth > t.parentElement.clientWidth).map(t => t.id);"
    )
    return wide


def test_the_page_shows_every_worker(
    browser: WebDriver, servers: Servers, tmp_path: Path
) -> None:
    running = start_server("uvicorn", tmp_path, servers)
    pids = running.workers()
    leaks = spread(running.url, "/leak", pids)
    spread(running.url, "/exhaust", pids)  # a pool timeout and two pitfalls in every worker
    holds = Holds(running)
    try:
        holds.until_every_worker_holds(pids)
        open_page(browser, running.url + PAGE)
        wait_for(lambda: len(cells(browser, "workers")) == 1 + len(pids), "three workers")

        workers = cells(browser, "workers")
        assert workers[0] == ["worker", "status", "why"]
        assert {int(row[0]) for row in workers[1:]} == pids
        assert sorted(row[1] for row in workers[1:]) == ["answered", "answered", "this worker"]
        assert not browser.find_element(By.ID, "note").is_displayed()
        assert "3 of 3 workers shown" in status(browser)

        pools = cells(browser, "pools")
        assert pools[0] == ["pool", "used", "idle", "waiting", "max", "workers"]
        used = leaks.total() + holds.by_worker.total()
        assert ["workers.db", str(used)] == pools[1][:2] or ["workers.db", str(used)] in [
            row[:2] for row in pools[1:]
        ]

        holders = cells(browser, "holders")
        assert holders[0] == [
            "age ▼", "worker", "request", "kind", "pool", "transaction", "opened at", "holder",
            "now at",
        ]
        assert Counter((int(row[1]), row[2]) for row in holders[1:]) == Counter(
            {**{(pid, "POST /leak"): n for pid, n in leaks.items()},
             **{(pid, "GET /hold"): n for pid, n in holds.by_worker.items()}}
        )
        assert {row[7] for row in holders[1:] if row[2] == "POST /leak"} == {
            "nobody: leaked, its request ended"
        }
        for table in ("events", "leaks", "pitfalls"):
            rows = cells(browser, table)[1:]
            assert {int(row[1]) for row in rows} == pids, table
            assert all(ISO_TIME.fullmatch(row[0]) for row in rows), rows
        assert wider_than_the_window(browser) == []

        screenshot = os.environ.get(WORKERS_SCREENSHOT_ENV)
        if screenshot:
            save_screenshot(browser, ROOT / screenshot)

        # A stopped worker: the page says plainly that it shows two of three. Loaded by another
        # host name, so that the browser has no kept-alive connection to the stopped worker.
        victim = min(pids)
        os.kill(victim, signal.SIGSTOP)
        try:
            port = running.url.rsplit(":", 1)[1]
            browser.get(f"http://localhost:{port}{PAGE}")
            note = browser.find_element(By.ID, "note")
            wait_for(note.is_displayed, "the note that a worker is not answering")
            assert note.text.startswith(
                f"This page shows 2 of 3 workers: pid {victim} is not answering"
            )
            assert [row[1:] for row in cells(browser, "workers") if row[0] == str(victim)] == [
                ["not answering", "no answer within 1 s"]
            ]
            assert {row[1] for row in cells(browser, "holders")[1:]} == {
                str(pid) for pid in pids - {victim}
            }
            if screenshot:
                stopped = ROOT / screenshot
                save_screenshot(browser, stopped.with_name(f"{stopped.stem}-stopped.png"))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGCONT)
    finally:
        holds.release()
