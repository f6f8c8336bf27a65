"""What an HTTP call needs to pass through the same guard as a gRPC call (service/api/interceptors.py):
a context with the surface of grpc.ServicerContext, the proto3 JSON mapping of the messages, and the
mapping of gRPC status codes to HTTP statuses (as google.rpc.Code documents it)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

# google.rpc.Code -> HTTP, as in googleapis' google/rpc/code.proto
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
# headers (lower case) that become call metadata, as gRPC metadata would carry them
METADATA_HEADERS = ("authorization", "x-nextword-user", "x-request-id")
TIMEOUT_HEADER = "x-timeout-ms"  # the call's deadline, as gRPC's timeout


class HttpAbort(Exception):
    """What HttpContext.abort raises, as grpc's context.abort does: the call ends with this status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class HttpContext:
    """The parts of grpc.ServicerContext that the guard and the servicer use, for one HTTP call."""

    protocol = "http"

    def __init__(self, metadata: Iterable[tuple[str, str]], timeout: float | None = None) -> None:
        self.metadata = tuple(metadata)
        self.deadline = time.monotonic() + timeout if timeout is not None else None
        self.trailing: tuple = ()
        self.status: grpc.StatusCode | None = None
        self.message = ""
        self.active = True  # the client is still there (set False when it goes)
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    @property
    def request_id(self) -> str:
        return dict(self.trailing).get("x-request-id", "")

    def invocation_metadata(self):
        return self.metadata

    def set_trailing_metadata(self, metadata) -> None:
        self.trailing = tuple(metadata)

    def abort(self, code: grpc.StatusCode, details: str):
        self.status, self.message = code, details
        raise HttpAbort(code, details)

    def code(self) -> grpc.StatusCode | None:
        return self.status

    def is_active(self) -> bool:
        return self.active and (self.deadline is None or time.monotonic() < self.deadline)

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            self._callbacks.append(callback)
        return True

    def end(self) -> None:
        """The call is over (answered, failed or abandoned): run the callbacks once."""
        self.active = False
        with self._lock:
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


def metadata_of(headers, query=None) -> list[tuple[str, str]]:
    """Call metadata from HTTP headers; ``query`` (a WebSocket's, whose browser API sets no headers) may give
    ``user`` and ``access_token`` instead."""
    metadata = [(name, headers[name]) for name in METADATA_HEADERS if name in headers]
    if query is not None:
        names = {name for name, _ in metadata}
        if "x-nextword-user" not in names and query.get("user"):
            metadata.append(("x-nextword-user", query["user"]))
        if "authorization" not in names and query.get("access_token"):
            metadata.append(("authorization", f"Bearer {query['access_token']}"))
    return metadata


def timeout_of(headers) -> float | None:
    """The call's timeout in seconds from the ``X-Timeout-Ms`` header; ValueError when it is not a number."""
    value = headers.get(TIMEOUT_HEADER)
    if value is None:
        return None
    milliseconds = float(value)
    if not milliseconds > 0:
        raise ValueError(f"{TIMEOUT_HEADER} must be a positive number of milliseconds")
    return milliseconds / 1000.0


class JsonReader:
    """A deserializer for the guard (service/api/parse.py): JSON text (or a parsed dict) -> a ``message_type``.
    Malformed JSON, a field the message lacks and a value of the wrong type each raise ValueError naming it."""

    def __init__(self, message_type: type[Message]) -> None:
        self.__self__ = message_type  # as on Message.FromString: the guard names the type in its errors

    def __call__(self, data: Any) -> Message:
        if isinstance(data, ValueError):  # what the front could not take as text (a binary WebSocket message)
            raise data
        try:
            value = json.loads(data) if isinstance(data, (bytes, str)) else data
        except ValueError as error:
            reason = getattr(error, "msg", str(error))
            raise ValueError(f"the body is not valid JSON ({reason})") from None
        if not isinstance(value, dict):
            raise ValueError(f"the body must be a JSON object, not {type(value).__name__}")
        try:
            return json_format.ParseDict(value, self.__self__())
        except json_format.ParseError as error:
            raise ValueError(str(error).split("\n")[0]) from None


def to_json(message: Message) -> dict:
    """The proto3 JSON mapping of ``message``: field names in lowerCamelCase, defaults left out."""
    return json_format.MessageToDict(message)


def error_body(code: grpc.StatusCode, message: str, request_id: str) -> dict:
    return {"code": code.name, "message": message, "request_id": request_id}
