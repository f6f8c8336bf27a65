"""Changing models while serving: a model file whose contents changed is loaded and warmed up beside the one
being served, then swapped in at once; calls already running (open Type sessions, Generate streams) finish on
the model they started with, and the old one is freed when its last call ends. A file that cannot serve
(damaged, another kind, its checksums, its warm-up) is refused: the old model keeps serving, health stays
SERVING, and the refusal is one log line and ``nextword_model_reloads_total{result="refused"}``.

SIGHUP reloads every served model whose file changed; ``--watch-models`` does the same when it sees a file
change. With ``--workers`` the parent passes SIGHUP to one worker at a time and waits for it to report, so
that N-1 workers stay ready throughout (service/api/workers.py).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

from service.model.artifact import ArtifactError
from service.model.engine import Engine, file_version

log = logging.getLogger("nextword")
RETIRE_SECONDS = 3600.0  # the longest an old model waits for its last call (a Type session) before it is freed
WATCH_SECONDS = 1.0  # how often --watch-models looks at the files


def reload(server, names: list[str] | None = None) -> dict[str, str]:
    """Reload every served model (or those ``names``) whose file changed (``server``: service/api/server.py
    Server); what happened to each, by name: "reloaded VERSION", "unchanged" or "refused: why"."""
    with server.reloading:
        served = {name: engine.path for name, engine in server.servicer.engines.items()}
        return {
            name: _reload_one(server, name, path) for name, path in served.items() if names is None or name in names
        }


def _reload_one(server, name: str, path: str, force: bool = False) -> str:
    current = server.servicer.engines.get(name)
    try:
        version = file_version(path)
        if current is not None and version == current.version and not force:
            return "unchanged"
        engine = Engine.load(server.config, server.threads, name, path)
        try:
            engine.warm_up()
        except BaseException:
            engine.close()  # its worker thread ends with the refusal
            raise
    except (ArtifactError, ValueError, OSError, RuntimeError) as error:
        server.metrics.model_reloads.labels("refused").inc()
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        log.error("model %s: %s was refused, the loaded one serves on: %s", name, path, reason)
        return f"refused: {reason}"
    old = server.servicer.models.swap(name, engine)
    server.watch_engine(name, engine)
    server.metrics.model_reloads.labels("reloaded").inc()
    log.warning(
        "model %s: version %s from %s serves new calls (was %s)",
        name,
        engine.version,
        path,
        old.version if old else "none",
    )
    if old is not None:
        threading.Thread(target=_retire, args=(old,), name="model-retire", daemon=True).start()
    return f"reloaded {engine.version}"


def _retire(engine: Engine) -> None:
    """Once the old model's last call has ended: stop its worker and give its memory back."""
    if not engine.retire(RETIRE_SECONDS):
        log.warning(
            "model %s version %s still had calls after %.0f s; freed anyway",
            engine.name,
            engine.version,
            RETIRE_SECONDS,
        )
    del engine
    gc.collect()
    _trim()


# glibc serves an allocation this large or larger from mmap, and gives it back when freed. Left to itself it
# raises that threshold to the largest block freed (up to 32 MiB), so once a model has been freed, the next
# model's arrays come from the heap, and a model reloaded every day keeps the peak of two models for good
# (benchmarks/reload.py: 1.17x after 50 reloads; with a fixed 1 MiB, 1.05x). Calls allocate less than that.
MMAP_THRESHOLD = 1 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)


def fix_allocator() -> None:
    """Fix glibc's mmap and trim thresholds at ``MMAP_THRESHOLD`` before models load, unless the operator set
    them (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_); another C library keeps its own policy."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


def _trim() -> None:
    """Give the freed memory back to the system (glibc keeps freed heap pages for the process otherwise, and a
    model reloaded every day would hold the peak of two models for good)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # another C library: its own policy
        pass


class Refusal(Exception):
    """An admin operation refused: a gRPC code name and why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def control(server, op: str, args: dict) -> dict:
    """The admin port's operations on this process's models (service/api/admin.py): list, add, reload, remove.
    A refusal is {"error": gRPC code name, "message": why}."""
    operation = OPERATIONS.get(op)
    try:
        if operation is None:
            raise Refusal("NOT_FOUND", f"no operation {op!r}")
        return operation(server, str(args.get("name", "")), str(args.get("path", "")))
    except Refusal as refusal:
        return {"error": refusal.code, "message": str(refusal)}


def _served(server, name: str) -> None:
    if name not in server.servicer.engines:
        raise Refusal("NOT_FOUND", f"no model named {name!r} is served")


def _list(server, name: str, path: str) -> dict:
    return {"models": [describe(engine) for engine in server.servicer.engines.values()]}


def _reload(server, name: str, path: str) -> dict:
    if name:
        _served(server, name)
    return {"results": reload(server, [name] if name else None)}


def _add(server, name: str, path: str) -> dict:
    if not name or not path:
        raise Refusal("INVALID_ARGUMENT", "add needs a name and a path")
    if name in server.servicer.engines:
        raise Refusal("ALREADY_EXISTS", f"a model named {name!r} is served: reload it instead")
    with server.reloading:
        result = _reload_one(server, name, path, force=True)
    if result.startswith("refused"):
        raise Refusal("FAILED_PRECONDITION", result)
    return {"results": {name: result.replace("reloaded", "added")}}


def _remove(server, name: str, path: str) -> dict:
    _served(server, name)
    if len(server.servicer.engines) == 1:
        raise Refusal("FAILED_PRECONDITION", "the last model cannot be removed")
    with server.reloading:
        old = server.servicer.models.remove(name)
    threading.Thread(target=_retire, args=(old,), name="model-retire", daemon=True).start()
    log.warning("model %s: removed; its calls finish on it", name)
    return {"results": {name: "removed"}}


OPERATIONS: dict[str, Callable[..., dict]] = {"list": _list, "reload": _reload, "add": _add, "remove": _remove}


def describe(engine: Engine) -> dict:
    return {
        "name": engine.name,
        "path": engine.path,
        "version": engine.version,  # the file's sha256, short
        "loaded_at": engine.loaded_at,
        "calls": engine.calls,
    }


def on_hangup(server, report: Callable[[dict[str, str]], None] | None = None) -> None:
    """SIGHUP reloads on a thread of its own (``report``: told the results, as a worker tells its parent)."""

    def reload_and_report() -> None:
        results = reload(server)
        if report is not None:
            report(results)

    def on_signal(signum, frame) -> None:
        log.info("received SIGHUP: reloading the model files that changed")
        threading.Thread(target=reload_and_report, name="model-reload", daemon=True).start()

    signal.signal(signal.SIGHUP, on_signal)


class ModelWatcher(threading.Thread):
    """--watch-models: ``changed()`` is called when a model file's size or time of change moves, once it has
    stayed so for a look (a file still being copied is not taken half-written)."""

    def __init__(self, paths: list[str], changed: Callable[[], object]) -> None:
        super().__init__(name="model-watch", daemon=True)
        self.paths, self.changed = paths, changed
        self.stopping = threading.Event()

    @staticmethod
    def _seen(path: str) -> tuple[int, int] | None:
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return stat.st_size, stat.st_mtime_ns

    def run(self) -> None:
        seen = {path: self._seen(path) for path in self.paths}
        pending: dict[str, tuple[int, int] | None] = {}
        while not self.stopping.wait(WATCH_SECONDS):
            now = {path: self._seen(path) for path in self.paths}
            moved = {path for path in self.paths if now[path] != seen[path]}
            settled = [path for path in moved if pending.get(path) == now[path] and now[path] is not None]
            pending = {path: now[path] for path in moved}
            if settled:
                for path in settled:
                    seen[path] = now[path]
                started = time.monotonic()
                self.changed()
                log.info("--watch-models: reloaded in %.1f s", time.monotonic() - started)
