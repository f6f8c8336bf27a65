"""Hostile input, load, cancellation and shutdown, against real servers (sized for CI)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.client import NextWordClient
from service.pb.nextword.v1 import nextword_pb2 as pb
from tests.e2e.test_server import held_session, serve_process, start

# What a keyboard may send: any Unicode scalar value (protobuf strings cannot carry lone surrogates),
# with Chinese, emoji, combining marks, control and zero-width characters made likely.
SPECIAL = "我昨天的了你好，。！？😀👍🏽\u0301\u0308\u200b\u200d\u0000\u0007\n\t \r\ufeff\U0010ffff"
texts = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
    st.text(st.sampled_from(SPECIAL + "we the and"), max_size=40),
    st.sampled_from(["", " ", "x" * 10_000, "x" * 10_001, "我" * 10_001, "word " * 5_000]),
)
uint32 = st.integers(0, 2**32 - 1)
# Who a call names: no one, a few users (whose histories learn along the way), or anything a client may put in
# ASCII metadata (the server refuses what is not a user id)
users = st.one_of(
    st.none(), st.sampled_from(["ann", "bob", "a.b:c@d-e_f"]), st.from_regex(r"[ -~]{0,70}", fullmatch=True)
)


def named(user: str | None) -> tuple[tuple[str, str], ...]:
    return (("x-nextword-user", user),) if user is not None else ()


# Outcomes a client may see for bad input or limits; never INTERNAL or UNKNOWN.
CLEAN = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


@pytest.fixture(scope="module")
def fuzzed(tiny_char_model):
    server, port, engine = start(tiny_char_model, max_generate_tokens=64)
    client = NextWordClient(f"127.0.0.1:{port}", timeout=30)
    yield server, client
    client.close()
    server.stop(0)


def outcome(call) -> grpc.StatusCode:
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        assert error.code() in CLEAN, f"{error.code().name}: {error.details()}"
        assert error.details(), "a refusal must say why"
        return error.code()


@FUZZ
@given(text=texts, count=uint32, user=users)
def test_fuzz_suggest(fuzzed, text, count, user):
    _, client = fuzzed
    request = pb.SuggestRequest(text=text, num_suggestions=count)
    outcome(lambda: client.stub.Suggest(request, timeout=30, metadata=named(user)))
    assert client.health() == "SERVING"


@FUZZ
@given(
    prompt=texts,
    temperature=st.one_of(st.none(), st.floats(width=32)),
    top_k=uint32,
    top_p=st.one_of(st.none(), st.floats(width=32)),
    max_tokens=st.integers(0, 100),
    stop=st.lists(texts, max_size=10),
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    user=users,
)
def test_fuzz_generate(fuzzed, prompt, temperature, top_k, top_p, max_tokens, stop, seed, user):
    _, client = fuzzed
    request = pb.GenerateRequest(prompt=prompt, top_k=top_k, max_tokens=max_tokens, stop=stop)
    for name, value in (("temperature", temperature), ("top_p", top_p), ("seed", seed)):
        if value is not None:
            setattr(request, name, value)
    outcome(lambda: list(client.stub.Generate(request, timeout=30, metadata=named(user))))
    assert client.health() == "SERVING"


edits = st.lists(
    st.one_of(
        st.builds(lambda t, n: pb.TypeRequest(append=t, num_suggestions=n), texts, st.integers(0, 25)),
        st.builds(lambda d: pb.TypeRequest(delete=d), st.one_of(st.integers(0, 50), uint32)),
        st.just(pb.TypeRequest(reset=True)),
        st.just(pb.TypeRequest(reset=False)),
        st.builds(lambda n: pb.TypeRequest(num_suggestions=n), uint32),
        st.builds(lambda t: pb.TypeRequest(append=t, incognito=True), texts),
        st.just(pb.TypeRequest(commit=True)),
    ),
    max_size=25,
)


@FUZZ
@given(sequence=edits, user=users)
def test_fuzz_type(fuzzed, sequence, user):
    server, client = fuzzed
    responses = []

    def call():
        for response in client.stub.Type(iter(sequence), timeout=30, metadata=named(user)):
            responses.append(response)

    outcome(call)
    for i, response in enumerate(responses):  # each answer is for the edit it follows, in order
        assert response.edit_index == i + 1
    assert client.health() == "SERVING"


history_lines = st.lists(
    st.one_of(
        texts,
        st.builds(
            lambda gram, count, last: json.dumps({"ngram": gram, "count": count, "last_used": last}),
            st.lists(texts, max_size=4),
            st.one_of(st.floats(), st.integers(-(2**70), 2**70)),
            st.one_of(st.floats(), st.integers(-(2**70), 2**70)),
        ),
    ),
    max_size=8,
)


@FUZZ
@given(user=users, text=texts, word=texts, everything=st.booleans(), lines=history_lines)
def test_fuzz_history(fuzzed, user, text, word, everything, lines):
    _, client = fuzzed
    stub, metadata = client.stub, named(user)
    outcome(lambda: stub.Learn(pb.LearnRequest(text=text), timeout=30, metadata=metadata))
    chunks = iter([pb.HistoryChunk(lines="".join(line + "\n" for line in lines))])
    outcome(lambda: stub.ImportHistory(chunks, timeout=30, metadata=metadata))
    outcome(lambda: list(stub.ExportHistory(pb.ExportHistoryRequest(), timeout=30, metadata=metadata)))
    request = pb.ForgetRequest(word=word, everything=everything)
    outcome(lambda: stub.Forget(request, timeout=30, metadata=metadata))
    assert client.health() == "SERVING"


def test_fuzz_model_info_and_health_stay_up(fuzzed):
    server, client = fuzzed
    assert client.info().vocab_size > 0
    deadline = time.time() + 5
    while server.servicer.active_sessions and time.time() < deadline:
        time.sleep(0.02)
    assert server.servicer.active_sessions == 0 and server.servicer.active_generations == 0


# ---------------------------------------------------------------------------- load


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def mixed_calls(client: NextWordClient, count: int, seed: int) -> int:
    """``count`` mixed calls from one thread; returns the number of failed calls."""
    rng = random.Random(seed)
    words = ["we", "the", "and", "of", "我", "你好", "light", " "]
    errors = 0
    for _ in range(count):
        kind = rng.random()
        try:
            if kind < 0.6:
                client.suggest(" ".join(rng.choices(words, k=rng.randint(1, 12))), rng.randint(0, 5))
            elif kind < 0.75:
                list(client.generate(rng.choice(words), max_tokens=rng.randint(1, 8), seed=rng.randint(0, 99)))
            elif kind < 0.95:
                steps = [
                    pb.TypeRequest(append=rng.choice(words)) if rng.random() < 0.8 else pb.TypeRequest(delete=1)
                    for _ in range(rng.randint(1, 10))
                ]
                list(client.type(steps, timeout=30))
            else:
                client.info()
        except grpc.RpcError:
            errors += 1
    return errors


def run_load(port: int, calls: int, threads: int = 8) -> int:
    errors = [0] * threads

    def worker(index: int) -> None:
        with NextWordClient(f"127.0.0.1:{port}", timeout=30) as client:
            errors[index] = mixed_calls(client, calls // threads, seed=index)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return sum(errors)


def test_bounded_soak_has_no_errors_and_memory_stops_growing(tiny_char_model):
    process, port = serve_process(tiny_char_model)
    try:
        assert run_load(port, 800) == 0  # warm-up: allocator pools, caches, thread stacks
        after_warm_up = rss_bytes(process.pid)
        samples = []
        for _ in range(3):
            assert run_load(port, 800) == 0
            samples.append(rss_bytes(process.pid))
        growth = samples[-1] - after_warm_up
        assert growth < 24 * 2**20, f"memory grew by {growth / 2**20:.1f} MiB over 2,400 calls: {samples}"
        with NextWordClient(f"127.0.0.1:{port}") as client:
            assert client.health() == "SERVING"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        process.stdout.close()


# ---------------------------------------------------------------------------- cancellation and shutdown


def test_cancelled_type_session_frees_its_slot(tiny_char_model):
    server, port, _ = start(tiny_char_model, max_sessions=1)
    release = threading.Event()

    try:
        with NextWordClient(f"127.0.0.1:{port}", timeout=10) as client:
            stream = client.type(held_session(release))
            next(stream)
            assert server.servicer.active_sessions == 1
            with pytest.raises(grpc.RpcError) as caught:  # the one slot is taken
                list(client.type([pb.TypeRequest(append="x")]))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            stream.cancel()
            deadline = time.time() + 5
            while (server.servicer.active_sessions or server.guard.active) and time.time() < deadline:
                time.sleep(0.02)
            assert server.servicer.active_sessions == 0 and server.guard.active == 0
            assert [r.edit_index for r in client.type([pb.TypeRequest(append="x")])] == [1]
    finally:
        release.set()
        server.stop(0)


def test_sigterm_with_calls_in_flight_each_ends_cleanly(tiny_char_model):
    flags = ("--grace", "3", "--max-generate-tokens", "100000")
    process, port = serve_process(tiny_char_model, *flags, stderr=subprocess.PIPE)
    outcomes: list[str] = []
    lock = threading.Lock()

    def record(name: str, call) -> None:
        try:
            call()
            result = "OK"
        except grpc.RpcError as error:
            result = error.code().name
        with lock:
            outcomes.append(f"{name}:{result}")

    try:
        client = NextWordClient(f"127.0.0.1:{port}", timeout=30)
        started = threading.Barrier(7)

        def long_session():  # keeps typing for longer than the grace period: cut off when it ends
            def edits():
                yield pb.TypeRequest(append="w")
                started.wait()
                for _ in range(400):
                    time.sleep(0.05)
                    yield pb.TypeRequest(append="e")

            list(client.type(edits()))

        def short_generation():
            stream = client.generate("we", max_tokens=40, seed=2)
            next(stream)
            started.wait()
            list(stream)

        def session():
            def edits():
                yield pb.TypeRequest(append="w")
                started.wait()
                for ch in "e shall":
                    time.sleep(0.05)
                    yield pb.TypeRequest(append=ch)

            list(client.type(edits()))

        def suggests():
            started.wait()
            for _ in range(40):  # no wait_for_ready: once the port closes, UNAVAILABLE at once
                client.stub.Suggest(pb.SuggestRequest(text="we "), timeout=10)

        calls = [
            ("long", long_session),
            ("short", short_generation),
            ("short", short_generation),
            ("session", session),
            ("session", session),
            ("suggest", suggests),
        ]
        threads = [threading.Thread(target=record, args=(name, lambda c=call: c())) for name, call in calls]
        for thread in threads:
            thread.start()
        started.wait(timeout=30)
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=30)
        assert not any(thread.is_alive() for thread in threads), "a call hung after SIGTERM"
        assert process.wait(timeout=30) == 0
        client.close()
    finally:
        process.kill()
        process.stdout.close()
        process.stderr.close()
    clean = {"OK", "CANCELLED", "UNAVAILABLE"}
    assert all(o.split(":")[1] in clean for o in outcomes), outcomes
    assert sorted(o for o in outcomes if o.startswith("short")) == ["short:OK", "short:OK"]  # in grace: completed
    assert "long:OK" not in outcomes  # 20 s of typing cannot finish in 3 s: it ends with a clean status
