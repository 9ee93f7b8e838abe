"""A project's test suite from its sdist: fetched once with pip, only the wanted members extracted,
kept in a cache folder git ignores; and the locks that runs sharing the cache take."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath


class SuiteUnavailable(Exception):
    """No suite to run: no network, or an sdist without the tests (the beds exit 3)."""


def ignored(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    marker = cache / ".gitignore"
    if not marker.exists():
        # Like pytest's and mypy's caches: ignored by git whatever the repository's .gitignore.
        marker.write_text("# created by tests/sdist_suite/obtain.py\n*\n")
    return cache


@contextlib.contextmanager
def exclusive(cache: Path, name: str) -> Iterator[None]:
    """Hold the cache's lock `name`: runs in other processes (another venv, another worker's
    pytest) share the cache, and a bed's database."""
    path = ignored(cache) / "locks" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.lock"
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


def fetch_sdist(project: str, version: str, cache: Path, timeout: float) -> Path:
    sdist = ignored(cache) / f"{project}-{version}.tar.gz"
    if sdist.exists():
        return sdist
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as download:
        # --no-binary for the project alone: its build requirements may still come as wheels,
        # which is what makes preparing the sdist's metadata take seconds rather than minutes.
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        command += ["--no-binary", project, "--disable-pip-version-check"]
        command += [f"{project}=={version}", "-d", download]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise SuiteUnavailable(
                f"pip download of the {project} {version} sdist took over {timeout}s"
            ) from None
        found = sorted(Path(download).glob("*.tar.gz"))
        if done.returncode != 0 or not found:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            tail = re.sub(r"\b\w+://\S+", "<url>", tail)  # no index address in a message
            raise SuiteUnavailable(
                f"pip could not download the {project} {version} sdist "
                f"(exit {done.returncode}):\n{tail}"
            )
        os.replace(found[0], sdist)
    return sdist


def _wanted(name: str, members: tuple[str, ...]) -> str | None:
    """The member's path inside the sdist's top directory, if it is one to extract: a file named
    in `members`, or anything under a folder named there (``"test/"``)."""
    parts = PurePosixPath(name).parts
    if len(parts) < 2 or any(part in ("", ".", "..") for part in parts) or name.startswith("/"):
        return None
    inner = "/".join(parts[1:])
    if any(inner == want or (want.endswith("/") and inner.startswith(want)) for want in members):
        return inner
    return None


def extract(
    sdist: Path,
    destination: Path,
    members: tuple[str, ...],
    required: tuple[str, ...],
    prepare: Callable[[Path], None] | None = None,
) -> Path:
    """`members` of the sdist into `destination`, once: a suite lacking one of `required` is
    unavailable; `prepare` then adds what the bed needs beside it (a pytest.ini)."""
    if (destination / ".complete").exists():
        return destination
    work = Path(tempfile.mkdtemp(dir=destination.parent, prefix=".extract-"))
    try:
        with tarfile.open(sdist) as archive:
            for member in archive:
                inner = _wanted(member.name, members)
                if inner is None or not member.isfile():
                    continue  # no links, devices or directories taken from the archive
                source = archive.extractfile(member)
                assert source is not None
                target = work / inner
                target.parent.mkdir(parents=True, exist_ok=True)
                with source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out)
        missing = [path for path in required if not (work / path).exists()]
        if missing:
            raise SuiteUnavailable(f"{sdist.name} has no {' or '.join(missing)}")
        if prepare is not None:
            prepare(work)
        (work / ".complete").write_text(sdist.name + "\n")
        work.chmod(0o755)  # mkdtemp's 0o700 is for the temporary name only
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(work, destination)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return destination


def obtain_suite(
    project: str,
    version: str,
    cache: Path,
    members: tuple[str, ...],
    required: tuple[str, ...],
    *,
    pip_timeout: float,
    prepare: Callable[[Path], None] | None = None,
) -> Path:
    """The extracted suite of `project` `version` (``<cache>/<project>-<version>/``), fetched and
    extracted the first time; raises SuiteUnavailable."""
    with exclusive(cache, f"suite-{version}"):
        sdist = fetch_sdist(project, version, cache, pip_timeout)
        try:
            return extract(sdist, cache / f"{project}-{version}", members, required, prepare)
        except (tarfile.TarError, EOFError, OSError) as error:
            sdist.unlink(missing_ok=True)  # a truncated download: fetched again next time
            raise SuiteUnavailable(f"cannot extract {sdist.name}: {error}") from None
