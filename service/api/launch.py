"""``nextword-serve``: one server process, or with ``--workers`` above 1 a supervisor of worker processes
(service/api/workers.py), each a whole server (service/api/server.py) on the shared port."""

from __future__ import annotations

import logging
import signal
from dataclasses import replace

from service.api.admin import AdminPort
from service.api.config import ServerConfig
from service.api.reload import ModelWatcher, control, fix_allocator, on_hangup, reload
from service.api.server import (
    _announce,
    _started,
    _stop_on_signals,
    check_exposure,
    load_tokens,
    server_credentials,
)
from service.api.workers import Supervisor
from service.model.hardware import DEVICE_FAILED_EXIT, default_workers, resolve_device

log = logging.getLogger("nextword")


def serve(config: ServerConfig) -> None:
    """``nextword-serve``: one process, or with ``--workers`` above 1 a parent of worker processes."""
    config = replace(config, workers=config.workers or default_workers(resolve_device(config.device)))
    fix_allocator()  # before any model loads (each worker process does the same)
    if config.workers > 1:
        _serve_workers(config)
        return
    admin = AdminPort.checked(config, load_tokens(config))  # a bad admin setup fails before the models load
    server = _started(config)
    _stop_on_signals(server.stop, config.grace)
    on_hangup(server)
    if config.watch_models:
        ModelWatcher([path for _, path in config.models], lambda: reload(server)).start()
    if admin is not None:
        admin.start(lambda op, args: control(server, op, args), config.host, config.admin_port or 0)
    what = "; ".join(
        f"{name}: {engine.path} ({engine.artifact.manifest.describe()}"
        + (", pinyin" if engine.converter is not None else "")
        + f"), device {engine.model.device}"
        for name, engine in server.engines.items()
    )
    _announce(config, server.port, what, server.auth, server.metrics_port, server.http_port)
    server.wait()
    if admin is not None:
        admin.stop()
    if server.device_failed:
        log.error(
            "stopped: the model's device failed (exit status %d, for a process manager to restart)", DEVICE_FAILED_EXIT
        )
        raise SystemExit(DEVICE_FAILED_EXIT)
    log.info("stopped")


def _serve_workers(config: ServerConfig) -> None:
    tokens = load_tokens(config)  # bad flags fail here, once, before any worker starts
    check_exposure(config, tokens)
    server_credentials(config)
    admin = AdminPort.checked(config, tokens)
    supervisor = Supervisor(config)
    _stop_on_signals(supervisor.stop, config.grace)
    signal.signal(signal.SIGHUP, lambda signum, frame: supervisor.reload_all())
    if not supervisor.start():
        return
    if config.watch_models:
        ModelWatcher([path for _, path in config.models], supervisor.reload_all).start()
    if admin is not None:
        admin.start(supervisor.control, config.host, config.admin_port or 0)
    what = f"{', '.join(f'{name}: {path}' for name, path in config.models)} in {config.workers} worker processes"
    _announce(config, supervisor.port, what, bool(tokens), supervisor.metrics_port, supervisor.http_port)
    supervisor.watch()
    supervisor.wait()
    if admin is not None:
        admin.stop()
    log.info("stopped")
