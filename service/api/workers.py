"""Several server processes on one port (``nextword-serve --workers N``).

One interpreter runs a call's Python (the gRPC handler, the interceptor, the batcher's hand-offs)
on one core at a time. Workers are whole servers, one process each, that listen on the same port
with ``SO_REUSEPORT``: the kernel spreads incoming connections over them, so the calls of many
clients run on every core. A connection stays on the worker that accepted it, so a Type session
(one stream) stays on its worker, and a client that opens one channel uses one worker.

The parent process loads no model. It

- reserves the port (port 0 picks a free one), starts the workers and waits until each has loaded
  and warmed up its model and listens (a worker that fails before then fails the start: exit 1);
- serves /metrics: the sum over the workers, from prometheus-client's multiprocess files;
- replaces a worker that exits while serving (the log says which and how it ended; replacements
  that fail to start are retried with a growing pause), such as one whose GPU failed (a CUDA, cuDNN
  or cuBLAS error, or its memory ran out: service/api/server.py), which exits with DEVICE_FAILED_EXIT;
- on SIGTERM or SIGINT, passes SIGTERM to every worker: each turns health NOT_SERVING and drains
  its calls within ``--grace``, then exits. A worker still running ``KILL_AFTER`` seconds past the
  grace is killed.

Health is per worker (a worker answers SERVING once it listens, NOT_SERVING once it drains), and a
worker only listens once its model is warm, so no connection reaches one that cannot answer.
Limits such as --max-concurrent-rpcs and --max-sessions hold per worker.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from service.api.config import ServerConfig
from service.api.metrics import MULTIPROCESS_ENV
from service.model.hardware import DEVICE_FAILED_EXIT

log = logging.getLogger("nextword")
KILL_AFTER = 5.0  # seconds past the grace before a draining worker is killed
RESTART_PAUSES = (0.5, 1, 2, 5, 10, 30)  # between restarts of a worker that keeps failing, growing to a cap
RELOAD_SECONDS = 300.0  # the longest a worker may take to load and warm up its changed models
STABLE_SECONDS = 60.0  # a worker that served this long and then ended is restarted at once


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound (not listening) socket that holds ``port`` for the workers, which bind it with SO_REUSEPORT.
    A fixed port that another program listens on is refused here, with a clear error."""
    family, _, _, _, address = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM)[0]
    if port:  # without SO_REUSEPORT, so a server already on the port (even another nextword) is found
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                raise OSError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(address)
    return holder


def run_worker(config: ServerConfig, index: int, channel) -> None:
    """A worker process: one whole server on the shared port. It sends the parent ("serving", "") once it
    listens, or ("error", why) when it cannot start."""
    from service.api.logs import configure_logging
    from service.api.reload import fix_allocator
    from service.api.server import serve_worker

    configure_logging(config.log_format, worker=index)
    fix_allocator()
    try:
        serve_worker(config, lambda server: _serving(channel, server))
    except Exception as error:  # noqa: BLE001 - the parent reports it in one line
        channel.send(("error", str(error)))
        raise SystemExit(1) from None


def _serving(channel, server) -> None:
    """Tell the parent; then carry out its commands (reload, the admin port's: service/api/reload.py control),
    and drain and stop if the parent goes away, so no worker outlives it."""
    from service.api.reload import control

    channel.send(("serving", ""))

    def listen() -> None:
        try:
            while True:
                op, args = channel.recv()  # returns EOFError when the parent's end closes
                channel.send(("result", control(server, op, args)))
        except (EOFError, OSError):
            pass
        server.stop()

    threading.Thread(target=listen, name="parent-commands", daemon=True).start()


@dataclass
class _Worker:
    index: int
    process: multiprocessing.process.BaseProcess
    ready: multiprocessing.connection.Connection
    serving: bool = False
    serving_since: float = 0.0  # monotonic


class Supervisor:
    """The parent of ``config.workers`` worker processes (see the module docstring)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._spawn = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch or gRPC state
        self._stopping = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()  # the set of workers: replacing one against stopping all
        self._reloading = threading.Lock()  # one round of reloads at a time
        self._workers: dict[int, _Worker] = {}
        self._failures: dict[int, int] = {}  # ends of a worker index in a row, each soon after it started
        self._metrics_dir = tempfile.mkdtemp(prefix="nextword-metrics-")
        os.environ[MULTIPROCESS_ENV] = self._metrics_dir  # inherited by the workers (service/api/metrics.py)
        self._port_holder = reserve_port(config.host, config.port)
        self.port = self._port_holder.getsockname()[1]
        self.http_port: int | None = None
        if config.http_port is not None:  # the HTTP front shares its port across the workers too
            self._http_holder = reserve_port(config.host, config.http_port)
            self.http_port = self._http_holder.getsockname()[1]
        self.worker_config = replace(config, port=self.port, http_port=self.http_port, metrics=False)
        self._metrics_http: Any = None
        self.metrics_port: int | None = None

    # ------------------------------------------------------------------ workers

    def _start(self, index: int) -> _Worker:
        ours, theirs = self._spawn.Pipe()
        process = self._spawn.Process(
            target=run_worker, args=(self.worker_config, index, theirs), name=f"nextword-worker-{index}", daemon=False
        )
        process.start()
        theirs.close()
        worker = self._workers[index] = _Worker(index, process, ours)
        return worker

    def _ended(self, worker: _Worker) -> None:
        from prometheus_client import multiprocess

        worker.process.join()
        worker.ready.close()
        multiprocess.mark_process_dead(worker.process.pid, self._metrics_dir)

    def start(self) -> bool:
        """Start every worker and wait until all listen: True; False when stop() came first. Raises
        ValueError, with the worker's reason, when one cannot start."""
        with self._lock:
            for index in range(self.config.workers):
                self._start(index)
        while any(not w.serving for w in self._workers.values()):
            if self._stopping.is_set():
                return False
            waiting: dict[Any, _Worker] = {w.ready: w for w in self._workers.values() if not w.serving}
            for handle in multiprocessing.connection.wait(list(waiting), timeout=0.25):
                worker = waiting[handle]
                why = self._heard(worker)
                if why is not None and not self._stopping.is_set():
                    self.stop()
                    raise ValueError(why)
        if self.config.metrics:
            from service.api.metrics import serve_shared_http

            self._metrics_http = serve_shared_http(self.config.host, self.config.metrics_port, self._metrics_dir)
            self.metrics_port = self._metrics_http.server_port
        return True

    @staticmethod
    def _heard(worker: _Worker) -> str | None:
        """Read a worker's message: None once it serves, else why it could not start."""
        try:
            what, why = worker.ready.recv()
        except (EOFError, OSError):  # it died without a word
            worker.process.join(1.0)
            return f"worker {worker.index} ended before it served (exit code {worker.process.exitcode})"
        if what == "serving":
            worker.serving, worker.serving_since = True, time.monotonic()
            return None
        return why

    def watch(self) -> None:
        """Until stop(): replace every worker that exits."""
        while not self._stopping.is_set():
            with self._lock:
                handles: dict[Any, _Worker] = {w.process.sentinel: w for w in self._workers.values()}
                handles |= {w.ready: w for w in self._workers.values() if not w.serving}
            for handle in multiprocessing.connection.wait(list(handles), timeout=0.25):
                worker = handles[handle]
                if handle is worker.ready:
                    why = self._heard(worker)
                    if why is None:
                        log.info("worker %d serves (a replacement)", worker.index)
                    else:
                        log.error("replacement worker %d cannot start: %s", worker.index, why)
                        worker.process.join()
                    continue
                if not self._stopping.is_set():
                    self._replace(worker)

    def _replace(self, worker: _Worker) -> None:
        self._ended(worker)
        code = worker.process.exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exited ({code})"
        if code == DEVICE_FAILED_EXIT:
            how = f"stopped because its model's device failed (exit {code})"
        if worker.serving and time.monotonic() - worker.serving_since >= STABLE_SECONDS:
            self._failures[worker.index] = 0
            log.warning("worker %d %s while serving; starting a replacement", worker.index, how)
        else:  # it never served, or ended soon after it began: a crash loop backs off
            failures = self._failures[worker.index] = self._failures.get(worker.index, 0) + 1
            pause = RESTART_PAUSES[min(failures, len(RESTART_PAUSES)) - 1]
            when = "while serving" if worker.serving else "before it served"
            log.warning(
                "worker %d %s %s (%d time(s) in a row within %.0f s of starting); restarting it in %.1f s",
                worker.index,
                how,
                when,
                failures,
                STABLE_SECONDS,
                pause,
            )
            if self._stopping.wait(pause):
                return
        with self._lock:
            if not self._stopping.is_set():
                self._start(worker.index)

    # ------------------------------------------------------------------ reloading

    def reload_all(self) -> None:
        """Every worker reloads its changed models, one at a time, so that all but one stay ready throughout; on a
        thread of its own (a signal handler or the file watcher calls it)."""
        threading.Thread(target=self.control, args=("reload", {}), name="reload-workers", daemon=True).start()

    def control(self, op: str, args: dict) -> dict:
        """An operation on the models (service/api/reload.py control), carried out by one worker at a time;
        {"workers": [each one's result, with its index]}. What changes the served set also changes what a
        replacement worker starts with."""
        with self._reloading:
            results = []
            for index in sorted(self._workers):
                worker = self._workers.get(index)
                if worker is None or not worker.serving or self._stopping.is_set():
                    continue
                if op == "reload":
                    log.info("worker %d: reloading", index)
                worker.ready.send((op, args))
                if not worker.ready.poll(RELOAD_SECONDS):
                    log.error("worker %d did not answer %s within %.0f s; going on", index, op, RELOAD_SECONDS)
                    results.append({"worker": index, "error": "DEADLINE_EXCEEDED", "message": "no answer in time"})
                    continue
                try:
                    _, result = worker.ready.recv()
                except (EOFError, OSError):
                    continue
                if op == "reload":
                    done = result.get("results", {})
                    log.info("worker %d: %s", index, "; ".join(f"{name} {what}" for name, what in done.items()))
                results.append({"worker": index, **result})
            self._remember(op, args, results)
            return {"workers": results}

    def _remember(self, op: str, args: dict, results: list[dict]) -> None:
        if op not in ("add", "remove") or not results or any("error" in result for result in results):
            return
        models = [spec for spec in self.worker_config.model if spec.partition("=")[0] != args.get("name")]
        if op == "add":
            models.append(f"{args['name']}={args['path']}")
        self.worker_config = replace(self.worker_config, model=tuple(models))

    # ------------------------------------------------------------------ stopping

    def stop(self) -> None:
        """SIGTERM to every worker (each drains within --grace), then wait for them. A second call returns."""
        with self._lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
            workers = list(self._workers.values())
        for worker in workers:
            if worker.process.is_alive():
                worker.process.terminate()  # SIGTERM: it drains and stops
        deadline = time.monotonic() + self.config.grace + KILL_AFTER
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                log.error("worker %d still ran %.0f s after the grace period: killed", worker.index, KILL_AFTER)
                worker.process.kill()
            self._ended(worker)
        self._workers.clear()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
        self._port_holder.close()
        if self.http_port is not None:
            self._http_holder.close()
        shutil.rmtree(self._metrics_dir, ignore_errors=True)
        self._done.set()

    def wait(self) -> None:
        """Until stop() has finished (waking now and then: signal handlers run in the main thread)."""
        while not self._done.wait(0.25):
            pass

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [w.process.pid for w in self._workers.values() if w.process.pid is not None]
