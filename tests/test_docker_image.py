"""The example app's image, without Docker: the command of example_app/Dockerfile, run here.

A plain `uvicorn app:app` configures only uvicorn's own loggers, without time, and a library's
WARNINGs reach stderr bare; the image's log lines must carry time, level and logger, those of
session_monitor among them.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
from _e2e_servers import Servers, eventually, free_port, http_client, wait_for_http

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "example_app" / "Dockerfile"
STAMPED = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "

pytestmark = pytest.mark.e2e


def image_command() -> list[str]:
    text = DOCKERFILE.read_text(encoding="utf-8")
    cmd = re.search(r"^CMD\s+(\[.*\])\s*$", text, re.MULTILINE)
    assert cmd, f"{DOCKERFILE}: no CMD in exec form"
    return list(json.loads(cmd.group(1)))


def with_option(command: list[str], name: str, value: str) -> list[str]:
    at = command.index(name)
    return [*command[: at + 1], value, *command[at + 2 :]]


def test_the_images_log_lines_carry_time_level_and_logger(tmp_path: Path) -> None:
    command = image_command()
    assert command[0] == "uvicorn", command
    port = free_port()
    command = with_option(with_option(command, "--host", "127.0.0.1"), "--port", str(port))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    # The image's WORKDIR is a copy of the checkout, and its PYTHONPATH that copy.
    env |= {"DATABASE_URL": f"sqlite:///{tmp_path / 'app.db'}", "PYTHONPATH": str(ROOT)}
    servers = Servers(tmp_path)
    try:
        app = servers.start("uvicorn", [sys.executable, "-m", *command], port=port, env=env)
        wait_for_http(app, "/metrics", timeout=30)
        with http_client(app.url) as client:
            assert client.get("/demo/leak").status_code == 200
            assert eventually(lambda: "Leaked session" in app.log.read_text(), timeout=10)
            assert client.post("/demo/leak/release").status_code == 200
    finally:
        leftovers = servers.stop_all()
    assert not leftovers, leftovers

    lines = app.log.read_text(encoding="utf-8").splitlines()

    def line_with(text: str) -> str:
        found = [line for line in lines if text in line]
        assert found, f"no line with {text!r} in:\n" + "\n".join(lines)
        return found[0]

    assert re.match(f"{STAMPED}WARNING session_monitor: Leaked session", line_with("Leaked"))
    assert re.match(
        f"{STAMPED}INFO uvicorn.error: Application startup complete", line_with("startup complete")
    )
    assert re.match(
        f'{STAMPED}INFO uvicorn.access: .*"GET /demo/leak HTTP/1.1" 200',
        line_with("GET /demo/leak "),
    )
