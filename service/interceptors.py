"""What every RPC goes through before and after its handler (one interceptor, in this order):

1. a request id: the client's ``x-request-id`` metadata when it is sane, else a new one;
   it comes back in the trailing metadata and is in every log line about the call;
2. authentication: ``authorization: Bearer <token>`` against the configured tokens
   (UNAUTHENTICATED otherwise); the health service may be left open;
3. the concurrency limit: more than ``max_concurrent_rpcs`` calls at once get
   RESOURCE_EXHAUSTED naming the limit (health checks are not counted);
4. the handler, with a last resort: an unexpected exception becomes INTERNAL with
   an error id, and the traceback goes to the log;
5. metrics (count by status code, latency) and one structured log line per call
   (``log_calls``: off, a trivial call is about a fifth cheaper; see README).

Typed text never reaches the log: a log line has the method, status, duration
and request id, nothing from the request body.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import threading
import time
from collections.abc import Sequence

import grpc

from service.metrics import Metrics

log = logging.getLogger("nextword")
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIX = "/grpc.reflection."
REQUEST_ID_KEY = "x-request-id"
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def _code(context) -> grpc.StatusCode:
    code = context.code() if hasattr(context, "code") else None
    return code if code is not None else grpc.StatusCode.OK


class CallGuard(grpc.ServerInterceptor):
    """The wrapper is built once per method and reused: the server's polling thread, which
    calls ``intercept_service`` for every call, only looks it up."""

    def __init__(self, metrics: Metrics, tokens: Sequence[str] = (), max_concurrent_rpcs: int = 0,
                 health_without_auth: bool = True, log_calls: bool = True) -> None:
        self.metrics = metrics
        self.log_calls = log_calls
        self.tokens = [t.encode() for t in tokens]
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self.health_without_auth = health_without_auth
        self._active = 0
        self._lock = threading.Lock()
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        self._finished: dict[tuple[str, grpc.StatusCode], object] = {}  # counter children, by method and code
        metrics.active_calls.set_function(lambda: self._active)

    @property
    def active(self) -> int:
        return self._active

    # ------------------------------------------------------------------ checks before the handler

    def _authorized(self, metadata: dict[str, str]) -> bool:
        value = metadata.get("authorization", "")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        given = token.strip().encode()
        # compare with every token, always, so timing says nothing about which one nearly matched
        return any([hmac.compare_digest(given, known) for known in self.tokens])

    def _admit(self) -> bool:
        with self._lock:
            if self.max_concurrent_rpcs and self._active >= self.max_concurrent_rpcs:
                return False
            self._active += 1
            return True

    def _leave(self) -> None:
        with self._lock:
            self._active -= 1

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        child = self._finished.get((method, code))
        if child is None:
            child = self._finished[(method, code)] = self.metrics.requests.labels(method, code.name)
        child.inc()

    # ------------------------------------------------------------------ the wrapper

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = continuation(handler_call_details)
            if handler is None:
                return None
            wrapped = self._wrapped[method] = self._wrap(method, handler)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        is_health = method.startswith(HEALTH_PREFIX)
        log_call = self.log_calls and not is_health
        needs_token = bool(self.tokens) and not (is_health and self.health_without_auth)
        counted = not is_health
        short = method.rsplit("/", 1)[-1]
        latency = self.metrics.latency.labels(short)
        guard = self

        def before(context) -> str:
            """Checks; returns the request id. Aborts the call when a check fails."""
            metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
            given = metadata.get(REQUEST_ID_KEY, "")
            request_id = given if _SANE_ID.fullmatch(given) else os.urandom(8).hex()
            context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
            if needs_token and not guard._authorized(metadata):
                context.abort(grpc.StatusCode.UNAUTHENTICATED,
                              "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'")
            if counted and not guard._admit():
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"too many calls at once: the limit is {guard.max_concurrent_rpcs} "
                              "(server setting max_concurrent_rpcs); retry with backoff")
            return request_id

        def fail(context, error: Exception, request_id: str):
            if _code(context) != grpc.StatusCode.OK or isinstance(error, grpc.RpcError):
                raise error
            log.exception("internal error", extra={"request_id": request_id, "method": short})
            context.abort(grpc.StatusCode.INTERNAL,
                          f"internal error (request id {request_id}); the server log has the details")

        def after(context, request_id: str, started: float, admitted: bool, cancelled: bool = False) -> None:
            if admitted:
                guard._leave()
            code = grpc.StatusCode.CANCELLED if cancelled and _code(context) == grpc.StatusCode.OK else _code(context)
            elapsed = time.perf_counter() - started
            guard._count(short, code)
            latency.observe(elapsed)
            if log_call:
                log.info("call", extra={"request_id": request_id, "method": short, "code": code.name,
                                        "ms": round(elapsed * 1000, 2)})

        def unary(inner):
            def run(request, context):
                started, admitted, request_id = time.perf_counter(), False, "-"
                try:
                    request_id = before(context)
                    admitted = counted
                    return inner(request, context)
                except Exception as error:  # noqa: BLE001 - last resort by design
                    fail(context, error, request_id)
                finally:
                    after(context, request_id, started, admitted)
            return run

        def streaming(inner):
            def run(request, context):
                started, admitted, request_id, finished = time.perf_counter(), False, "-", False
                try:
                    request_id = before(context)
                    admitted = counted
                    yield from inner(request, context)
                    finished = True
                except GeneratorExit:  # the client went away mid-stream
                    raise
                except Exception as error:  # noqa: BLE001 - last resort by design
                    finished = True
                    fail(context, error, request_id)
                finally:
                    after(context, request_id, started, admitted, cancelled=not finished and not context.is_active())
            return run

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), handler.request_deserializer,
                                                       handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), handler.request_deserializer,
                                                        handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream),
                                                         handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), handler.request_deserializer,
                                                        handler.response_serializer)
        return handler
