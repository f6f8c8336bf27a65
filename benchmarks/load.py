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

Each connection's first call waits for the server (a server still starting), at most
``--connect-timeout`` seconds (default 60); then the load generator stops with one line and exit
status 1.

``--server-pid PID`` adds ``server_cpu_s``: the CPU seconds of that process and its children within the
measured window (the server's CPU per request is that over the OK calls).

``--processes P`` splits the clients over P load-generator processes (one interpreter drives a few
thousand calls a second at most: a fast server needs several); they measure the same wall-clock window,
and their latencies are pooled before the percentiles are taken.

Prints one JSON line: OK calls, errors, QPS of OK answers, p50, p99 and the slowest OK latency in
ms, the count of each status code, and the Generate tokens streamed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

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


TICKS = os.sysconf("SC_CLK_TCK")
START_SLACK = 3.0  # seconds for --processes' load generators to start and connect before the warm-up begins


@dataclass
class Load:
    """What the clients do (the command line's flags)."""

    target: str
    clients: int
    seconds: float
    warmup: float
    method: str = "suggest"
    deadline_ms: float | None = None
    generate_streams: int = 0
    channels: int = 0
    texts: str = "mixed"
    peer: str = ""
    model_name: str = "nextword"
    backoff: bool = False
    connect_timeout: float = 60.0  # seconds for every connection's first call to be answered


class NoServer(RuntimeError):
    """The target did not answer the first calls in time."""


@dataclass
class Sample:
    """What one load-generator process saw in the measured window."""

    latencies: list[float] = field(default_factory=list)
    codes: Counter = field(default_factory=Counter)
    streamed: int = 0
    connections: int = 0

    def add(self, other: Sample) -> None:
        self.latencies += other.latencies
        self.codes.update(other.codes)
        self.streamed += other.streamed
        self.connections += other.connections


async def collect(load: Load, first_seed: int = 0, start_at: float | None = None) -> Sample:
    """Run the clients (seeds ``first_seed`` onwards). The warm-up starts at wall-clock time ``start_at``
    (default: once connected), and the measured window follows it."""
    texts = next_word_prompts() if load.texts == "next-word" else prompts()
    sample = Sample()
    latencies, codes, backoff = sample.latencies, sample.codes, load.backoff
    timeout = load.deadline_ms / 1000 if load.deadline_ms else 30
    # a local subchannel pool: each channel its own connection (by default gRPC shares one per target)
    opened = [
        grpc.aio.insecure_channel(load.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(load.channels or load.clients)
    ]
    stubs = [pb_grpc.NextWordStub(channel) for channel in opened]
    try:
        if load.peer == "torchserve":

            def request(text: str) -> bytes:
                return torchserve_request(load.model_name, text)

            predict = [channel.unary_unary(TORCHSERVE_PREDICTIONS, request, None) for channel in opened]
            stubs = predict

            def call(stub, rng):
                return stub(rng.choice(texts), timeout=timeout)
        elif load.method == "info":

            def call(stub, rng):
                return stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout)
        else:

            def call(stub, rng):
                return stub.Suggest(pb.SuggestRequest(text=rng.choice(texts)), timeout=timeout)

        # the first call on each connection waits for the server, but not forever
        first = dict(wait_for_ready=True, timeout=load.connect_timeout)
        try:
            if load.peer == "torchserve":
                await asyncio.gather(*(s(texts[0], **first) for s in stubs))
            else:
                await asyncio.gather(*(s.Suggest(pb.SuggestRequest(text="warm up"), **first) for s in stubs))
        except grpc.aio.AioRpcError as error:
            raise NoServer(
                f"no answer from {load.target} within {load.connect_timeout:g} s ({error.code().name})"
            ) from None
        start = time.perf_counter()
        if start_at is not None:
            start += start_at - time.time()
        measure_from, stop_at = start + load.warmup, start + load.warmup + load.seconds

        async def client(index: int) -> None:
            rng = random.Random(first_seed + index)
            stub = stubs[index % len(stubs)]
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

        async def generate(index: int) -> None:
            seed = first_seed + index
            rng = random.Random(seed)
            stub = stubs[index % len(stubs)]
            while time.perf_counter() < stop_at:
                request = pb.GenerateRequest(prompt=rng.choice(texts), max_tokens=512, seed=seed)
                stream = stub.Generate(request, timeout=120)
                async for message in stream:
                    sample.streamed += bool(message.text)
                    if time.perf_counter() >= stop_at:
                        stream.cancel()
                        break

        generators = [asyncio.ensure_future(generate(i)) for i in range(load.generate_streams)]
        await asyncio.gather(*(client(i) for i in range(load.clients)))
        for task in generators:
            task.cancel()
        await asyncio.gather(*generators, return_exceptions=True)
    finally:
        await asyncio.gather(*(channel.close() for channel in opened))
    sample.connections = len(opened)
    return sample


def _collect_in_child(load: Load, first_seed: int, start_at: float) -> Sample:
    return asyncio.run(collect(load, first_seed, start_at))


def process_tree_cpu(root: int) -> float:
    """CPU seconds (user + system) of ``root`` and every process below it."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / TICKS
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += times.get(pid, 0.0)
        todo.extend(child for child, parent in parents.items() if parent == pid)
    return total


class ServerCpu(threading.Thread):
    """The CPU seconds that process ``pid`` and its children spend between two wall-clock times."""

    def __init__(self, pid: int, start: float, end: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.start_at, self.end_at, self.seconds = pid, start, end, float("nan")

    def run(self) -> None:
        time.sleep(max(0.0, self.start_at - time.time()))
        before = process_tree_cpu(self.pid)
        time.sleep(max(0.0, self.end_at - time.time()))
        self.seconds = process_tree_cpu(self.pid) - before


def split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` shares as even as they go."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def run(load: Load, processes: int = 1, server_pid: int = 0) -> dict:
    """The load from ``processes`` load-generator processes (the clients split as evenly as they go); with
    ``server_pid``, that server's CPU seconds in the measured window too."""
    start_at = time.time() + (START_SLACK if processes > 1 else 1.0)
    cpu = ServerCpu(server_pid, start_at + load.warmup, start_at + load.warmup + load.seconds) if server_pid else None
    if cpu is not None:
        cpu.start()
    if processes <= 1:
        sample = asyncio.run(collect(load, 0, start_at))
    else:
        sample = Sample()
        share, streams = split(load.clients, processes), split(load.generate_streams, processes)
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            jobs = []
            for i in range(processes):
                part = Load(**{**vars(load), "clients": share[i], "generate_streams": streams[i]})
                if part.channels:
                    part.channels = max(1, round(load.channels * share[i] / load.clients))
                jobs.append(pool.submit(_collect_in_child, part, sum(share[:i]), start_at))
            for job in jobs:
                sample.add(job.result())
    result = summary(load, sample, processes)
    if cpu is not None:
        cpu.join()
        result["server_cpu_s"] = cpu.seconds
    return result


def summary(load: Load, sample: Sample, processes: int) -> dict:
    latencies, codes, seconds = sample.latencies, sample.codes, load.seconds
    return {
        "clients": load.clients,
        "processes": processes,
        "deadline_ms": load.deadline_ms,
        "backoff": load.backoff,
        "generate_streams": load.generate_streams,
        "connections": sample.connections,
        "calls": len(latencies),
        "errors": sum(count for code, count in codes.items() if code != "OK"),
        "qps": len(latencies) / seconds,
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "max_ok_ms": 1000 * max(latencies, default=float("nan")),
        "codes": dict(codes),
        "generated_pieces": sample.streamed,
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
    parser.add_argument("--processes", type=int, default=1, help="load-generator processes the clients are split over")
    parser.add_argument("--server-pid", type=int, default=0, help="report its CPU seconds (see above)")
    parser.add_argument(
        "--connect-timeout", type=float, default=60.0, help="seconds to wait for the first answers (default 60)"
    )
    args = parser.parse_args()
    load = Load(
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
        args.connect_timeout,
    )
    try:
        result = run(load, args.processes, args.server_pid)
    except NoServer as error:
        raise SystemExit(f"benchmarks.load: {error}") from None
    print(json.dumps(result))


if __name__ == "__main__":
    main()
