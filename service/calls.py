"""A call as its handler thread sees it, so that model work queued for a caller who is gone
(cancelled, or past its deadline) can be dropped before the model computes it.

The gRPC server answers calls on an asyncio event loop (service/server.py) and runs nextword's
handlers, which block on the model, in threads. The interceptor gives each handler thread a
``CallContext``: the call's metadata, its deadline, its user, and whether the caller is still
there (the loop marks it ended when the caller cancels or the deadline passes). The batching worker
asks ``still_wanted()``'s check before each step it runs. Under overload this keeps the model on
work whose answer someone will receive.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc

_local = threading.local()


class CallEnded(Exception):
    """The caller cancelled, or its deadline passed, before the model ran this step."""

    def __init__(self, deadline: bool) -> None:
        super().__init__("the deadline passed before the model ran" if deadline else "the call was cancelled")
        self.deadline = deadline


class Abort(Exception):
    """``CallContext.abort``: the call ends with this status (the interceptor sends it)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class CallContext:
    """The part of a gRPC servicer context that nextword's handlers use, safe to read from any thread."""

    __slots__ = ("metadata", "deadline", "request_id", "user", "model", "ended")

    def __init__(
        self, metadata: tuple = (), time_remaining: float | None = None, request_id: str = "-", user: str | None = None
    ) -> None:
        self.metadata = metadata
        self.deadline = None if time_remaining is None else time.monotonic() + time_remaining
        self.request_id = request_id
        self.user = user
        self.model = ""  # the model the call asks (for its metrics)
        self.ended = False  # the caller is gone: set by the server's event loop

    def invocation_metadata(self) -> tuple:
        return self.metadata

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def is_active(self) -> bool:
        return not self.ended

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Abort(code, details)

    def gone(self) -> CallEnded | None:
        """Why the call ended, or None while it is on."""
        if self.expired():
            return CallEnded(deadline=True)
        if self.ended:
            return CallEnded(deadline=False)
        return None


def begin(call: CallContext) -> None:
    """This thread now serves ``call``."""
    _local.call = call


def end() -> None:
    _local.call = None


def current() -> CallContext | None:
    return getattr(_local, "call", None)


def set_model(name: str) -> None:
    """The model the current call asks (for its metrics)."""
    call = current()
    if call is not None:
        call.model = name


def user() -> str | None:
    """The user the current thread's call names (x-nextword-user, checked by the interceptor), or None."""
    call = current()
    return call.user if call is not None else None


def still_wanted() -> Callable[[], CallEnded | None] | None:
    """For the current thread's call: a check that returns why it ended, or None while it is on."""
    call = current()
    return call.gone if call is not None else None
