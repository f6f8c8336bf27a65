import threading
import time

import pytest
import torch

from service.model.artifact import load_artifact
from service.model.batching import BatchingModel
from service.model.hardware import use_intra_op_threads
from service.model.steps import ScriptedModel
from service.model.suggest import Suggester


@pytest.fixture(scope="module")
def models(tiny_char_model):
    artifact = load_artifact(tiny_char_model)
    plain = ScriptedModel(artifact.model, artifact.tokenizer.vocab_size)
    batched = BatchingModel(plain, max_batch_size=64, max_wait=0.02)
    yield artifact, plain, batched
    batched.close()


def run_threads(count, work):
    results = [None] * count
    barrier = threading.Barrier(count)

    def run(i):
        barrier.wait()
        results[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_batched_steps_equal_unbatched_ones(models):
    _, plain, batched = models
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for i in range(24):  # mixed lengths and batch sizes, as contexts, beams and keystrokes give
        rows, length = 1 + i % 3, 1 if i % 2 else 1 + i % 5
        inputs.append(
            (
                torch.randint(4, plain.vocab_size, (rows, length), generator=generator),
                torch.randn(plain.init_state(rows).shape, generator=generator) * 0.3,
            )
        )
    before = batched.batches
    results = run_threads(len(inputs), lambda i: batched.advance(*inputs[i]))
    for (tokens, state), (log_probs, new_state) in zip(inputs, results):
        expected_log_probs, expected_state = plain.advance(tokens, state)
        torch.testing.assert_close(log_probs, expected_log_probs, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(new_state, expected_state, atol=1e-5, rtol=1e-4)
    assert batched.batches - before < len(inputs)  # some calls really were stacked


def test_steps_of_different_lengths_waiting_together_go_through_one_forward(models):
    _, plain, _ = models
    batched = BatchingModel(plain, max_batch_size=64)
    release = threading.Event()
    original = plain.advance_ragged
    calls = []

    def held(steps):  # the first forward waits, so the next steps queue up behind it
        calls.append(len(steps))
        if len(calls) == 1:
            release.wait(10)
        return original(steps)

    plain.advance_ragged = held
    try:
        first = threading.Thread(target=batched.advance, args=(torch.tensor([[5]]), plain.init_state(1)))
        first.start()
        while not calls:
            time.sleep(0.01)
        lengths = [1, 4, 2, 7]
        threads = [
            threading.Thread(target=batched.advance, args=(torch.full((1, n), 6), plain.init_state(1))) for n in lengths
        ]
        for thread in threads:
            thread.start()
        while batched.queue_depth < len(lengths):
            time.sleep(0.01)
        release.set()
        for thread in [first, *threads]:
            thread.join(10)
    finally:
        del plain.advance_ragged
        batched.close()
    assert calls == [1, len(lengths)]  # four lengths, one forward


def test_concurrent_suggestions_equal_one_at_a_time(models):
    artifact, plain, batched = models
    alone = Suggester(plain, artifact.tokenizer)
    together = Suggester(batched, artifact.tokenizer)
    texts = ["she cook fresh ", "we want gre", "the old man ", "my friend like", "they eat ", "i need hot "] * 3
    results = run_threads(len(texts), lambda i: together.suggest(texts[i], 3))
    for text, result in zip(texts, results):
        expected = alone.suggest(text, 3)
        assert [w for w, _ in result.suggestions] == [w for w, _ in expected.suggestions]
        for (_, p), (_, q) in zip(result.suggestions, expected.suggestions):
            assert p == pytest.approx(q, rel=1e-4)


def test_a_failure_reaches_every_caller_in_the_batch():
    class Broken:
        vocab_size = 5

        def init_state(self, batch_size):
            return torch.zeros(1, batch_size, 2)

        def advance(self, tokens, state):
            raise RuntimeError("device lost")

    batched = BatchingModel(Broken(), max_wait=0.02)
    errors = run_threads(
        4, lambda i: _error(lambda: batched.advance(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, 2)))
    )
    assert errors == ["device lost"] * 4
    batched.close()


def _error(call):
    try:
        call()
    except RuntimeError as error:
        return str(error)
    return None


def test_the_worker_owns_the_intra_op_threads_and_a_pinned_caller_has_one():
    class Probe:
        vocab_size = 5
        seen: list[int] = []

        def init_state(self, batch_size):
            return torch.zeros(1, batch_size, 2)

        def advance(self, tokens, state):
            self.seen.append(torch.get_num_threads())
            return torch.zeros(tokens.size(0), 5), state

    main_threads = torch.get_num_threads()
    batched = BatchingModel(Probe(), threads=3)
    callers: list[int] = []

    def caller():
        use_intra_op_threads(1)
        batched.advance(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, 2))
        callers.append(torch.get_num_threads())

    thread = threading.Thread(target=caller)
    thread.start()
    thread.join()
    batched.close()
    assert Probe.seen == [3]  # the forward ran on the worker, with the threads it was given
    assert callers == [1]  # the caller kept its own setting
    assert torch.get_num_threads() == main_threads  # other threads are untouched


class GatedModel:
    """A StepModel whose first step waits for ``gate``; counts the rows it computes."""

    vocab_size = 8
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()  # the worker is inside advance, holding its first batch
        self.rows = 0

    def init_state(self, batch_size):
        return torch.zeros(1, batch_size, 1)

    def advance(self, tokens, state):
        self.entered.set()
        self.gate.wait(5)
        self.rows += tokens.size(0)
        return torch.zeros(tokens.size(0), self.vocab_size), state


def test_steps_of_callers_who_are_gone_are_dropped_before_the_model_runs_them():
    from service.model import current_call
    from service.model.current_call import CallEnded
    from tests.service.fakes import FakeContext

    class Expired(FakeContext):
        def time_remaining(self):
            return 0.0

    model = GatedModel()
    batched = BatchingModel(model)
    drops = []
    batched.on_drop = lambda: drops.append(1)  # the server counts them in nextword_dropped_steps_total
    outcomes = {}

    def call(name, context, length):
        current_call.begin(context)
        try:
            outcomes[name] = batched.advance(torch.zeros(1, length, dtype=torch.long), torch.zeros(1, 1, 1))
        except CallEnded as error:
            outcomes[name] = error
        finally:
            current_call.end()

    first = threading.Thread(target=call, args=("first", None, 1))  # no call: always computed
    first.start()
    assert model.entered.wait(5)  # the worker has taken it alone and waits at the gate
    waiting = [
        threading.Thread(target=call, args=("expired", Expired(), 2)),
        threading.Thread(target=call, args=("cancelled", FakeContext(active=False), 2)),
        threading.Thread(target=call, args=("live", FakeContext(), 2)),
    ]
    for thread in waiting:
        thread.start()
    deadline = time.monotonic() + 5
    while batched.queue_depth < 3 and time.monotonic() < deadline:  # all three wait behind the gate
        time.sleep(0.001)
    assert batched.queue_depth == 3
    model.gate.set()
    for thread in [first, *waiting]:
        thread.join(5)
    batched.close()
    assert isinstance(outcomes["expired"], CallEnded) and outcomes["expired"].deadline
    assert isinstance(outcomes["cancelled"], CallEnded) and not outcomes["cancelled"].deadline
    assert not isinstance(outcomes["live"], Exception) and not isinstance(outcomes["first"], Exception)
    assert model.rows == 2 and batched.dropped == 2 and len(drops) == 2


def test_inline_a_lone_step_runs_on_its_callers_thread_and_steps_that_meet_a_busy_model_are_stacked():
    class Where(GatedModel):
        def __init__(self) -> None:
            super().__init__()
            self.threads: list[str] = []
            self.batch_rows: list[int] = []

        def advance(self, tokens, state):
            self.threads.append(threading.current_thread().name)
            self.batch_rows.append(tokens.size(0))
            return super().advance(tokens, state)

    model = Where()
    batched = BatchingModel(model, inline=True)
    counted = []
    batched.on_batch = counted.append
    model.gate.set()
    batched.advance(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, 1))
    assert model.threads == [threading.current_thread().name] and counted == [1]  # no hand-off

    model.gate.clear()
    model.entered.clear()
    first = threading.Thread(target=batched.advance, args=(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, 1)))
    first.start()
    assert model.entered.wait(5)  # the first runs on its own thread and holds the model
    others = [
        threading.Thread(target=batched.advance, args=(torch.zeros(2, 1, dtype=torch.long), torch.zeros(1, 2, 1)))
        for _ in range(3)
    ]
    for thread in others:
        thread.start()
    # they queue for the worker, which takes one and waits for the model: two stay queued
    deadline = time.monotonic() + 5
    while batched.queue_depth != 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.05)
    assert batched.queue_depth == 2
    model.gate.set()
    for thread in [first, *others]:
        thread.join(5)
    # after a forward of several callers' steps (load), a lone step goes to the worker; then inline again
    batched.advance(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, 1))
    batched.advance(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, 1))
    batched.close()
    here = threading.current_thread().name
    assert model.threads[1:] == [first.name, "model-worker", "model-worker", here]
    assert model.batch_rows == [1, 1, 6, 1, 1] and counted == [1, 1, 6, 1, 1]  # the three waiting: one forward


def test_inline_a_step_of_a_caller_who_is_gone_is_dropped_on_its_thread():
    from service.model import current_call
    from service.model.current_call import CallEnded
    from tests.service.fakes import FakeContext

    model = GatedModel()
    model.gate.set()
    batched = BatchingModel(model, inline=True)
    current_call.begin(FakeContext(active=False))
    try:
        with pytest.raises(CallEnded):
            batched.advance(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, 1))
    finally:
        current_call.end()
    batched.close()
    assert model.rows == 0 and batched.dropped == 1


def forward_threads(model_path: str, device: str, batching: bool) -> tuple[set[int], int]:
    """The threads on which an engine on ``device`` ran its forwards for Suggest calls, alone and from 16
    threads at once, with one intra-op thread per thread (the plan under which a CPU server runs a lone
    step on its caller's thread); and its model worker's thread."""
    from concurrent.futures import ThreadPoolExecutor

    from service.api.config import ServerConfig
    from service.model.engine import Engine
    from service.model.hardware import ThreadPlan

    plan = ThreadPlan(worker=1, others=1) if batching else ThreadPlan(worker=None, others=1)
    engine = Engine.load(ServerConfig(model=model_path, device=device, batching=batching), plan)
    inner, threads = engine.model.model, set()
    for name in ("advance", "advance_ragged"):
        method = getattr(inner, name, None)
        if method is not None:
            setattr(inner, name, lambda *args, _method=method: threads.add(threading.get_ident()) or _method(*args))
    texts = ["she cook fresh ", "we want gre", "the old man "] * 8
    alone = [[w for w, _ in engine.suggester.suggest(text, 3).suggestions] for text in texts[:3]]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda text: [w for w, _ in engine.suggester.suggest(text, 3).suggestions], texts))
    assert together[:3] == alone
    engine.close()
    return threads, engine.model._worker.ident


def test_on_cpu_an_idle_models_forward_runs_on_its_callers_thread(tiny_char_model):
    threads, _ = forward_threads(tiny_char_model, "cpu", True)
    assert threading.get_ident() in threads  # a lone call ran on its own thread


def test_out_of_memory_fails_one_batch_and_the_worker_goes_on(models):
    _, plain, _ = models
    failures = []
    original = plain.advance_ragged

    def short_of_memory(steps):
        if not failures:
            failures.append(1)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
        return original(steps)

    plain.advance_ragged = short_of_memory
    batched = BatchingModel(plain, max_batch_size=8)  # not inline: every step goes through the worker
    tokens, state = torch.tensor([[5]]), plain.init_state(1)
    try:
        with pytest.raises(torch.cuda.OutOfMemoryError):
            batched.advance(tokens, state)
        assert batched.running
        log_probs, _ = batched.advance(tokens, state)  # the next batch runs
        torch.testing.assert_close(log_probs, plain.advance(tokens, state)[0], atol=1e-5, rtol=1e-4)
    finally:
        plain.advance_ragged = original
        batched.close()


def test_a_fault_outside_the_forward_fails_its_batch_and_the_worker_goes_on(models):
    _, plain, _ = models
    batched = BatchingModel(plain, max_batch_size=8)
    tokens, state = torch.tensor([[5]]), plain.init_state(1)
    original = batched._still_wanted
    faults = []

    def faulty(group):
        if not faults:
            faults.append(1)
            raise KeyError("a bug in the worker's own bookkeeping")
        return original(group)

    batched._still_wanted = faulty
    try:
        with pytest.raises(KeyError):
            batched.advance(tokens, state)
        assert batched.running
        assert batched.advance(tokens, state)[0].shape == (1, plain.vocab_size)
    finally:
        batched.close()


def test_a_caller_does_not_wait_on_a_worker_that_is_gone(models, monkeypatch):
    import service.model.batching as batching

    _, plain, _ = models
    monkeypatch.setattr(batching, "WORKER_CHECK_SECONDS", 0.05)
    batched = BatchingModel(plain, max_batch_size=8)
    batched._queue.put(None)  # the worker stops, as if it had died, with no step answered
    batched._worker.join(5)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="stopped"):
        batched.advance(torch.tensor([[5]]), plain.init_state(1))
    assert time.monotonic() - started < 2
