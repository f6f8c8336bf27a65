"""Private by default: a server reachable beyond loopback serves no one's history without tokens, and idle
health Watch streams never starve the server."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.config import ServerConfig
from service.api.server import check_exposure, is_loopback
from service.pb.nextword.v1 import nextword_pb2 as pb
from service.pb.nextword.v1 import nextword_pb2_grpc as pb_grpc
from tests.conftest import ROOT
from tests.e2e.test_server import start


def test_a_server_beyond_loopback_with_history_and_no_tokens_does_not_start(tiny_char_model, tmp_path):
    command = [sys.executable, "-m", "service", "--model", tiny_char_model, "--host", "0.0.0.0", "--port", "0"]
    command += ["--workers", "1", "--no-metrics", "--history-db", str(tmp_path / "h.sqlite")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--auth-token-file" in lines[0] and "--trust-user-header" in lines[0]
    assert "Traceback" not in result.stderr and "SERVING" not in result.stdout


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("[::1]", True), ("localhost", True)]
    + [("0.0.0.0", False), ("[::]", False), ("10.1.2.3", False), ("example.org", False)],
)
def test_loopback_addresses(host, loopback):
    assert is_loopback(host) is loopback


def test_the_ways_out_each_let_an_exposed_server_start(caplog):
    exposed = {"host": "[::]", "history_db": "h.sqlite"}
    with pytest.raises(ValueError, match="--trust-user-header"):
        check_exposure(ServerConfig(**exposed), [])
    check_exposure(ServerConfig(**exposed, trust_user_header=True), [])
    check_exposure(ServerConfig(host="[::]", history_db="off"), [])
    check_exposure(ServerConfig(history_db="h.sqlite"), [])  # the default host: loopback
    from service.api.users import Grant

    with caplog.at_level("WARNING", logger="nextword"):
        check_exposure(ServerConfig(**exposed), [Grant("a-token-0123456789abcdef", frozenset({"ann"}))])
    assert [r.getMessage() for r in caplog.records if "plaintext" in r.getMessage()], "tokens in plaintext: a warning"


def test_idle_watch_streams_do_not_starve_check_or_suggest(tiny_char_model):
    """More idle Watch streams than the server has request threads (max_concurrent_rpcs + spare)."""
    server, port, _ = start(tiny_char_model, max_concurrent_rpcs=32)  # 48 threads
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    watches = [health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60) for _ in range(300)]
    try:
        for watch in watches:
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == 1
        assert pb_grpc.NextWordStub(channel).Suggest(pb.SuggestRequest(text="we "), timeout=1).suggestions
        assert time.monotonic() - started < 1.0
        assert server.guard.watch_streams == 300
    finally:
        for watch in watches:
            watch.cancel()
        channel.close()
        server.stop(0)


def test_watch_streams_are_capped(tiny_char_model):
    server, port, _ = start(tiny_char_model, max_watch_streams=3)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    watches = [health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30) for _ in range(3)]
    try:
        for watch in watches:
            next(watch)
        with pytest.raises(grpc.RpcError) as refused:
            next(health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_watch_streams" in refused.value.details()
        watches.pop().cancel()  # a closed stream frees its place
        deadline = time.monotonic() + 5
        while server.guard.watch_streams > 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert next(health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)).status == 1
    finally:
        for watch in watches:
            watch.cancel()
        channel.close()
        server.stop(0)


def test_watch_sees_not_serving_when_the_server_stops(tiny_char_model):
    server, port, _ = start(tiny_char_model)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    threading.Thread(target=server.stop, args=(1,), daemon=True).start()
    statuses = []
    try:
        for answer in watch:
            statuses.append(answer.status)
    except grpc.RpcError:
        pass
    channel.close()
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
