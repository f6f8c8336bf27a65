"""A real server on port 0 with a tiny exported model, called through the real client."""

import os
import re
import select
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch

from service.api.config import ServerConfig
from service.api.server import create_server
from service.client import NextWordClient
from service.model.engine import Engine
from service.model.generation import GenerationParams
from service.pb.nextword.v1 import nextword_pb2 as pb
from tests.conftest import ROOT, run_cli


def start(model, **overrides):
    overrides = {"metrics_port": 0, "max_generate_tokens": 2000, "history_db": ":memory:", **overrides}
    config = ServerConfig(model=model, host="127.0.0.1", port=0, **overrides)
    engine = Engine.load(config)
    server, port = create_server(config, engine)
    return server, port, engine


def serve_process(model: str, *flags: str, stderr=subprocess.DEVNULL) -> tuple[subprocess.Popen, int]:
    """``python -m service`` on a free port, as a user starts it; (the process, its port) once it serves.
    One process unless ``flags`` name --workers (tests/e2e/test_workers.py)."""
    command = [sys.executable, "-m", "service", "--model", model, "--port", "0", "--host", "127.0.0.1"]
    if "--workers" not in flags:
        flags = ("--workers", "1", *flags)
    if "--history-db" not in flags:
        flags = ("--history-db", ":memory:", *flags)
    process = subprocess.Popen(
        [*command, "--metrics-port", "0", *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True
    )
    line = process.stdout.readline()
    match = re.search(r"SERVING on port (\d+)", line)
    if match is None:
        process.kill()
        raise AssertionError(f"the server did not start: {line!r}")
    return process, int(match.group(1))


def held_session(release: threading.Event, seconds: float = 30):
    """Type edits that open a session with "we", then hold it open until ``release`` is set."""
    yield pb.TypeRequest(append="we")
    release.wait(seconds)


@pytest.fixture(scope="module")
def served(tiny_char_model):
    server, port, engine = start(tiny_char_model)
    yield server, port, engine
    server.stop(0)


@pytest.fixture
def client(served):
    with NextWordClient(f"127.0.0.1:{served[1]}") as c:
        yield c


def test_suggest(client, served):
    response = client.suggest("she cook fresh ", 3)
    expected = served[2].suggester.suggest("she cook fresh ", 3)
    assert [(s.text, pytest.approx(s.probability)) for s in response.suggestions] == expected.suggestions
    assert response.suggestions[0].text == "bread" and not response.completes_word
    completion = client.suggest("we want gre")
    assert completion.completes_word and completion.prefix == "gre" and len(completion.suggestions) == 3
    assert all(s.text.startswith("gre") for s in completion.suggestions)


def collect(stream):
    pieces, finished = [], None
    for message in stream:
        if message.HasField("finished"):
            finished = message.finished
        else:
            pieces.append(message.text)
    return pieces, finished


@pytest.mark.parametrize("params", [dict(temperature=0), dict(seed=11, top_k=5, top_p=0.9)])
def test_streamed_generate_equals_one_piece(client, served, params):
    pieces, finished = collect(client.generate("we like", max_tokens=40, **params))
    engine_params = GenerationParams(
        max_tokens=40,
        temperature=params.get("temperature", 1.0),
        top_k=params.get("top_k", 0),
        top_p=params.get("top_p", 1.0),
        seed=params.get("seed"),
    )
    expected = "".join(e.text for e in served[2].generator.generate("we like", engine_params))
    assert len(pieces) > 1 and "".join(pieces) == expected
    assert finished.reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_END_TOKEN)
    assert finished.prompt_tokens == len("we like") and finished.generated_tokens >= len("".join(pieces))


def test_generate_stop_string(client):
    pieces, finished = collect(client.generate("we like", temperature=0, max_tokens=60, stop=["."]))
    assert "." not in "".join(pieces) and finished.reason == pb.FINISH_REASON_STOP_STRING


def test_type_answers_equal_suggest_including_after_deletes(client):
    edits = [pb.TypeRequest(append=c) for c in "we like gre"] + [
        pb.TypeRequest(delete=3),
        pb.TypeRequest(append="co", num_suggestions=5),
        pb.TypeRequest(delete=100),
        pb.TypeRequest(append="the old"),
        pb.TypeRequest(reset=True),
        pb.TypeRequest(append="my "),
    ]
    texts, text = [], ""
    for edit in edits:
        kind = edit.WhichOneof("edit")
        text = (
            text + edit.append
            if kind == "append"
            else text[: max(0, len(text) - edit.delete)]
            if kind == "delete"
            else ""
        )
        texts.append(text)
    responses = list(client.type(edits, timeout=30))
    assert [r.edit_index for r in responses] == list(range(1, len(edits) + 1))
    count = 3
    for response, text, edit in zip(responses, texts, edits):
        count = edit.num_suggestions or count
        assert response.text_length == len(text)
        if text:
            expected = client.suggest(text, count)  # same words; probabilities equal up to float rounding
            got = response.suggestions
            assert (got.completes_word, got.prefix) == (expected.completes_word, expected.prefix)
            assert [(x.text, pytest.approx(x.probability, rel=1e-5)) for x in got.suggestions] == [
                (x.text, x.probability) for x in expected.suggestions
            ]
        else:
            assert len(response.suggestions.suggestions) == 0


def test_client_cancel_stops_generation(client, served):
    stream = client.stub.Generate(pb.GenerateRequest(prompt="we", max_tokens=2000), timeout=30)
    next(stream)
    assert served[0].servicer.active_generations == 1
    stream.cancel()
    deadline = time.time() + 5
    while served[0].servicer.active_generations and time.time() < deadline:
        time.sleep(0.02)
    assert served[0].servicer.active_generations == 0


class SlowModel:
    """The served model, 50 ms slower per step, so a deadline falls in the middle of a generation."""

    def __init__(self, model):
        self.model, self.vocab_size, self.steps = model, model.vocab_size, 0

    def init_state(self, batch_size):
        return self.model.init_state(batch_size)

    def advance(self, tokens, state):
        time.sleep(0.05)
        self.steps += 1
        return self.model.advance(tokens, state)


def test_deadline_is_honoured(tiny_char_model):
    server, port, engine = start(tiny_char_model)
    engine.generator.model = slow = SlowModel(engine.model)
    try:
        with NextWordClient(f"127.0.0.1:{port}") as client:
            start_time = time.time()
            with pytest.raises(grpc.RpcError) as error:
                collect(
                    client.stub.Generate(pb.GenerateRequest(prompt="we", max_tokens=2000, temperature=0), timeout=0.3)
                )
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.time() - start_time < 2
            deadline = time.time() + 5
            while server.servicer.active_generations and time.time() < deadline:
                time.sleep(0.02)
            assert server.servicer.active_generations == 0
            steps = slow.steps
            time.sleep(0.3)
            assert slow.steps == steps < 20  # the server stopped generating too
    finally:
        server.stop(0)


def test_model_info(client, tiny_char_model):
    info = client.info()
    assert info.tokenizer == "char" and info.cell == "lstm" and info.format_version == 1
    assert info.corpus == ["tiny_en.txt"] and info.stream_validation_perplexity > 1
    assert info.max_suggestions == 20 and info.device == "cpu" and '"format": "nextword-model"' in info.manifest_json


def test_health_and_reflection(client, served):
    assert client.health() == "SERVING" and client.health("nextword.v1.NextWord") == "SERVING"
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    database = ProtoReflectionDescriptorDatabase(client.channel)
    services = set(database.get_services())
    assert {"nextword.v1.NextWord", "grpc.health.v1.Health"} <= services
    descriptor = database.FindFileContainingSymbol("nextword.v1.NextWord")
    assert descriptor.name == "nextword/v1/nextword.proto"


INVALID = [
    ("Suggest", pb.SuggestRequest(text=""), "text must not be empty"),
    ("Suggest", pb.SuggestRequest(text="a" * 10001), "text has 10001 characters; the limit is 10000"),
    (
        "Suggest",
        pb.SuggestRequest(text="hi", num_suggestions=21),
        "num_suggestions is 21; it must be 0 (meaning 3) to 20 (server setting max_suggestions)",
    ),
    ("Generate", pb.GenerateRequest(prompt=""), "prompt must not be empty"),
    (
        "Generate",
        pb.GenerateRequest(prompt="a", temperature=-1),
        "temperature is -1.0; it must be from 0 to 10 (0 is greedy)",
    ),
    (
        "Generate",
        pb.GenerateRequest(prompt="a", temperature=float("nan")),
        "temperature is nan; it must be from 0 to 10 (0 is greedy)",
    ),
    ("Generate", pb.GenerateRequest(prompt="a", top_p=0), "top_p is 0.0; it must be in (0, 1]"),
    ("Generate", pb.GenerateRequest(prompt="a", top_p=1.5), "top_p is 1.5; it must be in (0, 1]"),
    ("Generate", pb.GenerateRequest(prompt="a", max_tokens=2001), "max_tokens is 2001; the limit is 2000"),
    ("Generate", pb.GenerateRequest(prompt="a", stop=["x"] * 9), "9 stop strings; the limit is 8"),
    ("Generate", pb.GenerateRequest(prompt="a", stop=[""]), "a stop string has 0 characters; each must have 1 to 64"),
]


@pytest.mark.parametrize("method,request_message,message", INVALID)
def test_validation_errors(client, method, request_message, message):
    with pytest.raises(grpc.RpcError) as error:
        result = getattr(client.stub, method)(request_message, timeout=10)
        if method == "Generate":
            list(result)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == message


@pytest.mark.parametrize(
    "edits,message",
    [
        ([pb.TypeRequest()], "edit 1: give append, delete, reset, commit, compose or select"),
        ([pb.TypeRequest(append="")], "edit 1: append must not be empty"),
        ([pb.TypeRequest(append="a"), pb.TypeRequest(delete=0)], "edit 2: delete must be at least 1"),
        ([pb.TypeRequest(append="a" * 10001)], "the session's text would be 10001 characters; the limit is 10000"),
        (
            [pb.TypeRequest(append="a", num_suggestions=99)],
            "num_suggestions is 99; it must be 0 (meaning 3) to 20 (server setting max_suggestions)",
        ),
    ],
)
def test_type_validation_errors_are_status_codes(client, edits, message):
    with pytest.raises(grpc.RpcError) as error:
        list(client.type(edits, timeout=10))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == message


def test_session_limit_idle_timeout_and_count(tiny_char_model):
    server, port, _ = start(tiny_char_model, max_sessions=1, session_idle_timeout=0.5)
    try:
        with NextWordClient(f"127.0.0.1:{port}") as client:
            release = threading.Event()
            first = client.type(held_session(release, 10), timeout=20)
            assert next(first).text_length == 2
            with NextWordClient(f"127.0.0.1:{port}", retry=False) as plain:  # NextWordClient would try again
                with pytest.raises(grpc.RpcError) as error:
                    list(plain.type([pb.TypeRequest(append="a")], timeout=5))
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "the limit is 1 at once" in error.value.details()
            with pytest.raises(grpc.RpcError) as error:  # the held session idles past 0.5 s
                list(first)
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "idle for more than 0.5 s" in error.value.details()
            release.set()
            assert server.servicer.active_sessions == 0
            assert len(list(client.type([pb.TypeRequest(append="a")], timeout=5))) == 1
    finally:
        server.stop(0)


def test_serve_command_reports_serving_then_stops_gracefully_on_sigterm(tiny_char_model):
    process, port = serve_process(tiny_char_model, "--grace", "5", stderr=subprocess.PIPE)
    try:
        with NextWordClient(f"127.0.0.1:{port}") as client:
            assert client.health() == "SERVING"
            stream = client.generate("we", max_tokens=400, seed=1)
            next(stream)
            process.send_signal(signal.SIGTERM)
            pieces, finished = collect(stream)  # the call in flight completes within the grace period
            assert finished is not None
        assert process.wait(timeout=20) == 0
    finally:
        process.kill()
    result = run_cli("service", "--model", "/nonexistent/model.pt", "--port", "0")
    assert result.returncode == 1
    assert (
        result.stderr.strip().splitlines()[-1] == "nextword-serve: error: model file not found: /nonexistent/model.pt"
    )


def test_client_command_line(served):
    target = f"127.0.0.1:{served[1]}"
    result = run_cli("service.client", "--target", target, "suggest", "she cook fresh ")
    assert result.returncode == 0 and result.stdout.startswith("bread (")
    result = run_cli(
        "service.client", "--target", target, "generate", "we like", "--temperature", "0", "--max-tokens", "10"
    )
    assert result.returncode == 0 and len(result.stdout) >= 5 and "FINISH_REASON" in result.stderr
    result = run_cli("service.client", "--target", target, "health")
    assert result.returncode == 0 and result.stdout.strip() == "SERVING"
    result = run_cli("service.client", "--target", target, "info")
    assert result.returncode == 0 and '"tokenizer": "char"' in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "service.client", "--target", target, "type"],
        input="we\nli\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0 and len(result.stdout.strip().splitlines()) == 2
    result = run_cli("service.client", "--target", target, "suggest", "")
    assert (
        result.returncode == 1 and result.stderr.strip() == "nextword-client: INVALID_ARGUMENT: text must not be empty"
    )


def test_request_threads_leave_the_intra_op_threads_to_the_model_worker(tiny_char_model, monkeypatch):
    server, port, engine = start(tiny_char_model, threads=2)
    seen = []
    suggest = engine.suggester.suggest
    monkeypatch.setattr(
        engine.suggester, "suggest", lambda text, k: (seen.append(torch.get_num_threads()), suggest(text, k))[1]
    )
    try:
        with NextWordClient(f"127.0.0.1:{port}") as client:
            assert client.suggest("she cook fresh ", 3).suggestions
    finally:
        server.stop(0)
    assert seen == [1] and engine.model.threads == 2


def test_stop_ends_the_model_worker_too(tiny_char_model):
    server, port, engine = start(tiny_char_model)
    assert engine.model.running
    server.stop(0)
    assert not engine.model.running
    with pytest.raises(RuntimeError, match="the model worker has stopped"):
        engine.suggester.suggest("we ", 3)


class FailingDevice:
    """A StepModel whose every step fails as a broken GPU fails."""

    def __init__(self, model) -> None:
        self.vocab_size, self.init_state = model.vocab_size, model.init_state

    def advance(self, tokens, state):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_a_gpu_failure_answers_unavailable_and_the_worker_exits_to_be_replaced(tiny_char_model, monkeypatch):
    import service.api.server
    from service.model.hardware import DEVICE_FAILED_EXIT
    from service.pb.nextword.v1 import nextword_pb2_grpc as pb_grpc

    server, port, engine = start(tiny_char_model)
    engine.model.model = FailingDevice(engine.model.model)  # what the batching worker runs
    monkeypatch.setattr(service.api.server, "_started", lambda config: server)
    monkeypatch.setattr(service.api.server, "_stop_on_signals", lambda stop, grace: None)
    codes = []

    def call(stop):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # no client retries: the status as sent
            try:
                pb_grpc.NextWordStub(channel).Suggest(pb.SuggestRequest(text="we "), timeout=10)
            except grpc.RpcError as error:
                codes.append((error.code(), error.details()))

    watchdog = threading.Timer(30, server.stop, (0,))  # a server that kept serving would end the test here
    watchdog.start()
    try:
        with pytest.raises(SystemExit) as exited:
            service.api.server.serve_worker(server.config, call)  # returns once the server has stopped
    finally:
        watchdog.cancel()
        server.stop(0)
    assert exited.value.code == DEVICE_FAILED_EXIT
    [(code, details)] = codes
    assert code == grpc.StatusCode.UNAVAILABLE and "device failed" in details and "retry" in details
    assert server.device_failed and not engine.model.running


def test_the_terminal_client_shows_the_text_and_tab_takes_the_first_suggestion(served):
    """``service.client type`` on a terminal (a pseudo-terminal here): the typed text, the suggestions under it."""
    import pty

    _, port, _ = served
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "service.client", "--target", f"127.0.0.1:{port}", "type"],
        stdin=terminal,
        stdout=terminal,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    os.close(terminal)
    screen = b""

    def read_until(pattern: bytes, seconds: float = 30) -> re.Match:
        nonlocal screen
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if select.select([controller], [], [], 0.1)[0]:
                screen += os.read(controller, 4096)
            plain = re.sub(rb"\x1b\[[0-9;]*[A-Za-z]", b"", screen)
            found = list(re.finditer(pattern, plain))
            if found:
                return found[-1]
        raise AssertionError(f"not on the screen: {pattern!r} in {screen[-300:]!r}")

    import termios

    deadline = time.monotonic() + 30
    while termios.tcgetattr(controller)[3] & termios.ICANON and time.monotonic() < deadline:
        time.sleep(0.05)  # until the client reads key by key
    try:
        os.write(controller, b"we li")
        shown = read_until(rb"> we li\r?\n\r? *\[completing 'li'\] (\S+) ")
        first = shown.group(1).decode()
        os.write(controller, b"\t")
        read_until(rb"> we " + re.escape(first.encode()) + rb" \r?\n")  # Tab took it, and a space follows
        os.write(controller, b"\x04")
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        os.close(controller)
