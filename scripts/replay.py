"""Record a served model's answers to a fixed set of requests, and check a later server against them.

    python scripts/replay.py record --model models/default.pt --model zh=models/zh.pt --out answers.json
    python scripts/replay.py check  --model models/default.pt --model zh=models/zh.pt --answers answers.json

It starts ``python -m service`` on a free loopback port (one worker, no history), sends every request
of ``REQUESTS`` over gRPC, and keeps each answer's serialized bytes. ``check`` exits 1 and names the
first request whose answer differs, byte for byte. For a change that must not change what is served
(a refactor, a new dependency): record before it, check after it, on the same model files.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from service.pb.nextword.v1 import nextword_pb2 as pb  # noqa: E402
from service.pb.nextword.v1 import nextword_pb2_grpc as pb_grpc  # noqa: E402

ENGLISH = [
    "And God said, Let there be ",
    "In the beginning God",
    "And the LORD spake unto Mo",
    "thou shalt not ",
    "Blessed are the ",
    "and he went out of the ci",
    "The LORD is my shep",
    "For God so loved the ",
    "zzqx unknown words here ",
    "Jesus wept. And ",
]
CHINESE_TEXT = ["我", "你好", "他在", "我昨天", "上学", "今天"]
PINYIN = [
    ("", "nihao"),
    ("", "xian"),
    ("他在", "xian"),
    ("", "zgr"),
    ("", "women"),
    ("", "zuotian"),
    ("我", "zuotian"),
    ("", "nihaosj"),
    ("", "shangxue"),
    ("", "x'ian"),
]


def requests(models: list[str]) -> list[tuple[str, object]]:
    """(method, request) pairs: Suggest, Convert and Generate on every served model."""
    out: list[tuple[str, object]] = []
    for model in models:
        texts = ENGLISH if model != "zh" else CHINESE_TEXT
        for text in texts:
            out.append(("Suggest", pb.SuggestRequest(text=text, model=model, num_suggestions=5)))
        for text in texts[:4]:
            out.append(("Generate", pb.GenerateRequest(prompt=text, model=model, temperature=0, max_tokens=12)))
            out.append(
                ("Generate", pb.GenerateRequest(prompt=text, model=model, temperature=0.8, seed=7, max_tokens=12))
            )
        if model == "zh":
            for context, letters in PINYIN:
                out.append(
                    ("Convert", pb.ConvertRequest(pinyin=letters, context=context, model=model, num_candidates=9))
                )
            out.append(("Convert", pb.ConvertRequest(pinyin="zhongg", model=model, fuzzy=True)))
    return out


def answer(stub, method: str, request) -> str:
    """The answer's serialized bytes, hex; a stream's messages joined by '|'; an error as its code."""
    try:
        if method == "Generate":
            return "|".join(m.SerializeToString(deterministic=True).hex() for m in stub.Generate(request, timeout=60))
        return getattr(stub, method)(request, timeout=60).SerializeToString(deterministic=True).hex()
    except grpc.RpcError as error:
        return f"error {error.code().name}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(models: list[str]):
    port = free_port()
    args = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    args += ["--no-metrics", "--history-db", "off", "--log-format", "text"]
    for model in models:
        args += ["--model", model]
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=120)
    except grpc.FutureTimeoutError:
        process.kill()
        log.seek(0)
        sys.exit(f"replay: the server did not start:\n{log.read().decode(errors='replace')}")
    time.sleep(0.5)
    return process, channel


def names(models: list[str]) -> list[str]:
    return [m.partition("=")[0] if "=" in m else os.path.splitext(os.path.basename(m))[0] for m in models]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["record", "check"])
    parser.add_argument("--model", action="append", required=True, help="[NAME=]PATH, repeated")
    parser.add_argument("--out", help="record: the answers file to write")
    parser.add_argument("--answers", help="check: the answers file to compare with")
    args = parser.parse_args()
    process, channel = serve(args.model)
    try:
        stub = pb_grpc.NextWordStub(channel)
        got = [
            {
                "method": method,
                "request": request.SerializeToString(deterministic=True).hex(),
                "answer": answer(stub, method, request),
            }
            for method, request in requests(names(args.model))
        ]
    finally:
        channel.close()
        process.terminate()
        process.wait(30)
    if args.action == "record":
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(got, f, indent=1)
        print(f"replay: recorded {len(got)} answers in {args.out}")
        return 0
    with open(args.answers, encoding="utf-8") as f:
        want = json.load(f)
    for number, (a, b) in enumerate(zip(want, got), 1):
        if a != b:
            print(f"replay: answer {number} ({a['method']}) differs")
            return 1
    if len(want) != len(got):
        print(f"replay: {len(got)} answers, the record has {len(want)}")
        return 1
    print(f"replay: all {len(got)} answers match byte for byte")
    return 0


if __name__ == "__main__":
    sys.exit(main())
