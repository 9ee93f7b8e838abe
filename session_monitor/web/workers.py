"""The other workers of a server, for the diagnostics page: each answers over a Unix socket.

Under ``PROMETHEUS_MULTIPROC_DIR`` (gunicorn, ``uvicorn --workers N``) each worker keeps its own
sessions and pools, and a request reaches one of them. With the diagnostics page on, every worker
listens on ``<PROMETHEUS_MULTIPROC_DIR>/session_monitor/<pid>.sock``; the worker serving the page
asks all the others at once and waits for their answers a short while in all (`ask_workers`).

- Nothing per request or per checkout: one daemon thread per worker waits in ``accept()`` and
  builds its answer only when asked. Because it is a thread, a worker whose event loop is blocked
  by a sync call still answers, which is when its holders matter most.
- It starts when the app's lifespan starts (`WorkerSocket.start`), so only the processes that
  serve requests listen: not a preloading master (gunicorn ``--preload``), not a process forked
  by a worker (a forked child closes its copy of the socket, `forking.py`).
- Only the server's user can connect: the directory is created with mode 0700 and used only if
  it is this user's and closed to others; each socket is 0600. No TCP port is opened.
- A socket whose process is gone is removed by the next asker, as `forget_dead_workers` drops
  the gone workers' gauges.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from ..exporters.multiprocess import process_alive
from ..hooks.forking import Stage, in_child, new_lock

SOCKET_DIRECTORY = "session_monitor"
_SUFFIX = ".sock"
_MAX_ANSWER = 64 * 1024 * 1024  # far above any page's data; an answer above it is refused
_SEND_TIMEOUT = 10.0  # an asker that reads nothing for this long is given up
ANSWERED = "answered"
NOT_ANSWERING = "not answering"
FAILED = "failed"

logger = logging.getLogger("session_monitor")


class UnusableDirectoryError(OSError):
    """The sockets' directory is not this user's alone: nobody listens or asks there."""


class WorkerAnswer(NamedTuple):
    pid: int
    status: str  # ANSWERED, NOT_ANSWERING or FAILED
    data: dict[str, Any] | None  # the worker's `diagnostics_data`, when it answered
    detail: str  # why it did not answer, for the page


def _open_directory(multiprocess_directory: str, *, create: bool) -> tuple[int, str]:
    """The sockets' directory, open (its descriptor, its path); only if this user's, mode 0700."""
    path = os.path.join(multiprocess_directory, SOCKET_DIRECTORY)
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0))
    status = os.fstat(descriptor)
    if status.st_uid != os.geteuid() or status.st_mode & 0o077:
        os.close(descriptor)
        raise UnusableDirectoryError(
            f"{path} must belong to this user (uid {os.geteuid()}) and be closed to others "
            f"(mode 0700); it belongs to uid {status.st_uid} with mode "
            f"{status.st_mode & 0o777:04o}: remove it, the workers create it again"
        )
    return descriptor, path


def _address(descriptor: int, path: str, name: str) -> str:
    # Through the open directory: the same directory that was checked, and short, where a Unix
    # socket's path may have about 100 bytes only.
    if os.path.isdir("/proc/self/fd"):
        return f"/proc/self/fd/{descriptor}/{name}"
    return os.path.join(path, name)


def _pid_of(name: str) -> int | None:
    stem = name.removesuffix(_SUFFIX)
    return int(stem) if stem != name and stem.isdigit() else None


def _remove(descriptor: int, name: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=descriptor)


class WorkerSocket:
    """This worker's listener: a daemon thread that sends `payload()` to each connection."""

    def __init__(
        self,
        multiprocess_directory: str,
        payload: Callable[[], bytes],
        failed: Callable[[str], None],
    ) -> None:
        self.directory = multiprocess_directory
        self._payload = payload
        self._failed = failed
        self._listener: socket.socket | None = None
        self._lock = new_lock()
        # Why this worker does not listen, for the page; None while it listens or never tried.
        self.problem: str | None = None
        self._warned = False
        in_child(Stage.FORGET, self._forked)

    @property
    def listening(self) -> bool:
        return self._listener is not None

    def start(self) -> None:
        """Listen, from this process; a second call does nothing. Never raises."""
        with self._lock:
            if self._listener is not None:
                return
            try:
                listener = self._listen()
            except OSError as error:
                self.problem = f"this worker cannot listen for the others: {error}"
                if not self._warned:
                    self._warned = True
                    logger.warning("session_monitor: %s; the diagnostics page shows each "
                                   "worker alone", self.problem)
                return
            thread = threading.Thread(
                target=self._serve, args=(listener,), name="session_monitor-workers", daemon=True
            )
            try:
                thread.start()
            except Exception:
                listener.close()
                self._failed("worker_socket")
                return
            self._listener = listener
            self.problem = None

    def _listen(self) -> socket.socket:
        pid = os.getpid()
        name, temporary = f"{pid}{_SUFFIX}", f"{pid}.tmp"
        descriptor, path = _open_directory(self.directory, create=True)
        try:
            _remove(descriptor, temporary)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                listener.bind(_address(descriptor, path, temporary))
                os.chmod(temporary, 0o600, dir_fd=descriptor)
                listener.listen(16)
                # Under its name only once listening: a socket there that refuses a connection
                # has lost its worker, and an asker may remove it.
                os.replace(temporary, name, src_dir_fd=descriptor, dst_dir_fd=descriptor)
            except BaseException:
                listener.close()
                _remove(descriptor, temporary)
                raise
        finally:
            os.close(descriptor)
        return listener

    def stop(self) -> None:
        """Stop listening and remove the socket. Never raises."""
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is None:
            return
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the thread's accept(); close() does not
        listener.close()
        with contextlib.suppress(OSError):
            descriptor, _ = _open_directory(self.directory, create=False)
            _remove(descriptor, f"{os.getpid()}{_SUFFIX}")
            os.close(descriptor)

    def _forked(self) -> None:
        # The parent's socket is the parent's: close this copy of it, without shutdown() (which
        # would stop the parent's too) and without removing its file. A forked child that
        # serves requests (gunicorn --preload) starts its own at its lifespan.
        listener, self._listener = self._listener, None
        self.problem = None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.close()

    def _serve(self, listener: socket.socket) -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                if self._listener is not listener:
                    return  # stopped
                self._failed("worker_socket")  # out of descriptors, say: try again shortly
                time.sleep(1.0)
                continue
            with connection:
                try:
                    body = self._payload()
                except Exception:
                    self._failed("worker_socket")
                    body = json.dumps(
                        {"pid": os.getpid(), "error": "its diagnostics failed: see its log"}
                    ).encode()
                # OSError: the asker's deadline passed and it hung up.
                with contextlib.suppress(OSError):
                    connection.settimeout(_SEND_TIMEOUT)
                    connection.sendall(body, getattr(socket, "MSG_NOSIGNAL", 0))


def ask_workers(multiprocess_directory: str, deadline: float) -> list[WorkerAnswer]:
    """Every other worker's answer, by pid, asked all at once. Those without a whole answer after
    `deadline` seconds are NOT_ANSWERING. A socket whose worker is gone is removed.

    Raises OSError (UnusableDirectoryError among them) when there is no directory to ask in."""
    own = os.getpid()
    answers: list[WorkerAnswer] = []
    asking: dict[socket.socket, tuple[int, bytearray]] = {}
    descriptor, path = _open_directory(multiprocess_directory, create=False)
    try:
        for name in os.listdir(descriptor):
            pid = _pid_of(name)
            if pid is None or pid == own:
                continue
            if not process_alive(pid):
                _remove(descriptor, name)
                continue
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            try:
                client.connect(_address(descriptor, path, name))
            except (ConnectionRefusedError, FileNotFoundError):
                client.close()
                _remove(descriptor, name)  # nobody listens there any more
            except BlockingIOError:
                client.close()
                answers.append(WorkerAnswer(pid, NOT_ANSWERING, None, "it takes no connection"))
            except OSError as error:
                client.close()
                answers.append(WorkerAnswer(pid, FAILED, None, f"cannot connect: {error}"))
            else:
                asking[client] = (pid, bytearray())
    finally:
        os.close(descriptor)
    answers.extend(_read_answers(asking, deadline))
    answers.sort()
    return answers


def _read_answers(
    asking: dict[socket.socket, tuple[int, bytearray]], deadline: float
) -> list[WorkerAnswer]:
    answers = []
    end = time.monotonic() + deadline
    with selectors.DefaultSelector() as selector:
        for client in asking:
            selector.register(client, selectors.EVENT_READ)
        while asking and (left := end - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                pid, received = asking[ready]
                try:
                    chunk = ready.recv(1 << 16)
                except BlockingIOError:
                    continue
                except OSError as error:
                    answer = WorkerAnswer(pid, FAILED, None, f"connection lost: {error}")
                else:
                    if chunk and len(received) + len(chunk) <= _MAX_ANSWER:
                        received += chunk
                        continue
                    answer = _parsed(pid, received, complete=not chunk)
                selector.unregister(ready)
                ready.close()
                del asking[ready]
                answers.append(answer)
    for client, (pid, _) in asking.items():
        client.close()
        answers.append(WorkerAnswer(pid, NOT_ANSWERING, None, f"no answer within {deadline:g} s"))
    return answers


def _parsed(pid: int, received: bytearray, *, complete: bool) -> WorkerAnswer:
    if not complete:
        return WorkerAnswer(pid, FAILED, None, f"its answer is over {_MAX_ANSWER} bytes")
    try:
        data = json.loads(received)
    except ValueError:
        data = None
    if not isinstance(data, dict) or data.get("pid") != pid:
        return WorkerAnswer(pid, FAILED, None, "its answer is not diagnostics data")
    if "error" in data:
        return WorkerAnswer(pid, FAILED, None, str(data["error"]))
    return WorkerAnswer(pid, ANSWERED, data, "")
