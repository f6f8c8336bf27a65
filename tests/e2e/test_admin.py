"""The admin port: off by default, every call needs a token bound to admin, and it lists, adds, reloads and
removes models at run time, in one process and in every worker."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import urllib.request

import grpc

from service.client import NextWordClient
from service.model.engine import file_version
from tests.conftest import ROOT
from tests.e2e.test_server import serve_process
from tests.e2e.test_workers import free_port

ADMIN = "token-for-admin-0123456789"
ANN = "token-for-ann-0123456789"


def admin(port: int, method: str, path: str, body=None, token: str | None = ADMIN):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode() if body is not None else None, method=method
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def tokens(tmp_path) -> str:
    path = tmp_path / "tokens"
    path.write_text(f"{ADMIN} admin\n{ANN} ann\n")
    return str(path)


def test_the_admin_port_needs_a_token_bound_to_admin(tiny_char_model, tmp_path):
    command = [sys.executable, "-m", "service", "--model", tiny_char_model, "--port", "0", "--workers", "1"]
    command += ["--no-metrics", "--history-db", "off", "--admin-port", "0"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "token bound to admin" in result.stderr


def test_list_add_reload_and_remove_a_model_at_run_time(tiny_char_model, tiny_ime_model, tmp_path):
    port = free_port()
    served = tmp_path / "m.pt"
    shutil.copy(tiny_char_model, served)
    process, grpc_port = serve_process(
        str(served), "--auth-token-file", tokens(tmp_path), "--admin-port", str(port), "--history-db", "off"
    )
    client = NextWordClient(f"127.0.0.1:{grpc_port}", token=ADMIN)
    try:
        assert admin(port, "GET", "/admin/models", token=None)[0] == 401
        assert admin(port, "GET", "/admin/models", token=ANN)[0] == 401  # a token, but not bound to admin
        status, listed = admin(port, "GET", "/admin/models")
        [model] = listed["models"]
        assert status == 200 and model["name"] == "m" and model["version"] == file_version(str(served))
        assert model["path"] == str(served) and model["loaded_at"] > 0 and model["calls"] == 0
        status, added = admin(port, "POST", "/admin/models", {"name": "zh", "path": tiny_ime_model})
        assert status == 200 and added["results"]["zh"].startswith("added")
        assert NextWordClient(f"127.0.0.1:{grpc_port}", token=ADMIN, model="zh").info().pinyin
        assert admin(port, "POST", "/admin/models", {"name": "zh", "path": tiny_ime_model})[0] == 409
        assert admin(port, "POST", "/admin/models", {"name": "x", "path": "/no/such.pt"})[0] == 400
        assert admin(port, "POST", "/admin/models/zh:reload")[1]["results"] == {"zh": "unchanged"}
        assert admin(port, "DELETE", "/admin/models/zh")[0] == 200
        try:
            NextWordClient(f"127.0.0.1:{grpc_port}", token=ADMIN, model="zh").info()
            raise AssertionError("the removed model still answers")
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
        assert admin(port, "DELETE", "/admin/models/m")[0] == 400  # the last model stays
        assert client.suggest("we ").suggestions
    finally:
        client.close()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        process.stdout.close()


def test_with_workers_each_one_carries_the_operation_out(tiny_char_model, tiny_ime_model, tmp_path):
    port = free_port()
    process, grpc_port = serve_process(
        tiny_char_model,
        "--workers",
        "2",
        "--no-metrics",
        "--history-db",
        "off",
        "--auth-token-file",
        tokens(tmp_path),
        "--admin-port",
        str(port),
    )
    try:
        status, added = admin(port, "POST", "/admin/models", {"name": "zh", "path": tiny_ime_model})
        assert status == 200 and [w["worker"] for w in added["workers"]] == [0, 1]
        for _ in range(8):  # a fresh connection each: whichever worker answers serves zh now
            with NextWordClient(f"127.0.0.1:{grpc_port}", token=ADMIN, model="zh") as client:
                assert client.info().pinyin
        status, listed = admin(port, "GET", "/admin/models")
        assert status == 200 and len(listed["workers"]) == 2
        assert all(len(w["models"]) == 2 and "zh" in {m["name"] for m in w["models"]} for w in listed["workers"])
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        process.stdout.close()
