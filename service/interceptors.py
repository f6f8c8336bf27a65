"""What every RPC goes through before and after its handler (one interceptor, in this order):

0. the request is decoded here, not by gRPC (service/decoding.py): malformed bytes are
   INVALID_ARGUMENT, counted and logged like any other call;
1. a request id: the client's ``x-request-id`` metadata when it is sane, else a new one (this
   process's random prefix and a counter: unique without a system call per call);
   it comes back in the trailing metadata and is in every log line about the call;
2. authentication: ``authorization: Bearer <token>`` against the configured tokens
   (UNAUTHENTICATED otherwise); the health service may be left open; then the user the call
   names (``x-nextword-user``, service/users.py): INVALID_ARGUMENT when malformed,
   PERMISSION_DENIED when the token may not name it;
3. the concurrency limit: more than ``max_concurrent_rpcs`` calls at once get
   RESOURCE_EXHAUSTED naming the limit (health checks are not counted);
4. admission (``Admission``): at most ``running_calls`` unary calls run at once; the others wait
   on the event loop, without a thread, until a running one ends (calls without a deadline first,
   in arrival order; then those with the most time left), or until their deadline passes;
5. the handler, in a thread of the handler pool (nextword's handlers block on the model), with a
   ``CallContext`` (service/calls.py); a last resort: an unexpected exception becomes INTERNAL
   with an error id, and the traceback goes to the log;
6. metrics (count by status code, latency) and one structured log line per call
   (``log_calls``; the per-call log line's cost is in docs/performance.md).

Steps 0-4 and 6 run on the server's event loop: a call that waits, or that expires before its
turn, costs no thread. Typed text never reaches the log: a log line has the method, status,
duration and request id, nothing from the request body.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import hmac
import inspect
import itertools
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

import grpc

from service import calls
from service.calls import Abort, CallContext, CallEnded
from service.decoding import MalformedRequest, RequestDecoder
from service.metrics import Metrics
from service.users import USER_KEY, BadUser, Grant, user_of

log = logging.getLogger("nextword")
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REQUEST_ID_KEY = "x-request-id"
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_ID_PREFIX = os.urandom(5).hex()  # per process: the workers of one server never share an id
_ids = itertools.count(1)  # next() on a count is atomic under the interpreter lock
STREAM_AHEAD = 16  # responses a handler thread may produce ahead of what the client has taken
POLL = 0.25  # seconds between a blocked handler thread's checks that its call is still on
OK = grpc.StatusCode.OK


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ids):06x}"


def ended_code(call: CallContext | None) -> grpc.StatusCode:
    """The status of a call whose caller left: its deadline passed, or it cancelled."""
    return grpc.StatusCode.DEADLINE_EXCEEDED if call is not None and call.expired() else grpc.StatusCode.CANCELLED


class Admission:
    """At most ``limit`` unary calls of a process run at once (0: no limit); the others wait on the loop.

    When a running call ends, the next to run is the oldest waiting call without a deadline, else
    the waiting call with the most time left (under overload: the newest). Serving the most time left
    first keeps the answers that are computed inside their deadlines, where first come, first served
    would spend the model on calls that expire before their answer arrives. A call whose deadline
    passes while it waits is cancelled by gRPC and leaves the queue. Runs on the event loop only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0
        self._patient: deque[asyncio.Future] = deque()  # no deadline, in arrival order
        self._hurried: list[tuple[float, int, asyncio.Future]] = []  # heap by -deadline
        self._order = itertools.count()

    @property
    def waiting(self) -> int:
        return len(self._patient) + len(self._hurried)

    async def enter(self, deadline: float | None) -> None:
        if not self.limit or (self.running < self.limit and not self.waiting):
            self.running += 1
            return
        turn = asyncio.get_running_loop().create_future()
        if deadline is None:
            self._patient.append(turn)
        else:
            heapq.heappush(self._hurried, (-deadline, next(self._order), turn))
        try:
            await turn  # leave() hands this call a running place
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # handed a place as it left: pass it on
                self.leave()
            else:
                self._forget(turn)
            raise

    def _forget(self, turn: asyncio.Future) -> None:
        try:
            self._patient.remove(turn)
        except ValueError:
            self._hurried = [entry for entry in self._hurried if entry[2] is not turn]
            heapq.heapify(self._hurried)

    def leave(self) -> None:
        """A running call ended: its place goes to the next waiting call, if any."""
        while self._patient:
            turn = self._patient.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        while self._hurried:
            _, _, turn = heapq.heappop(self._hurried)
            if not turn.done():
                turn.set_result(None)
                return
        self.running -= 1


class _Outbox:
    """Responses from a handler thread to the event loop that sends them, at most STREAM_AHEAD ahead."""

    _END = object()

    def __init__(self, loop: asyncio.AbstractEventLoop, call: CallContext) -> None:
        self.loop = loop
        self.call = call
        self.queue: asyncio.Queue = asyncio.Queue()
        self.credits = threading.Semaphore(STREAM_AHEAD)

    def put(self, item) -> None:  # in the handler thread
        while not self.credits.acquire(timeout=POLL):
            if self.call.ended:
                raise CallEnded(deadline=self.call.expired())
        if self.call.ended:
            raise CallEnded(deadline=self.call.expired())
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def close(self) -> None:  # in the handler thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, self._END)
        except RuntimeError:  # the loop is closed: the server has stopped
            pass

    async def items(self):
        while True:
            item = await self.queue.get()
            if item is self._END:
                return
            self.credits.release()
            yield item


class _Inbox:
    """A client's request stream, read by a handler thread (its messages arrive on the event loop)."""

    _EOF = object()

    def __init__(self, requests, loop: asyncio.AbstractEventLoop, call: CallContext) -> None:
        self.requests = requests.__aiter__()
        self.loop = loop
        self.call = call

    async def _next(self):
        try:
            return await self.requests.__anext__()
        except StopAsyncIteration:
            return self._EOF

    def __iter__(self):
        return self

    def __next__(self):
        if self.call.ended:
            raise StopIteration
        pending = asyncio.run_coroutine_threadsafe(self._next(), self.loop)
        while True:
            try:
                item = pending.result(timeout=POLL)
                break
            except concurrent.futures.TimeoutError:
                if self.call.ended:
                    pending.cancel()
                    raise StopIteration from None
        if item is self._EOF:
            raise StopIteration
        return item


async def _decoded(requests, decode: Callable):
    async for data in requests:
        yield decode(data)


class CallGuard(grpc.aio.ServerInterceptor):
    """The checks shared by every method; ``MethodGuard`` applies them to one method. A method's guard
    and wrapper are built once and reused: ``intercept_service``, called for every call, looks them up."""

    def __init__(
        self,
        metrics: Metrics,
        tokens: Sequence[Grant | str] = (),
        max_concurrent_rpcs: int = 0,
        health_without_auth: bool = True,
        log_calls: bool = True,
        executor: Executor | None = None,
        running_calls: int = 0,
    ) -> None:
        """``executor``: the handler threads (None: the event loop's default executor);
        ``running_calls``: unary calls run at once (0: no limit), see ``Admission``."""
        self.metrics = metrics
        self.log_calls = log_calls
        self.grants = [t if isinstance(t, Grant) else Grant(t) for t in tokens]
        self.tokens = [g.token.encode() for g in self.grants]
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self.health_without_auth = health_without_auth
        self.executor = executor
        self.admission = Admission(running_calls)
        self._active = 0
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        metrics.gauge_function(metrics.active_calls, lambda: self._active)
        metrics.gauge_function(metrics.waiting_calls, lambda: self.admission.waiting)

    @property
    def active(self) -> int:
        return self._active

    def authorized(self, metadata: dict[str, str]) -> Grant | None:
        """The grant of the call's bearer token, or None when it has no valid one."""
        value = metadata.get("authorization", "")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        given = token.strip().encode()
        # compare with every token, always, so timing says nothing about which one nearly matched
        matches = [hmac.compare_digest(given, known) for known in self.tokens]
        return next((grant for grant, match in zip(self.grants, matches) if match), None)

    def admit(self) -> bool:  # on the event loop, like leave(): no lock needed
        if self.max_concurrent_rpcs and self._active >= self.max_concurrent_rpcs:
            return False
        self._active += 1
        return True

    def leave(self) -> None:
        self._active -= 1

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                return None
            wrapped = self._wrapped[method] = MethodGuard(self, method).wrap(handler)
        return wrapped


class MethodGuard:
    """The guard of one method: ``before`` a call, ``failure`` when its handler raises, ``after`` it."""

    def __init__(self, guard: CallGuard, method: str) -> None:
        is_health = method.startswith(HEALTH_PREFIX)
        self.guard = guard
        self.name = method.rsplit("/", 1)[-1]
        self.log_call = guard.log_calls and not is_health
        self.needs_token = bool(guard.tokens) and not (is_health and guard.health_without_auth)
        self.counted = not is_health  # health checks are outside the concurrency limit
        self.latency = guard.metrics.latency.labels(self.name)
        self._finished: dict[tuple[grpc.StatusCode, str], object] = {}  # counter children, by status code and model

    def before(self, context) -> CallContext:
        """Checks, on the event loop; returns the call as its handler thread will see it. Raises Abort
        when a check fails (then the call was not admitted)."""
        metadata = tuple(context.invocation_metadata() or ())
        values = {k: v for k, v in metadata if isinstance(v, str)}
        given = values.get(REQUEST_ID_KEY, "")
        request_id = given if _SANE_ID.fullmatch(given) else new_request_id()
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        call = CallContext(metadata, context.time_remaining(), request_id)
        grant = self.guard.authorized(values) if self.needs_token else None
        if self.needs_token and grant is None:
            raise Abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'",
            )
        try:
            call.user = user_of(values) if self.counted else None  # the health service serves no user
        except BadUser as error:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        if call.user is not None and self.guard.tokens and not (grant is not None and grant.allows(call.user)):
            raise Abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this bearer token may not name that user in {USER_KEY}: bind it to the user in the token file",
            )
        if self.counted and not self.guard.admit():
            raise Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many calls at once: the limit is {self.guard.max_concurrent_rpcs} "
                "(server setting max_concurrent_rpcs); retry with backoff",
            )
        return call

    def failure(self, error: Exception, call: CallContext) -> Abort:
        """The status for what a handler raised: its abort; INVALID_ARGUMENT for malformed bytes; the
        caller's own status when it is gone (its work was dropped); else INTERNAL, the traceback logged."""
        if isinstance(error, Abort):
            return error
        if isinstance(error, MalformedRequest):
            return Abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        if isinstance(error, CallEnded):
            return Abort(grpc.StatusCode.DEADLINE_EXCEEDED if error.deadline else grpc.StatusCode.CANCELLED, str(error))
        if call.ended:  # the stream broke under a handler whose caller has left
            return Abort(ended_code(call), "the call ended")
        log.error("internal error", exc_info=error, extra={"request_id": call.request_id, "method": self.name})
        return Abort(
            grpc.StatusCode.INTERNAL, f"internal error (request id {call.request_id}); the server log has the details"
        )

    def after(self, call: CallContext | None, code: grpc.StatusCode, started: float) -> None:
        model = call.model if call is not None else ""
        elapsed = time.perf_counter() - started
        child = self._finished.get((code, model))
        if child is None:
            child = self._finished[(code, model)] = self.guard.metrics.requests.labels(self.name, code.name, model)
        child.inc()
        self.latency.observe(elapsed)
        if self.log_call:
            log.info(
                "call",
                extra={
                    "request_id": call.request_id if call is not None else "-",
                    "method": self.name,
                    "code": code.name,
                    "ms": round(elapsed * 1000, 2),
                },
            )

    # ------------------------------------------------------------------ handlers in threads

    def _in_thread(self, work: Callable, call: CallContext, gated: bool) -> asyncio.Future:
        """``work()`` in a handler thread serving ``call``; the call's admitted place (and its running
        place, when ``gated``) is given back when the thread finishes, even if the caller left first."""
        guard = self.guard

        def run():
            calls.begin(call)
            try:
                return work()
            except Exception as error:  # noqa: BLE001 - the last resort: any error becomes a status
                raise self.failure(error, call) from None
            finally:
                calls.end()

        future = asyncio.get_running_loop().run_in_executor(guard.executor, run)

        def finished(done: asyncio.Future) -> None:
            if not done.cancelled():
                done.exception()  # retrieved here: a caller who left does not await it
            if gated:
                guard.admission.leave()
            if self.counted:
                guard.leave()

        future.add_done_callback(finished)
        return future

    def unary(self, inner, decode, stream_in: bool):
        """A handler that returns one response (unary-unary, stream-unary)."""
        gated = self.counted and not stream_in

        async def run(request, context):
            started, call, code = time.perf_counter(), None, OK
            try:
                call = self.before(context)
                if gated:
                    try:
                        await self.guard.admission.enter(call.deadline)
                    except asyncio.CancelledError:
                        self.guard.leave()  # admitted, never ran
                        raise
                loop = asyncio.get_running_loop()
                requests = _Inbox(_decoded(request, decode), loop, call) if stream_in else request
                work = (lambda: inner(requests, call)) if stream_in else (lambda: inner(decode(requests), call))
                future = self._in_thread(work, call, gated)
                return await asyncio.shield(future)
            except Abort as abort:
                code = abort.code
                await context.abort(abort.code, abort.details)
            except asyncio.CancelledError:
                if call is not None:
                    call.ended = True
                code = ended_code(call)
                raise
            finally:
                self.after(call, code, started)

        return run

    def streaming(self, inner, decode, stream_in: bool):
        """A handler that yields responses (unary-stream, stream-stream)."""

        async def run(request, context):
            started, call, code = time.perf_counter(), None, OK
            try:
                call = self.before(context)
                loop = asyncio.get_running_loop()
                outbox = _Outbox(loop, call)
                requests = _Inbox(_decoded(request, decode), loop, call) if stream_in else None

                def work():
                    try:
                        responses = inner(requests, call) if stream_in else inner(decode(request), call)
                        try:
                            for response in responses:
                                outbox.put(response)
                        finally:
                            responses.close()  # its cleanup runs now, also when the caller has left
                    finally:
                        outbox.close()

                future = self._in_thread(work, call, gated=False)
                async for response in outbox.items():
                    yield response
                await asyncio.shield(future)
            except Abort as abort:
                code = abort.code
                await context.abort(abort.code, abort.details)
            except (asyncio.CancelledError, GeneratorExit):
                if call is not None:
                    call.ended = True
                code = ended_code(call)
                raise
            finally:
                self.after(call, code, started)

        return run

    # ------------------------------------------------------------------ handlers on the loop

    def on_loop(self, inner, decode, stream_in: bool):
        """A handler written for the event loop (the health and reflection services): checked, then called."""

        def checked(request, context):
            call = self.before(context)
            if self.counted:
                self.guard.leave()  # a loop handler holds no thread: counted for admission only
            return call, (_decoded(request, decode) if stream_in else decode(request))

        if inspect.isasyncgenfunction(inner):

            async def run(request, context):
                started, call, code = time.perf_counter(), None, OK
                try:
                    call, request = checked(request, context)
                    async for response in inner(request, context):
                        yield response
                except (Abort, MalformedRequest) as error:
                    code, details = _status(error)
                    await context.abort(code, details)
                except BaseException:
                    code = context.code() or grpc.StatusCode.CANCELLED
                    raise
                finally:
                    self.after(call, code, started)

            return run

        async def run(request, context):
            started, call, code = time.perf_counter(), None, OK
            try:
                call, request = checked(request, context)
                return await inner(request, context)
            except (Abort, MalformedRequest) as error:
                code, details = _status(error)
                await context.abort(code, details)
            except BaseException:
                code = context.code() or grpc.StatusCode.CANCELLED
                raise
            finally:
                self.after(call, code, started)

        return run

    def wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The same handler with the guard around it; gRPC hands it raw bytes, which the guard decodes."""
        encode = handler.response_serializer
        decoder = RequestDecoder(handler.request_deserializer) if handler.request_deserializer else None
        decode = decoder.one if decoder else _unchanged
        for kind, stream_in, stream_out in (
            ("unary_unary", False, False),
            ("unary_stream", False, True),
            ("stream_stream", True, True),
            ("stream_unary", True, False),
        ):
            inner = getattr(handler, kind)
            if inner is None:
                continue
            if inspect.iscoroutinefunction(inner) or inspect.isasyncgenfunction(inner):
                run = self.on_loop(inner, decode, stream_in)
            elif stream_out:
                run = self.streaming(inner, decode, stream_in)
            else:
                run = self.unary(inner, decode, stream_in)
            return getattr(grpc, f"{kind}_rpc_method_handler")(run, None, encode)
        return handler


def _status(error: Abort | MalformedRequest) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, Abort):
        return error.code, error.details
    return grpc.StatusCode.INVALID_ARGUMENT, str(error)


def _unchanged(request):
    return request
