"""Soak: many mixed calls against a real server process; errors by status code and the server's memory.

    python -m benchmarks.soak --calls 100000 --clients 32

Starts ``python -m service`` on the model (default models/default.pt), then C
asynchronous clients make CALLS calls in all: Suggest (60 %), Generate of 1-16
tokens (15 %), a Type session of 1-12 edits with deletes (20 %), GetModelInfo
(5 %). The server's resident memory is sampled after every tenth of the calls;
prints a line per sample and a JSON summary. Exit status 1 if any call failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter

import grpc

from benchmarks.texts import prompts
from service.pb.nextword.v1 import nextword_pb2 as pb
from service.pb.nextword.v1 import nextword_pb2_grpc as pb_grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def soak(target: str, pid: int, calls: int, clients: int) -> dict:
    texts = prompts()
    codes: Counter = Counter()
    started_calls = finished = 0
    samples: list[dict] = []
    started = time.perf_counter()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.NextWordStub(channel)
        await stub.Suggest(pb.SuggestRequest(text="warm up"), wait_for_ready=True)

        async def one(rng: random.Random) -> None:
            kind = rng.random()
            text = rng.choice(texts)
            if kind < 0.60:
                await stub.Suggest(pb.SuggestRequest(text=text, num_suggestions=rng.randint(0, 8)), timeout=60)
            elif kind < 0.75:
                async for _ in stub.Generate(
                    pb.GenerateRequest(
                        prompt=text, max_tokens=rng.randint(1, 16), temperature=0.8, seed=rng.randint(0, 999)
                    ),
                    timeout=60,
                ):
                    pass
            elif kind < 0.95:
                edits = []
                for _ in range(rng.randint(1, 12)):
                    edits.append(
                        pb.TypeRequest(delete=rng.randint(1, 3))
                        if rng.random() < 0.2
                        else pb.TypeRequest(append=rng.choice(text.split() or ["a"]) + " ")
                    )
                async for _ in stub.Type(iter(edits), timeout=60):
                    pass
            else:
                await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60)

        async def client(seed: int) -> None:
            nonlocal started_calls, finished
            rng = random.Random(seed)
            while started_calls < calls:
                started_calls += 1
                try:
                    await one(rng)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    codes[error.code().name] += 1
                finished += 1
                if finished % max(1, calls // 10) == 0:
                    sample = {
                        "calls": finished,
                        "seconds": round(time.perf_counter() - started, 1),
                        "server_rss_mib": round(rss_mib(pid), 1),
                    }
                    samples.append(sample)
                    print(json.dumps(sample), flush=True)

        await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - started
    errors = sum(n for code, n in codes.items() if code != "OK")
    return {
        "calls": sum(codes.values()),
        "errors": errors,
        "codes": dict(codes),
        "seconds": round(elapsed, 1),
        "calls_per_s": round(sum(codes.values()) / elapsed, 1),
        "rss_mib": [s["server_rss_mib"] for s in samples],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.path.join(ROOT, "models", "default.pt"))
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=32)
    args = parser.parse_args()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service",
            "--model",
            args.model,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--log-format",
            "text",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        port = int(re.search(r"SERVING on port (\d+)", server.stdout.readline()).group(1))
        summary = asyncio.run(soak(f"127.0.0.1:{port}", server.pid, args.calls, args.clients))
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(json.dumps(summary))
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
