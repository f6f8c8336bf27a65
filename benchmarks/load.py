"""Asynchronous gRPC load generator: C clients call Suggest back to back for S seconds.

    python -m benchmarks.load --target localhost:50051 --clients 64 --seconds 10 [--method info]

``--method info`` calls GetModelInfo instead: a call that never reaches the model, which
measures what gRPC, the server's interceptor and Python cost per call.

Prints one JSON line: calls, errors, QPS, p50 and p99 latency in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import grpc

from benchmarks.texts import prompts
from service.pb.nextword.v1 import nextword_pb2 as pb
from service.pb.nextword.v1 import nextword_pb2_grpc as pb_grpc


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def run(target: str, clients: int, seconds: float, warmup: float, method: str = "suggest") -> dict:
    texts = prompts()
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.NextWordStub(channel)
        if method == "info":

            def call(rng):
                return stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        else:

            def call(rng):
                return stub.Suggest(pb.SuggestRequest(text=rng.choice(texts)), timeout=30)

        await stub.Suggest(pb.SuggestRequest(text="warm up"), wait_for_ready=True)
        start = time.perf_counter()
        measure_from, stop_at = start + warmup, start + warmup + seconds

        async def client(seed: int) -> None:
            nonlocal errors
            rng = random.Random(seed)
            while (now := time.perf_counter()) < stop_at:
                try:
                    await call(rng)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                if now >= measure_from:
                    latencies.append(time.perf_counter() - now)

        await asyncio.gather(*(client(i) for i in range(clients)))
    return {
        "clients": clients,
        "calls": len(latencies),
        "errors": errors,
        "qps": len(latencies) / seconds,
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--method", choices=["suggest", "info"], default="suggest")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.target, args.clients, args.seconds, args.warmup, args.method))))


if __name__ == "__main__":
    main()
