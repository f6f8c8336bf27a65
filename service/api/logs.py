"""Structured logs: one JSON object per line (or plain text), with the request id when there is one.

A request thread formats its line and puts it on a queue; one listener thread writes
the lines. So a call never waits on the log's reader: a slow or stalled stderr pipe
(a container's log driver) holds up the listener, not the requests.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import time

FIELDS = ("worker", "request_id", "method", "code", "ms", "port", "model", "device")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{name}={getattr(record, name)}" for name in FIELDS if hasattr(record, name))
        line = super().format(record)
        return f"{line} {extra}" if extra else line


_listener: logging.handlers.QueueListener | None = None


class _Worker(logging.Filter):
    """Puts the worker process's index on every line it logs (--workers)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


def configure_logging(log_format: str = "json", level: int = logging.INFO, worker: int | None = None) -> None:
    """``worker``: this process is that worker of several (--workers); its lines say so."""
    global _listener
    stop_logging()
    lines: queue.SimpleQueue = queue.SimpleQueue()
    enqueue = logging.handlers.QueueHandler(lines)
    enqueue.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())  # formatted by the caller
    if worker is not None:
        enqueue.addFilter(_Worker(worker))
    write = logging.StreamHandler()
    write.setFormatter(logging.Formatter("%(message)s"))  # the line as the caller formatted it
    _listener = logging.handlers.QueueListener(lines, write)
    _listener.start()
    root = logging.getLogger()
    root.handlers[:] = [enqueue]
    root.setLevel(level)


@atexit.register
def stop_logging() -> None:
    """Write the lines still queued and stop the writer thread."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None
