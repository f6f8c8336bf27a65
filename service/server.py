"""The gRPC server: load -> warm up -> health SERVING -> serve; on SIGTERM/SIGINT NOT_SERVING -> stop(grace)."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.config import ServerConfig
from service.engine import Engine
from service.interceptors import LastResortInterceptor
from service.pb.nextword.v1 import nextword_pb2 as pb
from service.pb.nextword.v1 import nextword_pb2_grpc as pb_grpc
from service.servicer import NextWordServicer

log = logging.getLogger("nextword")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["NextWord"].full_name  # "nextword.v1.NextWord"


class Server:
    """A started gRPC server with its health service; ``stop()`` drains it gracefully."""

    def __init__(self, config: ServerConfig, engine: Engine) -> None:
        self.config = config
        options = [("grpc.max_receive_message_length", config.max_message_bytes),
                   ("grpc.max_send_message_length", config.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="rpc"),
                                interceptors=[LastResortInterceptor()], options=options,
                                maximum_concurrent_rpcs=config.workers * 4)
        self.servicer = NextWordServicer(engine, config)
        pb_grpc.add_NextWordServicer_to_server(self.servicer, self.grpc)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        if config.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
                self.grpc)
        self.port = self.grpc.add_insecure_port(f"{config.host}:{config.port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {config.host}:{config.port}")
        self._stopped = threading.Event()

    def start(self) -> "Server":
        self.grpc.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING at once, then in-flight calls get ``grace`` seconds to finish."""
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.grpc.stop(self.config.grace if grace is None else grace).wait()
        self._stopped.set()

    def wait(self) -> None:
        self._stopped.wait()


def create_server(config: ServerConfig, engine: Engine) -> tuple[Server, int]:
    """A started server; port 0 in the config picks a free port, returned here."""
    server = Server(config, engine).start()
    return server, server.port


def serve(config: ServerConfig) -> None:
    engine = Engine.load(config)
    engine.warm_up()
    server, port = create_server(config, engine)

    def on_signal(signum, frame):
        log.info("received %s: NOT_SERVING, draining for up to %.0f s", signal.Signals(signum).name, config.grace)
        threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    manifest = engine.artifact.manifest
    log.info("serving %s (%s, %s %dx%d) on %s:%d, device %s", config.model, manifest["tokenizer"]["kind"],
             manifest["model"]["cell"], manifest["model"]["num_layers"], manifest["model"]["hidden_size"],
             config.host, port, engine.model.device)
    print(f"nextword: SERVING on port {port}. Try:\n"
          f"  python -m service.client --target localhost:{port} suggest \"In the beginning\"\n"
          f"  grpcurl -plaintext -d '{{\"text\": \"In the beginning\"}}' localhost:{port} nextword.v1.NextWord/Suggest",
          flush=True)
    server.wait()
    log.info("stopped")
