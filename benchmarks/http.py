"""The HTTP/JSON front against gRPC on one server, measured in one run: Suggest at one client (p50), Suggest
at 64 clients (QPS), and a keystroke of a typing session (the Type WebSocket against a gRPC Type stream).

    python -m benchmarks.http [--model models/default.pt] [--seconds 8] [--clients 64]

The server runs with its default flags (worker processes and all) and --no-log-calls; the clients run in
this process, gRPC through grpc.aio and HTTP through aiohttp, one connection per client, on the same verse
beginnings. Rounds of the two protocols alternate, so the noise of a shared machine falls on both alike.
Targets (docs/http.md): HTTP p50 at most gRPC's + 1 ms, HTTP QPS at least 0.7x gRPC's, a WebSocket
keystroke at most 1.2x a gRPC one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import aiohttp
import grpc

from benchmarks.serve import free_port, serving
from benchmarks.texts import prompts
from service.pb.nextword.v1 import nextword_pb2 as pb
from service.pb.nextword.v1 import nextword_pb2_grpc as pb_grpc

KEYS = "and the lord said unto moses "  # what a session types, a key at a time


async def grpc_suggest(stub, text: str) -> None:
    await stub.Suggest(pb.SuggestRequest(text=text), timeout=30)


async def http_suggest(session: aiohttp.ClientSession, url: str, text: str) -> None:
    async with session.post(url, json={"text": text}) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")


async def one_client(call, texts: list[str], rounds: int) -> list[float]:
    latencies = []
    for text in texts[:rounds]:
        started = time.perf_counter()
        await call(text)
        latencies.append(time.perf_counter() - started)
    return latencies


async def many_clients(calls: list, texts: list[str], seconds: float) -> float:
    """Calls answered per second by ``calls`` (one per client), each calling again at once."""
    stop = time.perf_counter() + seconds
    done = 0

    async def client(call, offset: int) -> None:
        nonlocal done
        index = offset
        while time.perf_counter() < stop:
            await call(texts[index % len(texts)])
            done += 1
            index += 7

    started = time.perf_counter()
    await asyncio.gather(*(client(call, i) for i, call in enumerate(calls)))
    return done / (time.perf_counter() - started)


async def grpc_keystrokes(stub, count: int) -> list[float]:
    edits: asyncio.Queue = asyncio.Queue()

    async def requests():
        while (edit := await edits.get()) is not None:
            yield edit

    call = stub.Type(requests(), timeout=120)
    latencies = []
    for index in range(count):
        started = time.perf_counter()
        await edits.put(pb.TypeRequest(append=KEYS[index % len(KEYS)]))
        await call.read()
        latencies.append(time.perf_counter() - started)
    await edits.put(None)
    return latencies


async def websocket_keystrokes(session: aiohttp.ClientSession, url: str, count: int) -> list[float]:
    latencies = []
    async with session.ws_connect(url) as socket:
        for index in range(count):
            started = time.perf_counter()
            await socket.send_str(json.dumps({"append": KEYS[index % len(KEYS)]}))
            await socket.receive()
            latencies.append(time.perf_counter() - started)
    return latencies


def ms(latencies: list[float]) -> float:
    return 1000 * statistics.median(latencies)


async def measure(port: int, http_port: int, seconds: float, clients: int, rounds: int) -> dict:
    texts = prompts()
    base = f"http://127.0.0.1:{http_port}"
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(clients)]
    stubs = [pb_grpc.NextWordStub(channel) for channel in channels]
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for _ in range(clients)]
    grpc_calls = [lambda text, stub=stub: grpc_suggest(stub, text) for stub in stubs]
    http_calls = [lambda text, s=s: http_suggest(s, f"{base}/v1/suggest", text) for s in sessions]
    try:
        await one_client(grpc_calls[0], texts, 20)  # warm both paths
        await one_client(http_calls[0], texts, 20)
        one = {"grpc": [], "http": []}
        for _ in range(3):  # alternate rounds
            one["grpc"] += await one_client(grpc_calls[0], texts, rounds)
            one["http"] += await one_client(http_calls[0], texts, rounds)
        qps = {"grpc": [], "http": []}
        for _ in range(2):
            qps["grpc"].append(await many_clients(grpc_calls, texts, seconds / 2))
            qps["http"].append(await many_clients(http_calls, texts, seconds / 2))
        keys = {"grpc": [], "http": []}
        for _ in range(3):
            keys["grpc"] += await grpc_keystrokes(stubs[0], rounds)
            keys["http"] += await websocket_keystrokes(sessions[0], f"{base}/v1/type", rounds)
    finally:
        for session in sessions:
            await session.close()
        for channel in channels:
            await channel.close()
    return {
        "suggest_p50_ms": {name: ms(values) for name, values in one.items()},
        "suggest_qps": {name: statistics.mean(values) for name, values in qps.items()},
        "keystroke_p50_ms": {name: ms(values) for name, values in keys.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.http", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/default.pt")
    parser.add_argument("--seconds", type=float, default=8.0, help="of load at --clients, per protocol")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=100, help="calls per protocol per one-client round")
    args = parser.parse_args()
    http_port = free_port()
    with serving(args.model, "--no-log-calls", "--history-db", "off", "--http-port", str(http_port)) as (port, _):
        result = asyncio.run(measure(port, http_port, args.seconds, args.clients, args.rounds))
    p50, qps, keys = result["suggest_p50_ms"], result["suggest_qps"], result["keystroke_p50_ms"]
    print(f"{args.model}, default flags and --no-log-calls; clients in one process, rounds alternated\n")
    print("| measure | gRPC | HTTP/JSON | HTTP against gRPC | target |")
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| Suggest p50, 1 client | {p50['grpc']:.2f} ms | {p50['http']:.2f} ms | "
        f"{p50['http'] - p50['grpc']:+.2f} ms | at most +1 ms |"
    )
    print(
        f"| Suggest, {args.clients} clients | {qps['grpc']:,.0f} QPS | {qps['http']:,.0f} QPS | "
        f"{qps['http'] / qps['grpc']:.2f}x | at least 0.7x |"
    )
    print(
        f"| keystroke p50 (Type stream, WebSocket) | {keys['grpc']:.2f} ms | {keys['http']:.2f} ms | "
        f"{keys['http'] / keys['grpc']:.2f}x | at most 1.2x |"
    )


if __name__ == "__main__":
    main()
