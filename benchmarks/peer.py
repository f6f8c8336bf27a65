"""nextword against TorchServe on the same model, the same work and the same load, in one run.

    python -m benchmarks.peer [--model models/default.pt] [--seconds 8] [--runs 3] [--warmup 60]
        [--clients 1,8,64] [--nextword-flags "--workers 1" ...] [--no-ngram]

``--nextword-flags`` may be given several times: a row per setting (the first is judged against the
targets). ``--no-ngram`` compares the network alone on both sides (nextword-serve --no-ngram).

What it does:
  * installs TorchServe 0.12 into its own virtual environment (build/torchserve; with pyyaml, which
    TorchServe needs without declaring it), unless it is there; Java 11 or newer must be on PATH;
  * archives the model with benchmarks/torchserve_handler.py (nextword's tokenizer, served model and
    Suggester, one forward per group of equal token length), batch 32 / 5 ms;
  * checks that TorchServe's answers match Suggest's on the 30 texts;
  * warms TorchServe up for --warmup seconds at the most clients (its JVM speeds up under load);
  * drives both with benchmarks/load.py (one grpc.aio process, a connection per client, the 30
    next-word texts), --runs runs of --seconds per point, nextword with its default flags and
    --no-log-calls;
  * prints the table (the median run's QPS, p50 and p99), the server CPU per request (the CPU
    time of the server's processes within the measured windows divided by the OK answers in them)
    and the ratios against the targets.

A benchmark, not a test: the suite needs neither TorchServe nor Java.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from benchmarks.serve import ROOT, free_port, serving
from benchmarks.texts import next_word_prompts
from benchmarks.torchserve_handler import NGRAM_ENV
from service.model.hardware import usable_cores

TORCHSERVE = ["torchserve==0.12.0", "torch-model-archiver==0.12.0", "pyyaml==6.0.3"]
NEXTWORD_NEEDS = ["torch==2.13.0", "numpy==2.4.6", "sentencepiece==0.2.3"]  # what the handler imports
HANDLER = os.path.join(ROOT, "benchmarks", "torchserve_handler.py")
MODEL_NAME = "nextword"


def install(venv: str) -> str:
    """TorchServe's own environment; returns its bin directory."""
    bin_dir = os.path.join(venv, "bin")
    if not os.path.exists(os.path.join(bin_dir, "torchserve")):
        print(f"installing TorchServe into {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        pip = [os.path.join(bin_dir, "pip"), "install", "-q", *TORCHSERVE, *NEXTWORD_NEEDS]
        subprocess.run(pip, check=True)
    return bin_dir


def archive(bin_dir: str, model: str, store: str) -> None:
    command = [os.path.join(bin_dir, "torch-model-archiver"), "--model-name", MODEL_NAME, "--version", "1.0"]
    command += ["--serialized-file", model, "--handler", HANDLER, "--export-path", store, "--force"]
    subprocess.run(command, check=True)


@contextlib.contextmanager
def torchserve(bin_dir: str, store: str, workdir: str, ngram: bool) -> Iterator[tuple[int, int]]:
    """TorchServe serving the archive, batch 32 / 5 ms; yields (its gRPC port, its launcher's pid)."""
    grpc_port, http_port, management, metrics = (free_port() for _ in range(4))
    config = os.path.join(workdir, "config.properties")
    workers = usable_cores()
    models = {MODEL_NAME: {"1.0": {"defaultVersion": True, "marName": f"{MODEL_NAME}.mar", "batchSize": 32}}}
    models[MODEL_NAME]["1.0"].update({"maxBatchDelay": 5, "responseTimeout": 120})
    models[MODEL_NAME]["1.0"].update({"minWorkers": workers, "maxWorkers": workers})
    with open(config, "w") as handle:
        handle.write(
            f"inference_address=http://127.0.0.1:{http_port}\n"
            f"management_address=http://127.0.0.1:{management}\n"
            f"metrics_address=http://127.0.0.1:{metrics}\n"
            f"grpc_inference_port={grpc_port}\ngrpc_management_port={free_port()}\n"
            f"model_store={store}\nload_models={MODEL_NAME}.mar\nmodels={json.dumps(models)}\n"
            "disable_token_authorization=true\nenable_envvars_config=false\n"
        )
    env = {**os.environ, "PYTHONPATH": ROOT, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    env[NGRAM_ENV] = "1" if ngram else "0"
    command = [os.path.join(bin_dir, "torchserve"), "--start", "--foreground", "--ncs", "--ts-config", config]
    log = open(os.path.join(workdir, "torchserve.log"), "w")
    server = subprocess.Popen([*command, "--model-store", store], cwd=workdir, env=env, stdout=log, stderr=log)
    try:
        yield grpc_port, server.pid
    finally:
        subprocess.run([os.path.join(bin_dir, "torchserve"), "--stop"], env=env, capture_output=True)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def load(port: int, clients: int, seconds: float, *flags: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.load", "--target", f"127.0.0.1:{port}", "--clients", str(clients)]
    command += ["--seconds", str(seconds), "--warmup", "1", "--texts", "next-word", *flags]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the load generator failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout)


def measure(port: int, pid: int, clients: list[int], seconds: float, runs: int, *flags: str) -> list[dict]:
    """Per client count: the median run by QPS, with the server CPU per OK answer over all runs (the CPU time
    of ``pid`` and its children within the measured windows)."""
    rows = []
    for count in clients:
        results, cpu, answers = [], 0.0, 0
        for _ in range(runs):
            result = load(port, count, seconds, "--server-pid", str(pid), *flags)
            cpu += result["server_cpu_s"]
            answers += result["calls"]
            results.append(result)
        middle = sorted(results, key=lambda r: r["qps"])[len(results) // 2]
        errors = sum(r["errors"] for r in results)
        rows.append({**middle, "errors": errors, "cpu_ms_per_request": 1000 * cpu / max(1, answers)})
        print(f"  {count} clients: {middle['qps']:.0f} QPS, p50 {middle['p50_ms']:.1f} ms", flush=True)
    return rows


def same_answers(nextword_port: int, peer_port: int) -> float:
    """The largest difference between a probability TorchServe answers and Suggest's, over the 30 texts."""
    import grpc

    from benchmarks.load import TORCHSERVE_PREDICTIONS, torchserve_prediction, torchserve_request
    from service.pb.nextword.v1 import nextword_pb2 as pb
    from service.pb.nextword.v1 import nextword_pb2_grpc as pb_grpc

    worst = 0.0
    with (
        grpc.insecure_channel(f"127.0.0.1:{nextword_port}") as ours,
        grpc.insecure_channel(f"127.0.0.1:{peer_port}") as theirs,
    ):
        predict = theirs.unary_unary(TORCHSERVE_PREDICTIONS, lambda t: torchserve_request(MODEL_NAME, t), None)
        for text in next_word_prompts():
            suggested = pb_grpc.NextWordStub(ours).Suggest(pb.SuggestRequest(text=text, num_suggestions=3))
            peer = json.loads(torchserve_prediction(predict(text, timeout=60)))
            if [s.text for s in suggested.suggestions] != [word for word, _ in peer]:
                raise RuntimeError(f"TorchServe and Suggest disagree on {text!r}")
            for s, (_, p) in zip(suggested.suggestions, peer):
                worst = max(worst, abs(s.probability - p))
    return worst


def wait_until_serving(port: int, seconds: float = 300) -> None:
    import grpc

    from benchmarks.load import TORCHSERVE_PREDICTIONS, torchserve_request

    deadline = time.monotonic() + seconds
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        predict = channel.unary_unary(TORCHSERVE_PREDICTIONS, lambda t: torchserve_request(MODEL_NAME, t), None)
        while True:
            try:
                predict("In the ", timeout=10, wait_for_ready=True)
                return
            except grpc.RpcError as error:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"TorchServe did not serve the model: {error.details()}") from None
                time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description="nextword against TorchServe on the same model and load")
    parser.add_argument("--model", default=os.path.join(ROOT, "models", "default.pt"))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds of load on TorchServe before measuring")
    parser.add_argument("--clients", default="1,8,64")
    parser.add_argument("--venv", default=os.path.join(ROOT, "build", "torchserve"))
    parser.add_argument(
        "--nextword-flags", action="append", help="more nextword-serve flags (e.g. --workers 1); repeat for more rows"
    )
    parser.add_argument("--no-ngram", action="store_true", help="the network alone, on both sides")
    args = parser.parse_args()
    if shutil.which("java") is None:
        sys.exit("benchmarks.peer: error: TorchServe needs Java 11 or newer on PATH")
    clients = [int(c) for c in args.clients.split(",")]
    bin_dir = install(args.venv)
    model = os.path.abspath(args.model)
    settings = [
        ["--no-log-calls", *(["--no-ngram"] if args.no_ngram else []), *shlex.split(extra)]
        for extra in args.nextword_flags or [""]
    ]
    with tempfile.TemporaryDirectory(prefix="nextword-peer-") as workdir:
        store = os.path.join(workdir, "store")
        os.makedirs(store)
        archive(bin_dir, model, store)
        with torchserve(bin_dir, store, workdir, not args.no_ngram) as (peer_port, peer_pid):
            wait_until_serving(peer_port)
            ours = []
            for flags in settings:
                with serving(model, *flags) as (port, server_pid):
                    if not ours:
                        worst = same_answers(port, peer_port)
                        print(f"answers: TorchServe and Suggest agree; largest difference {worst:.1e}")
                        print(f"warming TorchServe up for {args.warmup:.0f} s ...", flush=True)
                        load(peer_port, max(clients), args.warmup, "--peer", "torchserve")
                        print(f"TorchServe, {args.runs} runs of {args.seconds:g} s per point:", flush=True)
                        theirs = measure(peer_port, peer_pid, clients, args.seconds, args.runs, "--peer", "torchserve")
                    print(f"nextword ({' '.join(flags)}):", flush=True)
                    ours.append((" ".join(flags), measure(port, server_pid, clients, args.seconds, args.runs)))
    report(clients, ours, theirs)


def report(clients: list[int], ours: list[tuple[str, list[dict]]], theirs: list[dict]) -> None:
    def row(name: str, runs: list[dict]) -> str:
        cells = [f"{r['qps']:.0f} / {r['p50_ms']:.1f} / {r['p99_ms']:.1f}" for r in runs]
        cpu = " / ".join(f"{r['cpu_ms_per_request']:.2f}" for r in runs)
        return f"| {name} | " + " | ".join(cells) + f" | {cpu} |"

    heads = " | ".join(f"{c} clients QPS / p50 / p99 ms" for c in clients)
    print(f"\n| server | {heads} | CPU ms per request ({' / '.join(str(c) for c in clients)} clients) |")
    print("| --- | " + " | ".join("---" for _ in clients) + " | --- |")
    for flags, runs in ours:
        print(row(f"nextword `{flags}`", runs))
    print(row(f"TorchServe 0.12, batch 32 / 5 ms, {usable_cores()} workers", theirs))
    for name, runs in (*ours, ("TorchServe", theirs)):
        errors = sum(r["errors"] for r in runs)
        if errors:
            print(f"errors, {name}: {errors}")
    first, most = ours[0][1], len(clients) - 1
    print(f"\nnextword `{ours[0][0]}` against TorchServe:")
    print(f"QPS at {clients[most]} clients: {first[most]['qps'] / theirs[most]['qps']:.2f}x (target >= 1.3x)")
    print(f"p50 at {clients[0]} client: {first[0]['p50_ms'] / theirs[0]['p50_ms']:.2f}x (target <= 0.5x)")
    print(f"p99 at {clients[most]} clients: {first[most]['p99_ms'] / theirs[most]['p99_ms']:.2f}x (target <= 1x)")


if __name__ == "__main__":
    main()
