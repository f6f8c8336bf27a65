"""Prometheus metrics, served on their own HTTP port (prometheus-client).

    nextword_requests_total{method, code, model, protocol}  calls finished, by gRPC status code, model ("": none)
                                               and protocol (grpc, or http for the HTTP/JSON front)
    nextword_request_seconds{method, protocol} latency histogram (a stream: until its last message)
    nextword_active_calls                      calls being handled now
    nextword_active_sessions                   open Type sessions
    nextword_active_generations                running Generate streams
    nextword_batch_rows{model}                 sequences per batched forward of the model
    nextword_queue_depth{model}                model steps waiting for the model's worker
    nextword_dropped_steps_total{model}        queued model steps skipped: their caller had cancelled or timed out
    nextword_model_info{name, ...}             each served model (tokenizer, cell, size, device)
    nextword_model_reloads_total{result}       model files reloaded (reloaded) or refused, the old one serving on
    nextword_history_store_up                  1 while the personal-history database answers, 0 while it is down
    nextword_history_events_total{event}       what the store's faults cost: answered_without (a call answered
                                               without its user's history: the database slow or down),
                                               rows_set_aside (learned counts the database refused),
                                               counts_dropped (learned counts beyond the pending bound)

Each server has its own registry, so several can live in one process (tests).

With several worker processes (``--workers``, service/api/workers.py) the values live in
prometheus-client's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``, set by the parent
before it starts the workers), and the parent serves their sum on the one metrics port.
There a gauge holds the sum over the live workers, sampled every ``SAMPLE_SECONDS``, and
the model's info is a gauge of value 1 with the same labels.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
SAMPLE_SECONDS = 1.0
MODEL_LABELS = (
    "name",
    "path",
    "format_version",
    "tokenizer",
    "vocab_size",
    "cell",
    "num_layers",
    "hidden_size",
    "device",
)


def shared() -> bool:
    """Whether this process writes its metrics to the multiprocess files of a parent."""
    return bool(os.environ.get(MULTIPROCESS_ENV))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.shared = shared()
        r = self.registry
        live: dict[str, Any] = {"multiprocess_mode": "livesum"}
        self.requests = Counter(
            "nextword_requests",
            "Calls finished, by method, gRPC status code, model and protocol (grpc or http)",
            ["method", "code", "model", "protocol"],
            registry=r,
        )
        self.latency = Histogram(
            "nextword_request_seconds",
            "Call latency in seconds",
            ["method", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.active_calls = Gauge("nextword_active_calls", "Calls being handled", registry=r, **live)
        self.active_sessions = Gauge("nextword_active_sessions", "Open Type sessions", registry=r, **live)
        self.active_generations = Gauge("nextword_active_generations", "Running Generate streams", registry=r, **live)
        self.batch_rows = Histogram(
            "nextword_batch_rows",
            "Sequences per batched forward of the model",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "nextword_queue_depth", "Model steps waiting for the model's worker", ["model"], registry=r, **live
        )
        self.history_store_up = Gauge(
            "nextword_history_store_up",
            "1 while the personal-history database answers",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.history_events = Counter(
            "nextword_history_events",
            "What the history store's faults cost: calls answered without history, rows set aside, counts dropped",
            ["event"],
            registry=r,
        )
        self.model_reloads = Counter(
            "nextword_model_reloads",
            "Model files reloaded (SIGHUP, --watch-models), by result: reloaded or refused",
            ["result"],
            registry=r,
        )
        self.dropped_steps = Counter(
            "nextword_dropped_steps", "Queued model steps skipped because their caller had gone", ["model"], registry=r
        )
        self._model: Gauge | Info
        if self.shared:  # prometheus-client's Info has no multiprocess form
            self._model = Gauge(
                "nextword_model_info", "The served model", MODEL_LABELS, registry=r, multiprocess_mode="max"
            )
        else:
            self._model = Info("nextword_model", "A served model", ["name"], registry=r)
        self._http: Any = None
        self._sampled: list[tuple[Gauge, Callable[[], float]]] = []
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()

    def describe_model(self, info: dict[str, str]) -> None:
        if isinstance(self._model, Gauge):
            self._model.labels(*(info[name] for name in MODEL_LABELS)).set(1)
        else:
            self._model.labels(info["name"]).info({k: v for k, v in info.items() if k != "name"})

    def history_event(self, event: str, count: int) -> None:
        self.history_events.labels(event).inc(count)

    def gauge_function(self, gauge: Gauge, function: Callable[[], float]) -> None:
        """``gauge`` reads ``function``: at each scrape in one process, every SAMPLE_SECONDS in a worker."""
        if not self.shared:
            gauge.set_function(function)
            return
        self._sampled.append((gauge, function))
        if self._sampler is None:
            self._sampler = threading.Thread(target=self._sample, name="metrics-sampler", daemon=True)
            self._sampler.start()

    def _sample(self) -> None:
        while True:
            for gauge, function in self._sampled:
                gauge.set(function())
            if self._stop.wait(SAMPLE_SECONDS):
                return

    def watch(self, sessions: Callable[[], int], generations: Callable[[], int]) -> None:
        self.gauge_function(self.active_sessions, sessions)
        self.gauge_function(self.active_generations, generations)

    def start_http(self, host: str, port: int) -> int:
        """Serve /metrics; returns the port (port 0 picks a free one)."""
        self._http = serve_http(host, port, self.registry)
        return self._http.server_port

    def stop_http(self) -> None:
        self._stop.set()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def serve_http(host: str, port: int, registry: CollectorRegistry) -> Any:
    """An HTTP server of /metrics for ``registry``, started (port 0 picks a free port)."""
    server, _ = start_http_server(port, addr=host.strip("[]") or "0.0.0.0", registry=registry)
    return server


def serve_shared_http(host: str, port: int, directory: str):
    """The parent's /metrics: the sum over the workers' multiprocess files in ``directory``."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    return serve_http(host, port, registry)
