"""Prometheus metrics, served on their own HTTP port (prometheus-client).

    nextword_requests_total{method, code}      calls finished, by gRPC status code
    nextword_request_seconds{method}           latency histogram (a stream: until its last message)
    nextword_active_calls                      calls being handled now
    nextword_active_sessions                   open Type sessions
    nextword_active_generations                running Generate streams
    nextword_batch_rows                        sequences per batched forward of the model
    nextword_queue_depth                       model steps waiting for the model worker
    nextword_dropped_steps_total               queued model steps skipped: their caller had cancelled or timed out
    nextword_model_info{...}                   the served model (tokenizer, cell, size, device)

Each server has its own registry, so several can live in one process (tests).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "nextword_requests", "Calls finished, by method and gRPC status code", ["method", "code"], registry=r
        )
        self.latency = Histogram(
            "nextword_request_seconds", "Call latency in seconds", ["method"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.active_calls = Gauge("nextword_active_calls", "Calls being handled", registry=r)
        self.active_sessions = Gauge("nextword_active_sessions", "Open Type sessions", registry=r)
        self.active_generations = Gauge("nextword_active_generations", "Running Generate streams", registry=r)
        self.batch_rows = Histogram(
            "nextword_batch_rows", "Sequences per batched forward of the model", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("nextword_queue_depth", "Model steps waiting for the model worker", registry=r)
        self.dropped_steps = Counter(
            "nextword_dropped_steps", "Queued model steps skipped because their caller had gone", registry=r
        )
        self.model = Info("nextword_model", "The served model", registry=r)
        self._http = None

    def watch(
        self, sessions: Callable[[], int], generations: Callable[[], int], queue_depth: Callable[[], int]
    ) -> None:
        self.active_sessions.set_function(sessions)
        self.active_generations.set_function(generations)
        self.queue_depth.set_function(queue_depth)

    def start_http(self, host: str, port: int) -> int:
        """Serve /metrics; returns the port (port 0 picks a free one)."""
        self._http, _ = start_http_server(port, addr=host.strip("[]") or "0.0.0.0", registry=self.registry)
        return self._http.server_port

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
