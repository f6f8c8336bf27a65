"""The call each request thread is serving, so that model work queued for a caller who is gone
(cancelled, or past its deadline) can be dropped before the model computes it.

The interceptor marks the thread's call when a handler starts and clears it when it ends; the
batching worker asks ``still_wanted()``'s check before each step it runs. Under overload this
keeps the model on work whose answer someone will receive.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

_local = threading.local()


class CallEnded(Exception):
    """The caller cancelled, or its deadline passed, before the model ran this step."""

    def __init__(self, deadline: bool) -> None:
        super().__init__("the deadline passed before the model ran" if deadline else "the call was cancelled")
        self.deadline = deadline


def begin(context, user: str | None = None) -> None:
    _local.context = context
    _local.user = user
    _local.model = ""
    _local.leaving = []


def end() -> str:
    """Ends the thread's call; returns the name of the model it used ("" for none)."""
    model = getattr(_local, "model", "")
    for leave in getattr(_local, "leaving", ()):  # the call no longer holds the model it used
        leave()
    _local.context = None
    _local.user = None
    _local.model = ""
    if hasattr(_local, "leaving"):
        del _local.leaving
    return model


def hold(enter: Callable[[], None], leave: Callable[[], None]) -> None:
    """The current call uses something until it ends (a model, which a reload retires only then)."""
    enter()
    if hasattr(_local, "leaving"):
        _local.leaving.append(leave)
    else:  # not inside a guarded call (a test calling the servicer): nothing will end it
        leave()


def set_model(name: str) -> None:
    """The model the current call asks (for its metrics)."""
    _local.model = name


def user() -> str | None:
    """The user the current thread's call names (x-nextword-user, checked by the interceptor), or None."""
    return getattr(_local, "user", None)


def _gone(context) -> CallEnded | None:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return CallEnded(deadline=True)
    if not context.is_active():
        return CallEnded(deadline=False)
    return None


def still_wanted() -> Callable[[], CallEnded | None] | None:
    """For the current thread's call: a check that returns why it ended, or None while it is on."""
    context = getattr(_local, "context", None)
    if context is None:
        return None
    return lambda: _gone(context)
