"""Memory over reloads: a server in this process reloads models/default.pt again and again (alternating with
another file, so each reload loads), and the resident memory after the first reload and after the last is
printed with their ratio (the target: at most 1.10x).

    python -m benchmarks.reload [--model models/default.pt] [--other FILE] [--reloads 50]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import threading
import time

from service.api.config import ServerConfig
from service.api.reload import fix_allocator, reload
from service.api.server import create_server
from service.model.engine import Engine


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def retired(seconds: float = 60.0) -> None:
    """Wait until the models replaced so far are retired (their threads, service/api/reload.py, have ended)."""
    deadline = time.monotonic() + seconds
    while any(t.name == "model-retire" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/default.pt")
    parser.add_argument("--other", default="", help="the file to alternate with (default: a copy of --model, changed)")
    parser.add_argument("--reloads", type=int, default=50)
    args = parser.parse_args()
    fix_allocator()  # as the server does before its models load
    with tempfile.TemporaryDirectory() as folder:
        served, other = os.path.join(folder, "m.pt"), args.other
        if not other:  # the same model with another version: a byte appended past the zip's end
            other = os.path.join(folder, "other.pt")
            shutil.copy(args.model, other)
            with open(other, "ab") as handle:
                handle.write(b"\0")
        shutil.copy(args.model, served)
        config = ServerConfig(model=(f"m={served}",), port=0, metrics=False, history_db="off")
        server, _ = create_server(config, {"m": Engine.load(config, name="m", path=served)})
        try:
            files, started, sizes = [other, args.model], time.perf_counter(), []
            for index in range(args.reloads):
                shutil.copy(files[index % 2], served)
                result = reload(server)["m"]
                if not result.startswith("reloaded"):
                    raise SystemExit(f"reload {index + 1}: {result}")
                retired()
                gc.collect()
                sizes.append(rss_mib())
            seconds = (time.perf_counter() - started) / args.reloads
        finally:
            server.stop(0)
    print(f"{args.model}, {args.reloads} reloads in one process, {seconds:.2f} s each (load and warm-up)\n")
    print("| RSS after the first reload | after the last | last / first | target |")
    print("| --- | --- | --- | --- |")
    print(f"| {sizes[0]:.0f} MiB | {sizes[-1]:.0f} MiB | {sizes[-1] / sizes[0]:.3f}x | at most 1.10x |")


if __name__ == "__main__":
    main()
