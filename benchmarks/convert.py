"""Pinyin conversion latency: 8 syllables after a committed context, in-process and over gRPC.

    python -m benchmarks.convert --model build/recipes/zh.pt

Measured in one run, on the same Chinese model (as served: the network mixed with its n-gram memory):
  * in-process: Converter.convert called directly, with the intra-op threads that one of the
    server's default worker processes has (p50, p99);
  * over gRPC: the server (default flags, --no-log-calls) answering one client's Convert calls;
  * a Type session composing the same pinyin letter by letter: the cost of a compose keystroke
    (each answered with the candidates of the composition so far) against a Convert of the whole;
  * in-process, where a conversion's time goes (the network's forwards, the n-gram memory and the mix,
    the search itself), and a compose keystroke with the rows the session keeps from the last
    keystroke against one that computes every row again (rows per keystroke, p50);
  * with --compare-beam N, in-process conversions with a beam of N against the served beam, their
    rounds alternated.
The inputs are everyday sentences (context, then 8 characters) written for this benchmark; their
pinyin comes from pypinyin, joined without separators.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import grpc

from benchmarks.serve import on_thread, serving
from service.api.config import ServerConfig
from service.model.engine import Engine
from service.model.hardware import ThreadPlan, default_workers
from service.model.pinyin import Converter
from service.model.typing_session import TypingSession
from service.pb.nextword.v1 import nextword_pb2 as pb
from service.pb.nextword.v1 import nextword_pb2_grpc as pb_grpc
from training.pinyin_eval import reading

# (context, eight characters to type as pinyin)
SENTENCES = [
    ("今天下午", "我们一起去看电影"),
    ("他说", "明天早上要去北京"),
    ("我觉得", "这个问题非常重要"),
    ("老师告诉我们", "学习需要坚持下去"),
    ("请你", "把这本书放在桌上"),
    ("昨天晚上", "我和朋友一起吃饭"),
    ("如果有时间", "我们可以去公园玩"),
    ("这家饭馆", "的菜味道非常不错"),
    ("为了", "身体健康要多运动"),
    ("春天来了", "山上的花都开放了"),
    ("大家", "都在认真准备考试"),
    ("他每天", "坐公共汽车去上班"),
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cases() -> list[tuple[str, str]]:
    return [(context, "".join(reading(text))) for context, text in SENTENCES]


def timed(call, inputs, rounds: int) -> list[float]:
    for item in inputs:  # warm: the lexicon's arrays, the first forwards
        call(*item)
    latencies = []
    for _ in range(rounds):
        for item in inputs:
            start = time.perf_counter()
            call(*item)
            latencies.append(1000 * (time.perf_counter() - start))
    return latencies


class Timed:
    """A StepModel around ``model`` that counts the rows it computes and the seconds it takes."""

    def __init__(self, model) -> None:
        self.model, self.vocab_size = model, model.vocab_size
        self.rows, self.seconds = 0, 0.0

    def init_state(self, batch_size: int):
        return self.model.init_state(batch_size)

    def advance(self, tokens, state, **options):
        start = time.perf_counter()
        out = self.model.advance(tokens, state, **options)
        self.seconds += time.perf_counter() - start
        self.rows += tokens.size(0)
        return out


def parts(engine: Engine, inputs, rounds: int) -> dict[str, float]:
    """Mean ms per conversion: the network's forwards, the memory and the mix, and the rest (the search)."""
    served = Timed(engine.model)
    network = Timed(getattr(engine.model, "network", engine.model))
    if hasattr(engine.model, "network"):
        engine.model.network = network
    converter = Converter(served, engine.artifact.tokenizer, engine.converter.lexicon)
    try:
        for context, pinyin in inputs:  # warm, then count from zero
            converter.convert(context, pinyin)
        network.seconds = served.seconds = 0.0
        start = time.perf_counter()
        for _ in range(rounds):
            for context, pinyin in inputs:
                converter.convert(context, pinyin)
        total = time.perf_counter() - start
    finally:
        if hasattr(engine.model, "network"):
            engine.model.network = network.model
    count = rounds * len(inputs)
    network_s, served_s = network.seconds, served.seconds
    return {
        "network": 1000 * network_s / count,
        "memory and mix": 1000 * (served_s - network_s) / count,
        "search": 1000 * (total - served_s) / count,
    }


def compose_in_process(engine: Engine, inputs, kept: bool) -> tuple[list[float], float]:
    """In-process compose keystrokes over the sentences: latencies, and rows computed per keystroke; with
    the rows the session keeps, or with every row computed again (the session's context state kept)."""
    counted = Timed(engine.model)
    converter = Converter(counted, engine.artifact.tokenizer, engine.converter.lexicon)
    latencies = []
    for context, pinyin in inputs:
        session = TypingSession(engine.suggester, 10_000, converter=converter)
        session.append(context)
        for letter in pinyin:
            session.compose(letter)
            start = time.perf_counter()
            if kept:
                session.convert(9)
            else:
                read = session.context.read(engine.artifact.tokenizer.encode(session.text))
                converter.convert(session.text, session.composition, 9, start=read)
            latencies.append(1000 * (time.perf_counter() - start))
    return latencies, counted.rows / len(latencies)


def compare_beams(engine: Engine, inputs, rounds: int, beam: int) -> dict[int, list[float]]:
    """In-process latencies with the served beam and with ``beam``, a round of each in turn ({} without one)."""
    if not beam or beam == engine.converter.config.beam:
        return {}
    served = engine.converter
    other = Converter(served.model, served.tokenizer, served.lexicon, replace(served.config, beam=beam))
    latencies: dict[int, list[float]] = {served.config.beam: [], beam: []}
    for _ in range(rounds):
        for converter in (served, other):
            call = converter.convert
            latencies[converter.config.beam] += timed(lambda c, p, call=call: call(c, p), inputs, 1)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Chinese model file")
    parser.add_argument("--rounds", type=int, default=5, help="passes over the sentences (default 5)")
    parser.add_argument(
        "--compare-beam",
        type=int,
        default=0,
        help="also time in-process conversions with this beam, rounds alternated with the served beam's",
    )
    args = parser.parse_args()
    inputs = cases()
    workers = default_workers("cpu")
    threads = ThreadPlan.for_server(0, True, workers)
    engine = Engine.load(ServerConfig(model=args.model, batching=False, history_db="off"), threads)

    def convert(context: str, pinyin: str) -> None:
        engine.converter.convert(context, pinyin)

    local = on_thread(threads.worker, lambda: timed(convert, inputs, args.rounds))
    split = on_thread(threads.worker, lambda: parts(engine, inputs, args.rounds))
    with_kept, kept_rows = on_thread(threads.worker, lambda: compose_in_process(engine, inputs, kept=True))
    every_row, all_rows = on_thread(threads.worker, lambda: compose_in_process(engine, inputs, kept=False))
    beams = on_thread(threads.worker, lambda: compare_beams(engine, inputs, args.rounds, args.compare_beam))
    with serving(args.model, "--no-log-calls", "--history-db", "off") as (port, _):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.NextWordStub(channel)

            def remote(context: str, pinyin: str) -> None:
                stub.Convert(pb.ConvertRequest(context=context, pinyin=pinyin), timeout=30, wait_for_ready=True)

            def composing(context: str, pinyin: str) -> list[float]:
                edits = [pb.TypeRequest(append=context), *(pb.TypeRequest(compose=ch) for ch in pinyin)]
                stamps = []
                sent = []

                def requests():
                    for edit in edits:
                        sent.append(time.perf_counter())
                        yield edit
                        while len(stamps) < len(sent):  # one edit at a time, as a typist sends them
                            time.sleep(0.0002)

                for _ in stub.Type(requests(), timeout=120):
                    stamps.append(time.perf_counter())
                return [1000 * (b - a) for a, b in zip(sent[1:], stamps[1:])]  # the compose edits

            over_grpc = timed(remote, inputs, args.rounds)
            keystrokes = [ms for context, pinyin in inputs for ms in composing(context, pinyin)]
            last = [composing(context, pinyin)[-1] for context, pinyin in inputs]
    syllables = statistics.mean(len(reading(text)) for _, text in SENTENCES)
    print(
        f"{args.model}: Convert of {syllables:.0f} syllables ({statistics.mean(len(p) for _, p in inputs):.0f} letters)"
        f" after a context, {len(inputs)} sentences x {args.rounds}; {workers} server workers, "
        f"{threads.worker} intra-op thread(s) each"
    )
    rows = [
        ("in-process Convert", local),
        ("gRPC Convert", over_grpc),
        ("gRPC compose keystroke (every letter)", keystrokes),
        ("gRPC compose keystroke (the last letter)", last),
    ]
    for name, values in rows:
        print(f"  {name:42s} p50 {statistics.median(values):7.1f} ms   p99 {percentile(values, 0.99):7.1f} ms")
    print(
        f"  last compose keystroke / Convert over gRPC (p50): "
        f"{statistics.median(last) / statistics.median(over_grpc):.2f}x"
    )
    print("  in-process, ms per conversion: " + ", ".join(f"{name} {ms:.1f}" for name, ms in split.items()))
    print(
        f"  in-process compose keystroke: p50 {statistics.median(with_kept):.1f} ms, {kept_rows:.1f} rows "
        f"with the rows the session keeps; p50 {statistics.median(every_row):.1f} ms, {all_rows:.1f} rows "
        "with every row computed again"
    )
    if beams:
        (mine, served_ms), (other, other_ms) = beams.items()
        print(
            f"  in-process Convert, beam {other} against the served {mine} (rounds alternated): p50 "
            f"{statistics.median(other_ms):.1f} against {statistics.median(served_ms):.1f} ms, "
            f"{statistics.median(other_ms) / statistics.median(served_ms):.2f}x"
        )


if __name__ == "__main__":
    main()
