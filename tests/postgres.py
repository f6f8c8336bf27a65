"""A real PostgreSQL server for the tests, on a temporary directory and port (not a mock).

Uses the PostgreSQL server programs on this machine (Debian's ``postgresql`` package; .ci/run
installs it when missing). PostgreSQL refuses to run as root, so as root the server runs as the
``postgres`` user. Without the programs the tests that need it are skipped, saying why.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


def _program(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def missing() -> str | None:
    """Why a server cannot be started here, or None."""
    if _program("initdb") is None or _program("pg_ctl") is None:
        return "PostgreSQL's server programs (initdb, pg_ctl) are not installed"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser to start PostgreSQL as another user"
    return None


def required() -> None:
    """Skips the test where no server can be started here; fails it in CI, which must test PostgreSQL."""
    import pytest

    why = missing()
    if why and os.environ.get("CI") == "true":
        pytest.fail(f"{why}: CI must test the PostgreSQL store (.ci/run installs PostgreSQL)")
    if why:
        pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    """A running server that a test may stop and start again (a database restart), keeping its data."""

    def __init__(self, folder: str, as_user: list[str]) -> None:
        self.folder, self.as_user = folder, as_user
        self.data, self.port = os.path.join(folder, "data"), _free_port()
        self.url = f"postgresql://nextword@/postgres?host={folder}&port={self.port}"
        self._run(_program("initdb"), "-D", self.data, "-U", "nextword", "--auth=trust", "--no-sync", "-E", "UTF8")

    def _run(self, *command: str | None) -> None:
        subprocess.run([*self.as_user, *command], check=True, capture_output=True, text=True)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses='' -c fsync=off"
        self._run(
            _program("pg_ctl"), "-D", self.data, "-o", options, "-l", os.path.join(self.folder, "log"), "-w", "start"
        )

    def stop(self, mode: str = "fast") -> None:
        """``fast``: sessions are ended, as a restart ends them; ``immediate``: as a crash."""
        subprocess.run(
            [*self.as_user, _program("pg_ctl"), "-D", self.data, "-m", mode, "-w", "stop"], capture_output=True
        )


@contextmanager
def postgres_control() -> Iterator[PostgresServer]:
    """Start a server on a temporary directory; yields it (``url``, ``stop()``, ``start()``)."""
    as_user: list[str] = []
    folder = tempfile.mkdtemp(prefix="nextword-pg-")
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    server = PostgresServer(folder, as_user)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server; yields its URL (user ``nextword``, database ``postgres``, a Unix socket)."""
    with postgres_control() as server:
        yield server.url
