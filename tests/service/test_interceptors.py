"""The interceptor on a fake context: request ids, tokens, the concurrency limit, admission, error
mapping, metrics. Its wrappers run on an event loop, as gRPC's asyncio server runs them, and the
handlers in threads."""

import asyncio
import logging
import threading
from types import SimpleNamespace

import grpc
import pytest

from service.interceptors import REQUEST_ID_KEY, Admission, CallGuard
from service.metrics import Metrics
from tests.service.fakes import Aborted
from tests.service.fakes import AioFakeContext as FakeContext

TOKEN = "a-token-of-enough-length"


def intercept(guard: CallGuard, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    async def continuation(_):
        return handler

    return asyncio.run(guard.intercept_service(continuation, SimpleNamespace(method=method)))


def guarded(handler, method="/nextword.v1.NextWord/Suggest", **options):
    """(the wrapped unary handler as a blocking function, the guard) for ``handler(request, context)``."""
    guard = CallGuard(Metrics(), **options)
    wrapped = intercept(guard, grpc.unary_unary_rpc_method_handler(handler), method).unary_unary
    return (lambda request, context: asyncio.run(wrapped(request, context))), guard


def count(guard: CallGuard, code: str, method: str = "Suggest") -> float:
    value = guard.metrics.registry.get_sample_value(
        "nextword_requests_total", {"method": method, "code": code, "model": ""}
    )
    return value or 0.0


def test_a_sane_request_id_is_kept_and_an_insane_one_replaced():
    call, _ = guarded(lambda request, context: "ok")
    context = FakeContext([(REQUEST_ID_KEY, "client-42")])
    assert call(None, context) == "ok" and context.trailing == ((REQUEST_ID_KEY, "client-42"),)
    context = FakeContext([(REQUEST_ID_KEY, "no spaces allowed")])
    call(None, context)
    made = context.trailing[0][1]
    assert len(made) == 16 and int(made, 16) >= 0


def test_the_handler_runs_in_a_thread_with_the_calls_deadline_and_metadata():
    seen = {}

    def handler(request, context):
        seen["thread"] = threading.current_thread()
        seen["remaining"] = context.time_remaining()
        seen["metadata"] = context.invocation_metadata()
        return "ok"

    call, _ = guarded(handler)
    assert call(None, FakeContext([("x-client", "k")], time_remaining=5.0)) == "ok"
    assert seen["thread"] is not threading.main_thread()
    assert 4.0 < seen["remaining"] <= 5.0 and ("x-client", "k") in seen["metadata"]


def test_tokens_are_required_except_for_health():
    call, guard = guarded(lambda request, context: "ok", tokens=[TOKEN])
    context = FakeContext([("authorization", "Bearer wrong-token-0123456789")])
    with pytest.raises(Aborted):
        call(None, context)
    assert context.status == grpc.StatusCode.UNAUTHENTICATED and count(guard, "UNAUTHENTICATED") == 1
    assert call(None, FakeContext([("authorization", f"Bearer {TOKEN}")])) == "ok"

    async def check(request, context):  # the health service runs on the loop
        return "serving"

    health, _ = guarded(check, method="/grpc.health.v1.Health/Check", tokens=[TOKEN])
    assert health(None, FakeContext()) == "serving"


def test_calls_beyond_the_limit_are_refused_while_one_runs():
    started, release = threading.Event(), threading.Event()

    def handler(request, context):
        started.set()
        release.wait(5)
        return "done"

    guard = CallGuard(Metrics(), max_concurrent_rpcs=1)
    call = intercept(guard, grpc.unary_unary_rpc_method_handler(handler), "/nextword.v1.NextWord/Suggest").unary_unary

    async def scenario():
        outer = asyncio.create_task(call("outer", FakeContext()))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
        inner = FakeContext()
        with pytest.raises(Aborted):
            await call("inner", inner)
        release.set()
        return await outer, inner

    answer, inner = asyncio.run(scenario())
    assert answer == "done" and inner.status == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the limit is 1" in inner.details
    assert guard.active == 0 and count(guard, "OK") == 1 and count(guard, "RESOURCE_EXHAUSTED") == 1


def test_admission_runs_calls_without_a_deadline_first_then_those_with_the_most_time_left():
    async def scenario():
        admission = Admission(1)
        await admission.enter(None)  # runs at once: the one running place
        order = []

        async def wait(name, deadline):
            await admission.enter(deadline)
            order.append(name)

        tasks = [
            asyncio.create_task(wait(name, deadline))
            for name, deadline in [("soon", 10.0), ("later", 20.0), ("patient", None), ("gone", 30.0)]
        ]
        await asyncio.sleep(0)
        assert admission.waiting == 4 and order == []
        tasks[3].cancel()  # its caller left (its deadline passed, or it cancelled): it leaves the queue
        await asyncio.sleep(0)
        assert admission.waiting == 3
        for _ in range(3):
            admission.leave()  # a running call ends: its place goes to the next
            await asyncio.sleep(0)
        assert order == ["patient", "later", "soon"] and admission.running == 1
        admission.leave()
        assert admission.running == 0 and admission.waiting == 0

    asyncio.run(scenario())


def test_a_call_that_leaves_while_waiting_for_its_turn_never_runs():
    started, release, ran = threading.Event(), threading.Event(), []

    def handler(request, context):
        ran.append(request)
        started.set()
        release.wait(5)
        return "done"

    guard = CallGuard(Metrics(), running_calls=1)
    call = intercept(guard, grpc.unary_unary_rpc_method_handler(handler), "/nextword.v1.NextWord/Suggest").unary_unary

    async def scenario():
        first = asyncio.create_task(call("first", FakeContext()))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
        second = asyncio.create_task(call("second", FakeContext(time_remaining=0.05)))
        await asyncio.sleep(0.01)
        assert guard.admission.waiting == 1 and guard.active == 2
        second.cancel()  # as gRPC does when the deadline passes
        with pytest.raises(asyncio.CancelledError):
            await second
        release.set()
        return await first

    assert asyncio.run(scenario()) == "done" and ran == ["first"]
    assert guard.active == 0 and guard.admission.running == 0 and guard.admission.waiting == 0
    assert count(guard, "OK") == 1 and count(guard, "DEADLINE_EXCEEDED") + count(guard, "CANCELLED") == 1


def test_an_abort_passes_through_and_an_exception_becomes_internal(caplog):
    def invalid(request, context):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "text must not be empty")

    call, guard = guarded(invalid)
    context = FakeContext()
    with pytest.raises(Aborted):
        call(None, context)
    assert context.details == "text must not be empty" and count(guard, "INVALID_ARGUMENT") == 1

    def broken(request, context):
        raise ValueError("a bug")

    call, guard = guarded(broken)
    context = FakeContext([(REQUEST_ID_KEY, "req-7")])
    with caplog.at_level(logging.ERROR, logger="nextword"), pytest.raises(Aborted):
        call("private text", context)
    assert context.status == grpc.StatusCode.INTERNAL and "request id req-7" in context.details
    assert count(guard, "INTERNAL") == 1 and guard.active == 0
    record = caplog.records[-1]
    assert record.request_id == "req-7" and record.exc_info and "private text" not in caplog.text


def test_malformed_bytes_are_invalid_argument_naming_the_type_and_never_the_payload(caplog):
    from service.pb.nextword.v1 import nextword_pb2 as pb

    guard = CallGuard(Metrics())
    handler = grpc.unary_unary_rpc_method_handler(
        lambda request, context: request.text, request_deserializer=pb.SuggestRequest.FromString
    )
    wrapped = intercept(guard, handler, "/nextword.v1.NextWord/Suggest").unary_unary

    def call(data, context):
        return asyncio.run(wrapped(data, context))

    good = pb.SuggestRequest(text="secret words").SerializeToString()
    assert call(good, FakeContext()) == "secret words"
    with caplog.at_level(logging.INFO, logger="nextword"):
        for data, reason in [
            (good.replace(b"secret", b"s\xffcret"), "String field had bad UTF-8"),
            (good[:-3], "Wire format was corrupt"),
            (b"\x01\x02\x03\x04\x05", ""),
        ]:
            context = FakeContext()
            with pytest.raises(Aborted):
                call(data, context)
            assert context.status == grpc.StatusCode.INVALID_ARGUMENT
            assert context.details.startswith("request is not a valid nextword.v1.SuggestRequest: ")
            assert reason in context.details and "secret" not in context.details and "cret" not in context.details
    assert count(guard, "INVALID_ARGUMENT") == 3
    assert not any(record.exc_info for record in caplog.records) and "secret" not in caplog.text


def test_a_malformed_message_in_a_request_stream_is_invalid_argument():
    from service.pb.nextword.v1 import nextword_pb2 as pb

    guard = CallGuard(Metrics())

    def handler(requests, context):
        for request in requests:
            yield request.append

    method = grpc.stream_stream_rpc_method_handler(handler, request_deserializer=pb.TypeRequest.FromString)
    call = intercept(guard, method, "/nextword.v1.NextWord/Type").stream_stream

    async def requests():
        yield pb.TypeRequest(append="ok").SerializeToString()
        yield b"\xff\xff"

    async def scenario(context):
        answers = []
        with pytest.raises(Aborted):
            async for answer in call(requests(), context):
                answers.append(answer)
        return answers

    context = FakeContext()
    assert asyncio.run(scenario(context)) == ["ok"] and context.status == grpc.StatusCode.INVALID_ARGUMENT
    assert "nextword.v1.TypeRequest" in context.details and count(guard, "INVALID_ARGUMENT", "Type") == 1
    assert guard.active == 0


def test_new_request_ids_are_unique_and_sane():
    from service.interceptors import _SANE_ID, new_request_id

    ids = [new_request_id() for _ in range(1000)]
    assert len(set(ids)) == 1000 and all(_SANE_ID.fullmatch(i) for i in ids)
