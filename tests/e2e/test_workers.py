"""--workers: several server processes on one port, supervised by a parent (service/api/workers.py)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.pb.nextword.v1 import nextword_pb2 as pb
from service.pb.nextword.v1 import nextword_pb2_grpc as pb_grpc
from tests.conftest import ROOT
from tests.e2e.test_server import serve_process


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def children(pid: int) -> set[int]:
    """The worker processes of the server ``pid`` (not multiprocessing's resource tracker)."""
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        pids = {int(p) for p in handle.read().split()}
    return {p for p in pids if b"spawn_main" in open(f"/proc/{p}/cmdline", "rb").read()}


def fresh_call(port: int, text: str = "we ") -> pb.SuggestResponse:
    """A Suggest on a connection of its own (gRPC shares one per target unless told not to)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        return pb_grpc.NextWordStub(channel).Suggest(pb.SuggestRequest(text=text), timeout=30)


def log_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def wait_for(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture
def two_workers(tiny_char_model, tmp_path):
    metrics_port = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as stderr:
        process, port = serve_process(
            tiny_char_model, "--workers", "2", "--metrics-port", str(metrics_port), "--grace", "5", stderr=stderr
        )
    try:
        yield process, port, metrics_port, log
    finally:
        process.kill()
        process.wait()
        process.stdout.close()


def test_workers_share_the_port_sum_their_metrics_and_drain_on_sigterm(two_workers):
    process, port, metrics_port, log = two_workers
    workers = children(process.pid)
    assert len(workers) == 2
    answers = [fresh_call(port) for _ in range(24)]
    assert all(answer.suggestions for answer in answers)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        generation = pb_grpc.NextWordStub(channel).Generate(
            pb.GenerateRequest(prompt="we", max_tokens=300, seed=1), timeout=30
        )
        first = next(generation)
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        suggests = re.search(
            r'nextword_requests_total\{code="OK",method="Suggest",model="[^"]+",protocol="grpc"\} (\S+)', text
        )
        assert suggests and float(suggests.group(1)) == 24.0  # the sum over both workers
        assert "nextword_model_info{" in text
        process.send_signal(signal.SIGTERM)
        rest = list(generation)  # the stream in flight finishes within the grace period
    assert first.text and rest
    assert process.wait(timeout=30) == 0
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)  # none outlives the parent
    served_by = {line["worker"] for line in log_lines(log) if line.get("method") == "Suggest"}
    assert served_by == {0, 1}  # the kernel spread 24 connections over both


def test_a_killed_worker_is_replaced_and_the_port_keeps_answering(two_workers):
    process, port, _, log = two_workers
    victim = min(children(process.pid))
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: any("serves (a replacement)" in line["message"] for line in log_lines(log)))
    replaced = children(process.pid)
    assert len(replaced) == 2 and victim not in replaced
    assert any("was killed by SIGKILL while serving" in line["message"] for line in log_lines(log))
    assert all(fresh_call(port).suggestions for _ in range(12))
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


@pytest.mark.slow
def test_a_worker_that_cannot_load_the_model_fails_the_start_in_one_line(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    command = [sys.executable, "-m", "service", "--model", str(bad), "--workers", "2", "--port", "0"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nextword-serve: error:") and "bad.pt" in lines[0], lines


def test_a_crash_loop_backs_off(two_workers):
    """A worker that dies soon after it starts serving is restarted after growing pauses, not at once."""
    process, port, _, log = two_workers

    def said(text: str) -> list[str]:
        return [line["message"] for line in log_lines(log) if text in line["message"]]

    for killed in range(1, 4):  # the newest worker each time: the same worker index, once it serves again
        os.kill(max(children(process.pid)), signal.SIGKILL)
        wait_for(lambda killed=killed: len(said("serves (a replacement)")) == killed, 90)
    lines = said("restarting it in")
    pauses = [float(re.search(r"restarting it in ([\d.]+) s", line).group(1)) for line in lines]
    assert pauses == [0.5, 1.0, 2.0]
    assert "was killed by SIGKILL while serving" in lines[0] and "3 time(s) in a row" in lines[2]
    assert all(fresh_call(port).suggestions for _ in range(6))
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


def test_workers_share_the_http_port_too(tiny_char_model, tmp_path):
    http_port = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as stderr:
        process, _ = serve_process(
            tiny_char_model, "--workers", "2", "--no-metrics", "--http-port", str(http_port), stderr=stderr
        )
    try:
        for _ in range(24):  # a connection each: the kernel spreads them over the workers
            request = urllib.request.Request(
                f"http://127.0.0.1:{http_port}/v1/suggest", data=b'{"text": "we "}', method="POST"
            )
            request.add_header("Content-Type", "application/json")
            with urllib.request.urlopen(request, timeout=30) as response:
                assert json.loads(response.read())["suggestions"]
        served_by = {line["worker"] for line in log_lines(log) if line.get("protocol") == "http"}
        assert served_by == {0, 1}
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.stdout.close()
