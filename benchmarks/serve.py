"""Serving benchmark: the gRPC server under 1, 8 and 64 clients against in-process baselines.

    python -m benchmarks.serve [--model models/default.pt] [--seconds 10]

Measured in one run, on the same artifact:
  * in-process: Suggester.suggest called directly (no gRPC), one thread (latency), and 64
    threads through the batching worker (the batched ceiling, QPS), with the intra-op threads
    that one of the server's default worker processes has;
  * the server with batching on, and with --no-batching, driven by benchmarks/load.py in a
    separate process at 1, 8 and 64 concurrent clients (QPS, p50, p99);
  * a Type session's latency per keystroke with 20 and with 2,000 characters typed, against
    re-encoding the whole text on every keystroke;
  * Suggest in-process for a user with 10,000 learned n-grams (personal history in SQLite)
    against the same Suggest without a user, and that user's Type sessions learning each finished
    word, with and without also fitting their history weights by it (``--only-history``: only these).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import torch

from benchmarks.texts import long_text, prompts
from service.model.artifact import load_artifact
from service.model.batching import BatchingModel
from service.model.hardware import ThreadPlan, default_workers, use_intra_op_threads
from service.model.mix import served_model
from service.model.steps import ScriptedModel
from service.model.suggest import Suggester
from service.model.typing_session import TypingSession

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def on_thread(threads: int, work):
    """Run ``work`` on a fresh thread with ``threads`` intra-op threads, as the server's model worker runs.

    The main thread keeps one intra-op thread (see main), so the OpenMP team of this thread is the
    only one, as in the server; it ends with the thread."""
    result = []

    def run() -> None:
        use_intra_op_threads(threads)
        result.append(work())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result[0]


def in_process(model_path: str, seconds: float, device: str, threads: int, ngram: bool = True) -> dict:
    artifact = load_artifact(model_path)
    plain = served_model(ScriptedModel(artifact.model, artifact.tokenizer.vocab_size, device), artifact, ngram)
    texts = prompts()

    def alone() -> list[float]:
        suggester, latencies = Suggester(plain, artifact.tokenizer), []
        for text in texts[:20]:
            suggester.suggest(text, 3)
        for text in texts[:300]:
            start = time.perf_counter()
            suggester.suggest(text, 3)
            latencies.append(time.perf_counter() - start)
        return latencies

    latencies = on_thread(threads, alone)
    # the ceiling: 64 threads through the batching worker, set up as the server sets them up
    batched = BatchingModel(plain, max_batch_size=64, threads=threads)
    together = Suggester(batched, artifact.tokenizer)
    calls = [0] * 64
    stop_at = time.perf_counter() + seconds

    def worker(i: int) -> None:
        use_intra_op_threads(1)
        j = i
        while time.perf_counter() < stop_at:
            together.suggest(texts[j % len(texts)], 3)
            calls[i] += 1
            j += 64

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(64)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    batched.close()
    return {
        "p50_ms": 1000 * statistics.median(latencies),
        "ceiling_qps": sum(calls) / seconds,
        "mean_batch_rows": batched.rows / max(1, batched.batches),
    }


def keystrokes(model_path: str, typed: int, device: str, count: int = 60) -> dict:
    artifact = load_artifact(model_path)
    network = ScriptedModel(artifact.model, artifact.tokenizer.vocab_size, device)
    suggester = Suggester(served_model(network, artifact), artifact.tokenizer)
    text = long_text(typed + count)
    session = TypingSession(suggester, max_chars=100_000)
    session.append(text[:typed])
    session.suggest(3)
    incremental, reencoded = [], []
    for ch in text[typed : typed + count]:
        start = time.perf_counter()
        session.append(ch)
        session.suggest(3)
        incremental.append(time.perf_counter() - start)
        start = time.perf_counter()
        suggester.suggest(session.text, 3)
        reencoded.append(time.perf_counter() - start)
    return {
        "typed": typed,
        "session_ms": 1000 * statistics.mean(incremental),
        "reencode_ms": 1000 * statistics.mean(reencoded),
    }


def personal_history(model_path: str, device: str, ngrams: int = 10_000) -> dict:
    """Suggest p50 without a user and for a user with ``ngrams`` learned n-grams (KJV verses), one thread."""
    import tempfile

    from benchmarks.texts import verses
    from service.history.histories import Histories
    from service.history.store import HistoryStore
    from service.model.personal import HistoryConfig, units

    artifact = load_artifact(model_path)
    network = ScriptedModel(artifact.model, artifact.tokenizer.vocab_size, device)
    suggester = Suggester(served_model(network, artifact), artifact.tokenizer)
    config = HistoryConfig()
    with tempfile.TemporaryDirectory() as folder:
        histories = Histories(HistoryStore(os.path.join(folder, "history.sqlite"), config), config)
        for verse in verses():
            if len(histories.user("reader")) >= ngrams:
                break
            histories.learn("reader", units(verse))
        learned = len(histories.user("reader"))

        def personal(text: str) -> None:  # as the server answers a call that names a user
            suggester.suggest(text, 3, histories.personal("reader", "default", artifact.tokenizer))

        texts = prompts()
        plain = p50_of(lambda text: suggester.suggest(text, 3), texts)
        mixed = p50_of(personal, texts)
        learning = typing_while_learning(model_path, device, histories)
        histories.close()
    return {"ngrams": learned, "plain_ms": plain, "personal_ms": mixed, **learning}


def typing_while_learning(model_path: str, device: str, histories, lines: int = 40) -> dict:
    """A user with a history types verses in Type sessions as the server runs them (suggestions mixed with the
    history, each finished word learned), with and without each word also fitting their weights, a verse each
    in turn: ms per keystroke, and the fit's own time per word."""
    from benchmarks.texts import verses
    from service.api.config import ServerConfig
    from service.history.for_user import PersonalEngine
    from service.model.engine import Engine

    served = Engine.load(ServerConfig(model=model_path, device=device, batching=False))
    engine = PersonalEngine(served, histories, "reader")
    seconds = {False: 0.0, True: 0.0}
    keys = {False: 0, True: 0}
    fitting = [0.0, 0]  # seconds in PersonalEngine.fit, words

    def timed(fit):
        def run(text: str, spans: list) -> None:
            began = time.perf_counter()
            fit(text, spans)
            fitting[0] += time.perf_counter() - began
            fitting[1] += sum(1 for unit, _ in spans if unit)

        return run

    for index, verse in enumerate(verses()[5000 : 5000 + lines]):
        fit = index % 2 == 1
        session = TypingSession(engine.engine.suggester, max_chars=100_000)
        learner = engine.learner(False, session.next_log_probs if fit else None)
        assert learner is not None
        if learner.fit is not None:
            learner.fit = timed(learner.fit)
        began = time.perf_counter()
        for ch in verse + " ":
            session.append(ch)
            engine.suggest(session.suggest, session.text, 3)
            learner.update(session.text)
        seconds[fit] += time.perf_counter() - began
        keys[fit] += len(verse) + 1
    return {
        "learn_ms": 1000 * seconds[False] / keys[False],
        "learn_fit_ms": 1000 * seconds[True] / keys[True],
        "fit_ms_per_word": 1000 * fitting[0] / max(1, fitting[1]),
    }


def p50_of(call, texts: list[str]) -> float:
    for text in texts[:20]:
        call(text)
    latencies = []
    for text in texts[:300]:
        start = time.perf_counter()
        call(text)
        latencies.append(time.perf_counter() - start)
    return 1000 * statistics.median(latencies)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(port: int, clients: int, seconds: float, *flags: str) -> dict:
    """benchmarks/load.py against the server on ``port``, in its own process; its JSON result."""
    target = f"127.0.0.1:{port}"
    command = [sys.executable, "-m", "benchmarks.load", "--target", target, "--clients", str(clients)]
    out = subprocess.run([*command, "--seconds", str(seconds), *flags], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the load generator failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout)


@contextlib.contextmanager
def serving(model_path: str, *flags: str) -> Iterator[tuple[int, int]]:
    """A server process on the model (metrics on a free port); yields (its port, its pid) once it serves."""
    port = free_port()
    command = [sys.executable, "-m", "service", "--model", model_path, "--host", "127.0.0.1", "--port", str(port)]
    with tempfile.TemporaryFile("w+") as errors:
        server = subprocess.Popen(
            [*command, "--metrics-port", "0", *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=errors, text=True
        )
        try:
            if "SERVING" not in server.stdout.readline():
                server.wait(timeout=30)
                errors.seek(0)
                last = errors.read().strip().splitlines()[-1:] or [f"exit status {server.returncode}"]
                raise RuntimeError(f"nextword-serve {' '.join(flags)} did not start: {last[0]}")
            yield port, server.pid
        finally:
            server.terminate()
            server.wait(timeout=30)


def server_runs(
    model_path: str, batching: bool, seconds: float, clients: list[int], device: str, *flags: str
) -> list[dict]:
    flag = "--batching" if batching else "--no-batching"
    with serving(model_path, flag, "--device", device, *flags) as (port, _):
        results = [load(port, count, seconds) for count in clients]
        if batching:  # the per-call cost without the model: GetModelInfo at the most clients
            results.append(load(port, max(clients), seconds, "--method", "info"))
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description="nextword serving benchmark")
    parser.add_argument("--model", default=os.path.join(ROOT, "models", "default.pt"))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", default="1,8,64")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--only-history", action="store_true", help="only Suggest and Type for a user with a history")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    print(
        f"model {args.model}; torch {torch.__version__}, {torch.get_num_threads()} threads, the server's default "
        f"{default_workers(args.device)} worker processes; in-process figures with a worker's intra-op threads; "
        f"{args.seconds:g} s per measurement; device {args.device}",
        flush=True,
    )
    # as one of the server's default worker processes computes: its share of the intra-op threads
    plan = ThreadPlan.for_server(0, True, default_workers(args.device))
    plan.choose_rnn_kernels()  # as the server chooses them for this plan
    threads = plan.worker
    use_intra_op_threads(1)  # as in the server: the thread measuring or serving the model alone has a team
    if args.only_history:
        return print_history(on_thread(threads, lambda: personal_history(args.model, args.device)))
    base = in_process(args.model, args.seconds, args.device, threads)
    print(
        f"in-process: p50 {base['p50_ms']:.2f} ms alone; batched ceiling {base['ceiling_qps']:.0f} QPS "
        f"(64 threads, {base['mean_batch_rows']:.1f} rows per forward)",
        flush=True,
    )
    *batched, info = server_runs(args.model, True, args.seconds, clients, args.device)
    unbatched = server_runs(args.model, False, args.seconds, clients, args.device)
    print("\n| clients | batching QPS | p50 ms | p99 ms | no-batching QPS | p50 ms | p99 ms | QPS / ceiling |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for on, off in zip(batched, unbatched):
        print(
            f"| {on['clients']} | {on['qps']:.0f} | {on['p50_ms']:.2f} | {on['p99_ms']:.2f} | {off['qps']:.0f} | "
            f"{off['p50_ms']:.2f} | {off['p99_ms']:.2f} | {on['qps'] / base['ceiling_qps']:.2f}x |"
        )
        if on["errors"] or off["errors"]:
            print(f"  errors: batching {on['errors']}, no batching {off['errors']}")
    bound = 1 / (1 / base["ceiling_qps"] + 1 / info["qps"])
    print(
        f"\nGetModelInfo (no model) at {info['clients']} clients: {info['qps']:.0f} QPS; the ceiling and this "
        f"per-call cost added give {bound:.0f} QPS, {bound / base['ceiling_qps']:.2f}x the ceiling"
    )
    one = batched[0]
    print(
        f"\np50 at 1 client: {one['p50_ms']:.2f} ms over gRPC vs {base['p50_ms']:.2f} ms in-process "
        f"(+{one['p50_ms'] - base['p50_ms']:.2f} ms)"
    )
    short = on_thread(threads, lambda: keystrokes(args.model, 20, args.device))
    long_ = on_thread(threads, lambda: keystrokes(args.model, 2000, args.device))
    print("\n| text typed | Type session ms/keystroke | re-encode ms/keystroke |")
    print("| --- | --- | --- |")
    for row in (short, long_):
        print(f"| {row['typed']} chars | {row['session_ms']:.2f} | {row['reencode_ms']:.2f} |")
    print(
        f"keystroke at 2,000 chars / at 20 chars: {long_['session_ms'] / short['session_ms']:.2f}x "
        f"(re-encoding: {long_['reencode_ms'] / short['reencode_ms']:.2f}x)"
    )
    print_history(on_thread(threads, lambda: personal_history(args.model, args.device)))
    if load_artifact(args.model).memory is not None:
        compare_network_alone(args, clients, threads, base, batched)


def print_history(mine: dict) -> None:
    print(
        f"\nSuggest p50 in-process: {mine['plain_ms']:.2f} ms without a user, {mine['personal_ms']:.2f} ms for a user "
        f"with {mine['ngrams']:,} learned n-grams: {mine['personal_ms'] / mine['plain_ms']:.2f}x"
    )
    print(
        f"Type session for that user, ms per keystroke: {mine['learn_ms']:.2f} learning each finished word, "
        f"{mine['learn_fit_ms']:.2f} also fitting their weights by it ({mine['learn_fit_ms'] / mine['learn_ms']:.2f}x; "
        f"the fit {mine['fit_ms_per_word']:.2f} ms per word)"
    )


def compare_network_alone(args, clients: list[int], threads: int, mixed: dict, mixed_runs: list[dict]) -> None:
    """The served mix against the network alone (--no-ngram), in-process and over gRPC."""
    alone = in_process(args.model, args.seconds, args.device, threads, ngram=False)
    alone_runs = server_runs(args.model, True, args.seconds, clients, args.device, "--no-ngram")[:-1]
    print("\n| | in-process p50 ms | " + " | ".join(f"{c} clients QPS" for c in clients) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in clients) + " |")
    for name, base, runs in (("mix (served)", mixed, mixed_runs), ("network alone (--no-ngram)", alone, alone_runs)):
        print(f"| {name} | {base['p50_ms']:.2f} | " + " | ".join(f"{r['qps']:.0f}" for r in runs) + " |")
    print(
        f"mix / network alone: in-process p50 {mixed['p50_ms'] / alone['p50_ms']:.2f}x; "
        f"{clients[-1]}-client QPS {mixed_runs[-1]['qps'] / alone_runs[-1]['qps']:.2f}x"
    )


if __name__ == "__main__":
    main()
