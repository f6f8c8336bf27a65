"""How QPS grows with worker processes and clients, on one device, in one run.

    python -m benchmarks.scale [--model models/default.pt] [--device cuda] [--workers 1,4,16]
        [--clients 64,256,1024] [--seconds 5] [--runs 1] [--load-processes 0] [--server-flags "..."]

For each --workers count it starts nextword-serve (--no-log-calls, the given device, --server-flags,
default flags otherwise), then drives it with benchmarks/load.py at each client count (a connection per client,
the 30 next-word texts, Suggest back to back) and prints a table: QPS, p50 and p99 of the median run,
the server CPU per request (its processes' CPU time over the OK answers) and each QPS against the
first --workers count's at the same clients.

The load generators run on the same machine: ``--load-processes`` of them (0 = a quarter of the
cores, at least 1), each a grpc.aio interpreter that drives a few thousand calls a second at most.
"""

from __future__ import annotations

import argparse
import os
import shlex

import torch

from benchmarks.peer import measure
from benchmarks.serve import ROOT, serving
from service.model.hardware import usable_cores


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{usable_cores()} CPU cores"


def report(clients: list[int], rows: list[tuple[int, list[dict]]]) -> None:
    heads = " | ".join(f"{c} clients QPS / p50 / p99 ms" for c in clients)
    print(f"\n| --workers | {heads} | CPU ms per request ({' / '.join(str(c) for c in clients)} clients) |")
    print("| --- | " + " | ".join("---" for _ in clients) + " | --- |")
    for workers, runs in rows:
        cells = [f"{r['qps']:.0f} / {r['p50_ms']:.1f} / {r['p99_ms']:.1f}" for r in runs]
        cpu = " / ".join(f"{r['cpu_ms_per_request']:.2f}" for r in runs)
        print(f"| {workers} | " + " | ".join(cells) + f" | {cpu} |")
    base_workers, base = rows[0]
    for workers, runs in rows[1:]:
        ratios = ", ".join(f"{c} clients {r['qps'] / b['qps']:.2f}x" for c, r, b in zip(clients, runs, base))
        print(f"QPS with --workers {workers} against --workers {base_workers}: {ratios}")
    for workers, runs in rows:
        errors = sum(r["errors"] for r in runs)
        if errors:
            print(f"errors with --workers {workers}: {errors} ({[r['codes'] for r in runs]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.path.join(ROOT, "models", "default.pt"))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", default="1,4,16", help="worker counts, one server each")
    parser.add_argument("--clients", default="64,256,1024")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--load-processes", type=int, default=0, help="load-generator processes (0 = cores / 4)")
    parser.add_argument("--server-flags", default="", help='more nextword-serve flags ("--max-concurrent-rpcs 1024")')
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    clients = [int(c) for c in args.clients.split(",")]
    processes = args.load_processes or max(1, usable_cores() // 4)
    print(
        f"model {args.model}; device {args.device} ({device_name(args.device)}); torch {torch.__version__}; "
        f"{usable_cores()} cores; {processes} load-generator processes; {args.runs} run(s) of {args.seconds:g} s "
        "per point",
        flush=True,
    )
    rows = []
    for count in workers:
        flags = ["--no-log-calls", "--device", args.device, "--workers", str(count), *shlex.split(args.server_flags)]
        print(f"nextword-serve {' '.join(flags)}:", flush=True)
        with serving(os.path.abspath(args.model), *flags) as (port, pid):
            rows.append((count, measure(port, pid, clients, args.seconds, args.runs, "--processes", str(processes))))
    report(clients, rows)


if __name__ == "__main__":
    main()
