"""A real uvicorn server on a free loopback port, in a thread, for tests that need real sockets."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn


@dataclass
class RunningServer:
    server: uvicorn.Server
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no request task is running: the app, and its middleware, have returned."""
        deadline = time.monotonic() + timeout
        while self.server.server_state.tasks:
            assert time.monotonic() < deadline, f"requests still running after {timeout} s"
            time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@contextlib.contextmanager
def serve(app: Any) -> Iterator[RunningServer]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", http="h11", loop="asyncio")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped while starting"
        assert time.monotonic() < deadline, "uvicorn did not start within 10 s"
        time.sleep(0.01)
    try:
        yield RunningServer(server, "127.0.0.1", port)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listener.close()


def start_then_hang_up(
    host: str, port: int, path: str, *, read_body: bool, wait: float = 0.0
) -> bytes:
    """Send a GET, optionally read until the first body bytes arrive, then close the socket."""
    with socket.create_connection((host, port), timeout=5) as client:
        client.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        received = b""
        if read_body:
            while b"\r\n\r\n" not in received or received.endswith(b"\r\n\r\n"):
                chunk = client.recv(4096)
                assert chunk, "server closed the connection before sending a body"
                received += chunk
        time.sleep(wait)
    return received
