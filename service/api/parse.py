"""Decoding request messages, once, for every method (the interceptor calls it).

gRPC would decode each request before any nextword code runs and answer a malformed one with
INTERNAL and a traceback in the log. The interceptor takes the raw bytes instead and decodes them
here, so a client's bad bytes are the client's error: INVALID_ARGUMENT naming the message type and
what was wrong, never the payload; counted and logged like any other call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from google.protobuf.message import DecodeError


class MalformedRequest(ValueError):
    """Bytes that are not a valid request message; the text says which type and why."""


class RequestDecoder:
    def __init__(self, deserializer: Callable[[bytes], Any]) -> None:
        self.deserializer = deserializer
        owner = getattr(deserializer, "__self__", None)  # Message.FromString is bound to its class
        descriptor = getattr(owner, "DESCRIPTOR", None)
        self.type_name = descriptor.full_name if descriptor is not None else "request message"

    def one(self, data: bytes) -> Any:
        try:
            return self.deserializer(data)
        except (DecodeError, ValueError, TypeError) as error:
            text = str(error)
            reason = text.rsplit("': ", 1)[-1] if "': " in text else text or type(error).__name__
            raise MalformedRequest(f"request is not a valid {self.type_name}: {reason}") from None

    def stream(self, messages: Iterator[bytes]) -> Iterator[Any]:
        for data in messages:
            yield self.one(data)
