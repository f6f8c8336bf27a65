"""What every RPC goes through before and after its handler (one interceptor, in this order):

0. the request is decoded here, not by gRPC (service/api/parse.py): malformed bytes are
   INVALID_ARGUMENT, counted and logged like any other call;
1. a request id: the client's ``x-request-id`` metadata when it is sane, else a new one (this
   process's random prefix and a counter: unique without a system call per call);
   it comes back in the trailing metadata and is in every log line about the call;
2. authentication: ``authorization: Bearer <token>`` against the configured tokens
   (UNAUTHENTICATED otherwise); the health service may be left open; then the user the call
   names (``x-nextword-user``, service/api/users.py): INVALID_ARGUMENT when malformed,
   PERMISSION_DENIED when the token may not name it;
3. the concurrency limit: more than ``max_concurrent_rpcs`` calls at once get
   RESOURCE_EXHAUSTED naming the limit (health checks are not counted);
4. the handler, with a last resort: an unexpected exception becomes INTERNAL with
   an error id, and the traceback goes to the log;
5. metrics (count by status code, latency) and one structured log line per call
   (``log_calls``; the per-call log line's cost is in docs/performance.md).

Typed text never reaches the log: a log line has the method, status, duration
and request id, nothing from the request body.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from service.api.metrics import Metrics
from service.api.parse import MalformedRequest, RequestDecoder
from service.api.users import USER_KEY, BadUser, Grant, granted, user_of
from service.model import current_call
from service.model.current_call import CallEnded
from service.model.hardware import device_failure, out_of_memory

log = logging.getLogger("nextword")
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REQUEST_ID_KEY = "x-request-id"
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_ID_PREFIX = os.urandom(5).hex()  # per process: the workers of one server never share an id
_ids = itertools.count(1)  # next() on a count is atomic under the interpreter lock


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ids):06x}"


def _code(context) -> grpc.StatusCode:
    code = context.code() if hasattr(context, "code") else None
    return code if code is not None else grpc.StatusCode.OK


class CallGuard(grpc.ServerInterceptor):
    """The checks shared by every method; ``MethodGuard`` applies them to one method. A method's guard
    and wrapper are built once and reused: the server's polling thread, which calls
    ``intercept_service`` for every call, only looks them up."""

    def __init__(
        self,
        metrics: Metrics,
        tokens: Sequence[Grant | str] = (),
        max_concurrent_rpcs: int = 0,
        health_without_auth: bool = True,
        log_calls: bool = True,
        max_watch_streams: int = 1024,
    ) -> None:
        self.metrics = metrics
        self.log_calls = log_calls
        self.grants = [t if isinstance(t, Grant) else Grant(t) for t in tokens]
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self.health_without_auth = health_without_auth
        self.max_watch_streams = max_watch_streams
        self.watch_streams = 0  # open health Watch streams (they hold no thread)
        self._active = 0
        self._lock = threading.Lock()
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        metrics.gauge_function(metrics.active_calls, lambda: self._active)
        self.on_device_failure: Callable[[], None] | None = None  # the server stops (service/api/server.py)
        self._device_failed = False

    @property
    def active(self) -> int:
        return self._active

    def authorized(self, metadata: dict[str, str]) -> Grant | None:
        """The grant of the call's bearer token, or None when it has no valid one."""
        return granted(self.grants, metadata.get("authorization", ""))

    def admit(self) -> bool:
        with self._lock:
            if self.max_concurrent_rpcs and self._active >= self.max_concurrent_rpcs:
                return False
            self._active += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._active -= 1

    def device_failed(self, failure: str, error: Exception, request_id: str, method: str) -> None:
        """A call's model step failed on the GPU: the first such call logs its traceback and stops the server
        (``on_device_failure``); the calls that fail with it log one line each."""
        with self._lock:
            first, self._device_failed = not self._device_failed, True
        extra = {"request_id": request_id, "method": method}
        if not first:
            log.error("the model's device failed: %s", failure, extra=extra)
            return
        log.error(
            "the model's device failed: %s; NOT_SERVING, and this process stops", failure, exc_info=error, extra=extra
        )
        if self.on_device_failure is not None:
            self.on_device_failure()

    def wrap_method(self, method: str, handler: grpc.RpcMethodHandler, protocol: str) -> grpc.RpcMethodHandler:
        """``handler`` guarded as a gRPC call of ``method`` is, for another front (the HTTP/JSON one): the same
        checks, counted and logged under ``protocol``."""
        return MethodGuard(self, method, protocol).wrap(handler)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = continuation(handler_call_details)
            if handler is None:
                return None
            wrapped = self._wrapped[method] = MethodGuard(self, method).wrap(handler)
        return wrapped


class MethodGuard:
    """The guard of one method: ``before`` a call, ``fail`` when its handler raises, ``after`` it."""

    def __init__(self, guard: CallGuard, method: str, protocol: str = "grpc") -> None:
        is_health = method.startswith(HEALTH_PREFIX)
        self.guard = guard
        self.name = method.rsplit("/", 1)[-1]
        self.protocol = protocol
        self.log_call = guard.log_calls and not is_health
        self.needs_token = bool(guard.grants) and not (is_health and guard.health_without_auth)
        self.counted = not is_health  # health checks are outside the concurrency limit
        self.latency = guard.metrics.latency.labels(self.name, protocol)
        self._finished: dict[tuple[grpc.StatusCode, str], Any] = {}  # counter children, by status code and model

    def before(self, context) -> str:
        """Checks; returns the request id. Aborts the call when a check fails."""
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        given = metadata.get(REQUEST_ID_KEY, "")
        request_id = given if _SANE_ID.fullmatch(given) else new_request_id()
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        grant = self.guard.authorized(metadata) if self.needs_token else None
        if self.needs_token and grant is None:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'",
            )
        try:
            user = user_of(metadata) if self.counted else None  # the health service serves no user
        except BadUser as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        if user is not None and self.guard.grants and not (grant is not None and grant.allows(user)):
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this bearer token may not name that user in {USER_KEY}: bind it to the user in the token file",
            )
        if self.counted and not self.guard.admit():
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many calls at once: the limit is {self.guard.max_concurrent_rpcs} "
                "(server setting max_concurrent_rpcs); retry with backoff",
            )
        current_call.begin(context, user)
        return request_id

    def fail(self, context, error: Exception, request_id: str) -> None:
        """A status the handler set (abort) passes through; malformed bytes are INVALID_ARGUMENT; work dropped
        for a caller who is gone ends as that caller's status; anything else is INTERNAL, its traceback logged."""
        if _code(context) != grpc.StatusCode.OK or isinstance(error, grpc.RpcError):
            raise error
        if isinstance(error, MalformedRequest):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        if isinstance(error, CallEnded):
            context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED if error.deadline else grpc.StatusCode.CANCELLED, str(error)
            )
        if out_of_memory(error):  # the batch that hit it fails; the worker and every other call go on
            log.error("the model's device ran out of memory for one batch", extra={"request_id": request_id})
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the model's device ran out of memory for this call's batch (request id {request_id}): retry",
            )
        failure = device_failure(error)
        if failure is not None:
            self.guard.device_failed(failure, error, request_id, self.name)
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the model's device failed (request id {request_id}); this server process restarts: retry",
            )
        log.exception("internal error", extra={"request_id": request_id, "method": self.name})
        context.abort(
            grpc.StatusCode.INTERNAL, f"internal error (request id {request_id}); the server log has the details"
        )

    def after(self, context, request_id: str, started: float, admitted: bool, cancelled: bool = False) -> None:
        model = current_call.end()
        if admitted:
            self.guard.leave()
        code = _code(context)
        if cancelled and code == grpc.StatusCode.OK:
            code = grpc.StatusCode.CANCELLED
        elapsed = time.perf_counter() - started
        self._record(code, model)
        self.latency.observe(elapsed)
        if self.log_call:
            log.info(
                "call",
                extra={
                    "request_id": request_id,
                    "method": self.name,
                    "protocol": self.protocol,
                    "code": code.name,
                    "ms": round(elapsed * 1000, 2),
                },
            )

    def _record(self, code: grpc.StatusCode, model: str) -> None:
        child = self._finished.get((code, model))
        if child is None:
            labels = (self.name, code.name, model, self.protocol)
            child = self._finished[(code, model)] = self.guard.metrics.requests.labels(*labels)
        child.inc()

    # ------------------------------------------------------------------ the wrappers

    def non_blocking(self, inner, decode):
        """A handler that answers through ``send_response_callback`` and returns at once (grpc_health's Watch):
        its stream holds no thread while it waits, so idle watchers never starve the server. Streams beyond
        ``max_watch_streams`` are refused with RESOURCE_EXHAUSTED."""
        guard = self.guard

        def run(request, context, send_response_callback=None):
            started, request_id = time.perf_counter(), "-"
            try:
                request_id = self.before(context)
                with guard._lock:
                    full = guard.watch_streams >= guard.max_watch_streams
                    if not full:
                        guard.watch_streams += 1
                if full:
                    context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"too many health Watch streams: the limit is {guard.max_watch_streams} "
                        "(server setting max_watch_streams)",
                    )

                def closed() -> None:
                    with guard._lock:
                        guard.watch_streams -= 1
                    self._record(_code(context), "")
                    self.latency.observe(time.perf_counter() - started)

                context.add_callback(closed)
                return inner(decode(request), context, send_response_callback=send_response_callback)
            except Exception as error:  # noqa: BLE001 - the last resort: any error becomes a status
                self.fail(context, error, request_id)
            finally:
                current_call.end()

        run.experimental_non_blocking = True  # grpc's flag for such handlers
        return run

    def unary(self, inner, decode):
        """Any handler that returns one response (unary-unary, stream-unary); ``decode`` turns the raw request
        (bytes, or an iterator of bytes) into messages."""

        def run(request, context):
            started, admitted, request_id = time.perf_counter(), False, "-"
            try:
                request_id = self.before(context)
                admitted = self.counted
                return inner(decode(request), context)
            except Exception as error:  # noqa: BLE001 - the last resort: any error becomes a status
                self.fail(context, error, request_id)
            finally:
                self.after(context, request_id, started, admitted)

        return run

    def streaming(self, inner, decode):
        """Any handler that yields responses (unary-stream, stream-stream)."""

        def run(request, context):
            started, admitted, request_id, finished = time.perf_counter(), False, "-", False
            try:
                request_id = self.before(context)
                admitted = self.counted
                yield from inner(decode(request), context)
                finished = True
            except GeneratorExit:  # the client went away mid-stream
                raise
            except Exception as error:  # noqa: BLE001 - the last resort: any error becomes a status
                finished = True
                self.fail(context, error, request_id)
            finally:
                self.after(context, request_id, started, admitted, cancelled=not finished and not context.is_active())

        return run

    def wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The same handler with the guard around it; gRPC hands it raw bytes, which the guard decodes."""
        encode = handler.response_serializer
        decoder = RequestDecoder(handler.request_deserializer) if handler.request_deserializer else None
        one = decoder.one if decoder else _unchanged
        many = decoder.stream if decoder else _unchanged
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self.unary(handler.unary_unary, one), None, encode)
        if handler.unary_stream and getattr(handler.unary_stream, "experimental_non_blocking", False):
            return grpc.unary_stream_rpc_method_handler(self.non_blocking(handler.unary_stream, one), None, encode)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self.streaming(handler.unary_stream, one), None, encode)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(self.streaming(handler.stream_stream, many), None, encode)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(self.unary(handler.stream_unary, many), None, encode)
        return handler


def _unchanged(request):
    return request
