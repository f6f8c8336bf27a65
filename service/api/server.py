"""The gRPC server: load -> warm up -> health SERVING -> serve; on SIGTERM/SIGINT NOT_SERVING -> stop(grace)."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import threading
from collections.abc import Callable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.api.config import ServerConfig
from service.api.http_front import HttpFront
from service.api.interceptors import CallGuard
from service.api.metrics import Metrics
from service.api.servicer import NextWordServicer
from service.api.users import Grant
from service.history.histories import open_histories
from service.model.batching import BatchingModel
from service.model.engine import Engine, by_name
from service.model.hardware import DEVICE_FAILED_EXIT, ThreadPlan
from service.pb.nextword.v1 import nextword_pb2 as pb
from service.pb.nextword.v1 import nextword_pb2_grpc as pb_grpc

log = logging.getLogger("nextword")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["NextWord"].full_name  # "nextword.v1.NextWord"
TOKEN_ENV = "NEXTWORD_AUTH_TOKEN"
STOP_SECONDS = 5.0  # how long past the grace period a stop waits for the gRPC port to close
NOT_SERVING_SECONDS = 1.0  # the most a stop waits for the health service to tell its watchers
SPARE_THREADS = 16  # beyond max_concurrent_rpcs: health checks and refusals always find a thread


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise ValueError(f"cannot read {what} {path}: {error.strerror}") from None


def load_tokens(config: ServerConfig) -> list[Grant]:
    """Bearer tokens from auth_token_file (a token per line, optionally with the users it may name, # comments;
    see service/api/users.py) and the NEXTWORD_AUTH_TOKEN variable (a token that names no user)."""
    grants = []
    if config.auth_token_file:
        text = _read(config.auth_token_file, "--auth-token-file").decode("utf-8", errors="replace")
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        grants = [Grant.parse(line) for line in lines]
        if not grants:
            raise ValueError(f"--auth-token-file {config.auth_token_file} has no token (one per line)")
    if os.environ.get(TOKEN_ENV, "").strip():
        grants.append(Grant(os.environ[TOKEN_ENV].strip()))
    for grant in grants:
        if len(grant.token) < 16 or any(ch.isspace() for ch in grant.token):
            raise ValueError("a bearer token must have at least 16 characters and no white space")
    return grants


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    bare = host.strip("[]")
    if bare == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:  # a host name: it may name any interface
        return False


def check_exposure(config: ServerConfig, tokens: list[Grant], warn: bool = True) -> None:
    """Refuses to serve personal histories to anyone who can reach the port: a server beyond loopback with
    history on needs bearer tokens, or --trust-user-header behind an authenticating proxy. Warns once when
    tokens would cross the network in plaintext."""
    exposed = not is_loopback(config.host)
    if exposed and config.history_db != "off" and not tokens and not config.trust_user_header:
        raise ValueError(
            f"--host {config.host} is reachable beyond this machine and personal history is on, so any caller "
            "could name any user: give --auth-token-file (tokens bound to users), or --trust-user-header behind "
            "a proxy that authenticates (or --history-db off, or --host 127.0.0.1)"
        )
    if warn and exposed and tokens and not (config.tls_cert and config.tls_key):
        log.warning(
            "bearer tokens are accepted over plaintext on %s: anyone on the network path can read them; "
            "give --tls-cert and --tls-key",
            config.host,
        )


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if not (config.tls_cert or config.tls_key):
        if config.tls_client_ca:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (config.tls_cert and config.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    pair = (_read(config.tls_key, "--tls-key"), _read(config.tls_cert, "--tls-cert"))
    ca = _read(config.tls_client_ca, "--tls-client-ca") if config.tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


class Server:
    """A started gRPC server with its health service; ``stop()`` drains it gracefully."""

    def __init__(
        self,
        config: ServerConfig,
        engines: Engine | dict[str, Engine],
        threads: ThreadPlan | None = None,
        reuse_port: bool = False,
    ) -> None:
        """``engines``: the served models by name (the first answers requests that name none);
        ``reuse_port``: share the port with other processes (the workers of service/api/workers.py)."""
        self.config = config
        self.engines = by_name(engines)
        self.engine = next(iter(self.engines.values()))
        threads = threads or ThreadPlan.for_server(config.threads, config.batching)
        self.threads = threads  # what a reloaded model is loaded with (service/api/reload.py)
        self.reloading = threading.Lock()  # one reload at a time
        self.metrics = Metrics()
        tokens = load_tokens(config)
        check_exposure(config, tokens, warn=config.workers <= 1)  # with workers, the parent warns
        credentials = server_credentials(config)
        self.guard = CallGuard(
            self.metrics,
            tokens,
            config.max_concurrent_rpcs,
            config.health_without_auth,
            config.log_calls,
            config.max_watch_streams,
        )
        self.guard.on_device_failure = self._device_failed
        self.device_failed = False  # the model's GPU failed: the process exits with DEVICE_FAILED_EXIT
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", int(reuse_port)),
        ]
        # One thread per call (a Type session holds its thread): the guard refuses calls beyond the limit.
        pool_threads = config.max_concurrent_rpcs + SPARE_THREADS
        pool = futures.ThreadPoolExecutor(
            max_workers=pool_threads,
            thread_name_prefix="rpc",
            initializer=threads.apply_here,
        )
        self.grpc = grpc.server(pool, interceptors=[self.guard], options=options)
        self.histories = open_histories(config, self.metrics.history_event)  # service/history/; None: off
        if self.histories is not None:
            store = self.histories.store
            self.metrics.gauge_function(self.metrics.history_store_up, lambda: float(store.up))
        self.servicer = NextWordServicer(self.engines, config, self.histories)
        self.metrics.watch(lambda: self.servicer.active_sessions, lambda: self.servicer.active_generations)
        for name, engine in self.engines.items():
            self.watch_engine(name, engine)
        pb_grpc.add_NextWordServicer_to_server(self.servicer, self.grpc)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        if config.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
                self.grpc,
            )
        address = f"{config.host}:{config.port}"
        self.tls = credentials is not None
        self.port = (
            self.grpc.add_secure_port(address, credentials) if credentials else self.grpc.add_insecure_port(address)
        )
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        self.auth = bool(tokens)
        self.reuse_port = reuse_port
        self.http: HttpFront | None = None
        if config.http_port is not None:  # the same servicer and guard, on as many threads as gRPC's
            self.http = HttpFront(self.servicer, self.guard, config, pool_threads, threads.apply_here)
        self.http_port: int | None = None
        self.metrics_port = self.metrics.start_http(config.host, config.metrics_port) if config.metrics else None
        self._stopped = threading.Event()

    def watch_engine(self, name: str, engine: Engine) -> None:
        """The metrics of one model: its worker's queue and batches, and what it is."""
        self.metrics.gauge_function(
            self.metrics.queue_depth.labels(name), lambda: getattr(engine.model, "queue_depth", 0)
        )
        if isinstance(engine.model, BatchingModel):
            engine.model.on_batch = self.metrics.batch_rows.labels(name).observe
            engine.model.on_drop = self.metrics.dropped_steps.labels(name).inc
        manifest = engine.artifact.manifest
        self.metrics.describe_model(
            {
                "name": name,
                "path": engine.path,
                "format_version": str(manifest.format_version),
                "tokenizer": manifest.tokenizer.kind,
                "vocab_size": str(manifest.tokenizer.vocab_size),
                "cell": manifest.cell,
                "num_layers": str(manifest.num_layers),
                "hidden_size": str(manifest.hidden_size),
                "device": str(engine.model.device),
            }
        )

    def start(self) -> Server:
        self.grpc.start()
        if self.http is not None and self.config.http_port is not None:
            self.http_port = self.http.start(self.config.host, self.config.http_port, self.reuse_port)
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self

    def _device_failed(self) -> None:
        """A model step failed on the GPU, whose CUDA context then usually stays broken: stop (NOT_SERVING at
        once, the calls in flight drain), so that the process exits and is started again."""
        self.device_failed = True
        threading.Thread(target=self.stop, name="device-failed", daemon=True).start()

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING at once, then in-flight calls get ``grace`` seconds to finish; then the model worker stops."""

        def not_serving() -> None:
            for name in ("", SERVICE_NAME):
                self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

        # grpc_health tells every Watch stream in the calling thread: a stream whose send is stuck (a client
        # that went away mid-send) must not hold the stop up, and stopping the port ends those streams
        told = threading.Thread(target=not_serving, name="health-not-serving", daemon=True)
        told.start()
        told.join(NOT_SERVING_SECONDS)
        grace = self.config.grace if grace is None else grace
        http = threading.Thread(target=self.http.stop, args=(grace,), daemon=True) if self.http is not None else None
        if http is not None:  # both fronts drain at once
            http.start()
        if not self.grpc.stop(grace).wait(grace + STOP_SECONDS):
            # a stream whose send is stuck (a Watch client that stopped reading) can hold gRPC's own shutdown;
            # the process goes on stopping rather than wait for it
            log.warning("the gRPC port had not stopped %.0f s after the grace period; stopping anyway", STOP_SECONDS)
        if http is not None:
            http.join(grace + 10)
        if self.histories is not None:  # what was learned is written before the process exits
            self.histories.close(timeout=max(1.0, grace))
        for engine in self.engines.values():
            engine.close()
        self.metrics.stop_http()
        self._stopped.set()

    def wait(self) -> None:
        # Wake now and then: Python runs signal handlers in the main thread, and a SIGTERM that the
        # kernel delivers to another thread (gRPC's, OpenMP's) does not interrupt a wait without timeout.
        while not self._stopped.wait(0.25):
            pass


def create_server(
    config: ServerConfig, engines: Engine | dict[str, Engine], threads: ThreadPlan | None = None
) -> tuple[Server, int]:
    """A started server; port 0 in the config picks a free port, returned here."""
    server = Server(config, engines, threads).start()
    return server, server.port


def _stop_on_signals(stop: Callable[[], None], grace: float) -> None:
    """SIGTERM and SIGINT call ``stop`` on a thread of its own (the main thread keeps waiting)."""

    def on_signal(signum, frame):
        log.info("received %s: NOT_SERVING, draining for up to %.0f s", signal.Signals(signum).name, grace)
        threading.Thread(target=stop, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def _started(config: ServerConfig) -> Server:
    """Load, warm up and start: the server of this process."""
    threads = ThreadPlan.for_server(config.threads, config.batching, config.workers)  # see service/model/hardware.py
    threads.apply_here()  # this thread loads the model and warms it up
    engines = {name: Engine.load(config, threads, name, path) for name, path in config.models}
    for engine in engines.values():
        engine.warm_up()
    return Server(config, engines, threads, reuse_port=config.workers > 1).start()


def describe_history(config: ServerConfig) -> str:
    if config.history_db == "off":
        return "personal history off"
    where = "PostgreSQL" if "://" in config.history_db else os.path.abspath(config.history_db)
    return f"personal history in {where}" + ("" if config.learning else " (read only: --no-learning)")


def _announce(
    config: ServerConfig, port: int, what: str, secure: bool, metrics_port: int | None, http_port: int | None = None
) -> None:
    history = describe_history(config)
    http = f"; HTTP on port {http_port} (the demo page: http://localhost:{http_port}/)" if http_port is not None else ""
    log.info(
        "serving %s on %s:%d%s; %s, %s; metrics %s; %s",
        what,
        config.host,
        port,
        http,
        "TLS" + (" with client certificates" if config.tls_client_ca else "") if config.tls_cert else "plaintext",
        "bearer tokens required" if secure else "no authentication",
        f"on port {metrics_port} (/metrics)" if metrics_port else "off",
        history,
    )
    if config.tls_cert or secure:
        print(f"nextword: SERVING on port {port}{http}; {history}", flush=True)
    else:
        print(
            f"nextword: SERVING on port {port}{http}; {history}. Try:\n"
            f'  python -m service.client --target localhost:{port} suggest "In the beginning"\n'
            f'  grpcurl -plaintext -d \'{{"text": "In the beginning"}}\' localhost:{port} '
            "nextword.v1.NextWord/Suggest",
            flush=True,
        )


def serve_worker(config: ServerConfig, serving: Callable[[Server], None]) -> None:
    """One worker process of ``--workers`` (service/api/workers.py): ``serving(server)`` is called once it listens
    (the parent's reloads and admin operations reach it through there)."""
    server = _started(config)
    _stop_on_signals(server.stop, config.grace)
    serving(server)
    server.wait()
    if server.device_failed:
        raise SystemExit(DEVICE_FAILED_EXIT)  # the parent starts a replacement
