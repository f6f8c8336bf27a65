"""Overload benchmark: goodput under short deadlines, and Suggest beside long Generate streams.

    python -m benchmarks.overload [--model models/default.pt] [--seconds 8]

Against the server on the default model (default flags, ``--no-log-calls``, any ``--server-flag``),
driven by ``benchmarks/load.py`` from other processes (``--load-processes``), in one run:

1. the QPS of 64 closed-loop Suggest clients without deadlines (the reference);
2. 256 clients whose every Suggest has a 100 ms deadline: OK answers per second (goodput), the
   slowest OK answer and the count of each status, with queued work for callers who are gone
   dropped (the default) and with ``--no-drop-ended``; and with clients that back off after a
   failed call (``benchmarks/load.py --backoff``) instead of calling again at once;
3. Suggest at 8 clients alone, and beside 8 streams of 512-token Generates: p50 and p99.

It prints each measurement as a JSON line, then the ratios the targets are stated in.
"""

from __future__ import annotations

import argparse
import json
import os

from benchmarks.serve import ROOT, load, serving


def measure(port: int, clients: int, seconds: float, *flags: str) -> dict:
    result = load(port, clients, seconds, *flags)
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.path.join(ROOT, "models", "default.pt"))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=256, help="clients with deadlines (default 256)")
    parser.add_argument("--deadline-ms", type=float, default=100.0, help="their deadline (default 100)")
    parser.add_argument("--server-flag", action="append", default=[], help="one more server flag (repeatable)")
    parser.add_argument("--skip-isolation", action="store_true", help="leave out the Generate measurement")
    parser.add_argument(
        "--load-processes",
        type=int,
        default=1,
        help="load-generator processes (default 1; a many-core host needs more)",
    )
    args = parser.parse_args()
    deadline = ["--deadline-ms", str(args.deadline_ms), "--processes", str(args.load_processes)]
    results = {}
    flags = ["--no-log-calls", *args.server_flag]
    with serving(args.model, *flags) as (port, _):
        results["reference"] = measure(port, 64, args.seconds, "--processes", str(args.load_processes))
        results["dropping"] = measure(port, args.clients, args.seconds, *deadline)
        results["dropping, clients back off"] = measure(port, args.clients, args.seconds, *deadline, "--backoff")
        if not args.skip_isolation:
            results["alone"] = measure(port, 8, args.seconds)
            results["beside"] = measure(port, 8, args.seconds, "--generate-streams", "8")
    with serving(args.model, *flags, "--no-drop-ended") as (port, _):
        results["not dropping"] = measure(port, args.clients, args.seconds, *deadline)
    reference = results["reference"]["qps"]
    for name in ("dropping", "dropping, clients back off", "not dropping"):
        r = results[name]
        print(
            f"{args.clients} clients, {args.deadline_ms:g} ms deadline, {name}: goodput {r['qps']:.0f}/s = "
            f"{r['qps'] / reference:.2f}x the 64-client QPS without deadlines ({reference:.0f}); slowest OK "
            f"{r['max_ok_ms']:.1f} ms; codes {r['codes']}"
        )
    if args.skip_isolation:
        return
    alone, beside = results["alone"], results["beside"]
    print(
        f"Suggest at 8 clients: p50 {alone['p50_ms']:.1f} / p99 {alone['p99_ms']:.1f} ms alone; "
        f"{beside['p50_ms']:.1f} / {beside['p99_ms']:.1f} ms beside 8 Generate streams "
        f"({beside['generated_pieces']} pieces streamed): p99 {beside['p99_ms'] / alone['p99_ms']:.2f}x"
    )


if __name__ == "__main__":
    main()
