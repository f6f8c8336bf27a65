"""Asynchronous gRPC load generator: C clients call Suggest back to back for S seconds.

    python -m benchmarks.load --target localhost:50051 --clients 64 --seconds 10 [--method info]
        [--deadline-ms 100] [--generate-streams 8] [--channels 1]

Each client has a connection of its own, as keyboards do (``--channels K`` spreads the clients over K
connections instead: a server of several worker processes sees each connection on one worker).

``--texts next-word`` sends 30 verse beginnings that end after a word and a space, and
``--peer torchserve`` sends them to TorchServe's gRPC Predictions instead of Suggest
(benchmarks/peer.py runs both).

``--method info`` calls GetModelInfo instead: a call that never reaches the model, which
measures what gRPC, the server's interceptor and Python cost per call. ``--deadline-ms`` gives
every call that deadline (overload: what counts is the OK answers per second, the goodput).
``--generate-streams N`` keeps N Generate streams of 512 tokens running beside the clients.
``--backoff`` makes a client whose call failed (a deadline passed, or the server refused it) wait
before its next call: its deadline, doubled at each failure in a row up to ``MAX_BACKOFF`` seconds,
times a random factor from 0.5 to 1 (full jitter's usual form); an OK answer resets it.

Prints one JSON line: OK calls, errors, QPS of OK answers, p50, p99 and the slowest OK latency in
ms, the count of each status code, and the Generate tokens streamed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter

import grpc

from benchmarks.texts import next_word_prompts, prompts
from service.pb.nextword.v1 import nextword_pb2 as pb
from service.pb.nextword.v1 import nextword_pb2_grpc as pb_grpc

MAX_BACKOFF = 1.0  # seconds, with --backoff
TORCHSERVE_PREDICTIONS = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions"


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2)."""
    length, size = b"", len(payload)
    while True:
        length += bytes([(size & 0x7F) | (0x80 if size > 0x7F else 0)])
        size >>= 7
        if not size:
            break
    return bytes([number << 3 | 2]) + length + payload


def torchserve_request(model_name: str, text: str) -> bytes:
    """TorchServe's PredictionsRequest {string model_name = 1; map<string, bytes> input = 3}, input {"data": text}."""
    return _field(1, model_name.encode()) + _field(3, _field(1, b"data") + _field(2, text.encode()))


def torchserve_prediction(response: bytes) -> bytes:
    """PredictionResponse {bytes prediction = 1}: the prediction's bytes (the first field, as TorchServe sends it)."""
    if not response:
        return b""
    position, size, shift = 1, 0, 0
    while True:
        byte = response[position]
        size |= (byte & 0x7F) << shift
        position, shift = position + 1, shift + 7
        if byte < 0x80:
            return response[position : position + size]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def run(
    target: str,
    clients: int,
    seconds: float,
    warmup: float,
    method: str = "suggest",
    deadline_ms: float | None = None,
    generate_streams: int = 0,
    channels: int = 0,
    texts: str = "mixed",
    peer: str = "",
    model_name: str = "nextword",
    backoff: bool = False,
) -> dict:
    texts = next_word_prompts() if texts == "next-word" else prompts()
    latencies: list[float] = []
    codes: Counter = Counter()
    streamed = 0
    timeout = deadline_ms / 1000 if deadline_ms else 30
    # a local subchannel pool: each channel its own connection (by default gRPC shares one per target)
    opened = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(channels or clients)
    ]
    stubs = [pb_grpc.NextWordStub(channel) for channel in opened]
    try:
        if peer == "torchserve":
            predict = [
                channel.unary_unary(TORCHSERVE_PREDICTIONS, lambda text: torchserve_request(model_name, text), None)
                for channel in opened
            ]
            stubs = predict

            def call(stub, rng):
                return stub(rng.choice(texts), timeout=timeout)
        elif method == "info":

            def call(stub, rng):
                return stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout)
        else:

            def call(stub, rng):
                return stub.Suggest(pb.SuggestRequest(text=rng.choice(texts)), timeout=timeout)

        if peer == "torchserve":
            await asyncio.gather(*(s(texts[0], wait_for_ready=True, timeout=60) for s in stubs))
        else:
            await asyncio.gather(*(s.Suggest(pb.SuggestRequest(text="warm up"), wait_for_ready=True) for s in stubs))
        start = time.perf_counter()
        measure_from, stop_at = start + warmup, start + warmup + seconds

        async def client(seed: int) -> None:
            rng = random.Random(seed)
            stub = stubs[seed % len(stubs)]
            failures = 0
            while (now := time.perf_counter()) < stop_at:
                try:
                    await call(stub, rng)
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as error:
                    code = error.code()
                if now >= measure_from:
                    codes[code.name] += 1
                    if code == grpc.StatusCode.OK:
                        latencies.append(time.perf_counter() - now)
                failures = 0 if code == grpc.StatusCode.OK else failures + 1
                if backoff and failures:
                    await asyncio.sleep(min(MAX_BACKOFF, timeout * 2 ** (failures - 1)) * rng.uniform(0.5, 1.0))

        async def generate(seed: int) -> None:
            nonlocal streamed
            rng = random.Random(seed)
            stub = stubs[seed % len(stubs)]
            while time.perf_counter() < stop_at:
                request = pb.GenerateRequest(prompt=rng.choice(texts), max_tokens=512, seed=seed)
                stream = stub.Generate(request, timeout=120)
                async for message in stream:
                    streamed += bool(message.text)
                    if time.perf_counter() >= stop_at:
                        stream.cancel()
                        break

        generators = [asyncio.ensure_future(generate(i)) for i in range(generate_streams)]
        await asyncio.gather(*(client(i) for i in range(clients)))
        for task in generators:
            task.cancel()
        await asyncio.gather(*generators, return_exceptions=True)
    finally:
        await asyncio.gather(*(channel.close() for channel in opened))
    return {
        "clients": clients,
        "deadline_ms": deadline_ms,
        "backoff": backoff,
        "generate_streams": generate_streams,
        "connections": len(opened),
        "calls": len(latencies),
        "errors": sum(count for code, count in codes.items() if code != "OK"),
        "qps": len(latencies) / seconds,
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "max_ok_ms": 1000 * max(latencies, default=float("nan")),
        "codes": dict(codes),
        "generated_pieces": streamed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--method", choices=["suggest", "info"], default="suggest")
    parser.add_argument("--deadline-ms", type=float, default=None, help="each call's deadline (default: 30 s)")
    parser.add_argument("--generate-streams", type=int, default=0, help="512-token Generate streams beside the load")
    parser.add_argument("--channels", type=int, default=0, help="connections the clients share (0: one each)")
    parser.add_argument("--texts", choices=["mixed", "next-word"], default="mixed", help="what the clients send")
    parser.add_argument("--peer", choices=["", "torchserve"], default="", help="call TorchServe's Predictions")
    parser.add_argument("--model-name", default="nextword", help="the peer's model name")
    parser.add_argument("--backoff", action="store_true", help="a client waits after a failed call (see above)")
    args = parser.parse_args()
    result = run(
        args.target,
        args.clients,
        args.seconds,
        args.warmup,
        args.method,
        args.deadline_ms,
        args.generate_streams,
        args.channels,
        args.texts,
        args.peer,
        args.model_name,
        args.backoff,
    )
    print(json.dumps(asyncio.run(result)))


if __name__ == "__main__":
    main()
