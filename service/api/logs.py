"""Structured logs: one JSON object per line (or plain text), with the request id when there is one.

A logged exception shows its type and where it was raised, frame by frame, but never its message:
an exception's text may carry what a user typed (a request's text in a library's error), and
typed text never reaches a log line.

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
import traceback

FIELDS = ("worker", "request_id", "method", "protocol", "code", "ms", "port", "http_port", "model", "device")


def private_traceback(exc_info) -> str:
    """The traceback of ``exc_info`` (and what it was raised from) without any exception's message."""
    kind, error, _ = exc_info
    parts = []
    while error is not None:
        frames = traceback.format_list(traceback.extract_tb(error.__traceback__))
        parts.append("".join(frames) + f"{type(error).__module__}.{type(error).__qualname__} (message withheld)")
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return "\nwhich was raised while handling:\n".join(parts) if parts else str(kind)


class JsonFormatter(logging.Formatter):
    def formatException(self, ei) -> str:
        return private_traceback(ei)

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

    def formatException(self, ei) -> str:
        return private_traceback(ei)

    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{name}={getattr(record, name)}" for name in FIELDS if hasattr(record, name))
        record.exc_text = None  # another handler's formatter may have cached the exception with its message
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
