"""Pinyin conversion latency: 8 syllables after a committed context, in-process and over gRPC.

    python -m benchmarks.convert --model build/recipes/zh.pt

Measured in one run, on the same Chinese model (as served: the network mixed with its n-gram memory):
  * in-process: Converter.convert called directly, with the intra-op threads that one of the
    server's default worker processes has (p50, p99);
  * over gRPC: the server (default flags, --no-log-calls) answering one client's Convert calls;
  * a Type session composing the same pinyin letter by letter: the cost of a compose keystroke
    (each answered with the candidates of the composition so far) against a Convert of the whole.
The inputs are everyday sentences (context, then 8 characters) written for this benchmark; their
pinyin comes from pypinyin, joined without separators.
"""

from __future__ import annotations

import argparse
import statistics
import time

import grpc

from benchmarks.serve import on_thread, serving
from service.config import ServerConfig
from service.engine import Engine
from service.hardware import ThreadPlan, default_workers
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Chinese model file")
    parser.add_argument("--rounds", type=int, default=5, help="passes over the sentences (default 5)")
    args = parser.parse_args()
    inputs = cases()
    workers = default_workers("cpu")
    threads = ThreadPlan.for_server(0, True, workers)
    engine = Engine.load(ServerConfig(model=args.model, batching=False, history_db="off"), threads)

    def convert(context: str, pinyin: str) -> None:
        engine.converter.convert(context, pinyin)

    local = on_thread(threads.worker, lambda: timed(convert, inputs, args.rounds))
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


if __name__ == "__main__":
    main()
