"""The load generator that the benchmarks drive servers with."""

from __future__ import annotations

import socket
import subprocess
import sys
import time


def test_load_generator_stops_with_one_line_when_no_server_answers():
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.load", "--target", f"127.0.0.1:{port}", "--clients", "2"]
        + ["--seconds", "1", "--connect-timeout", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"benchmarks.load: no answer from 127.0.0.1:{port} within 1 s (DEADLINE_EXCEEDED)"
    ]
    assert time.monotonic() - started < 30
