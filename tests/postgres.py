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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server; yields its URL (user ``nextword``, database ``postgres``, a Unix socket)."""
    as_user: list[str] = []
    folder = tempfile.mkdtemp(prefix="nextword-pg-")
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = os.path.join(folder, "data"), _free_port()
    run = lambda *command: subprocess.run([*as_user, *command], check=True, capture_output=True, text=True)  # noqa: E731
    run(_program("initdb"), "-D", data, "-U", "nextword", "--auth=trust", "--no-sync", "-E", "UTF8")
    options = f"-p {port} -k {folder} -c listen_addresses='' -c fsync=off"
    run(_program("pg_ctl"), "-D", data, "-o", options, "-l", os.path.join(folder, "log"), "-w", "start")
    try:
        yield f"postgresql://nextword@/postgres?host={folder}&port={port}"
    finally:
        subprocess.run([*as_user, _program("pg_ctl"), "-D", data, "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
