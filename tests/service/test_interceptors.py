"""The interceptor on a fake context: request ids, tokens, the concurrency limit, error mapping, metrics."""

import logging
import re
from types import SimpleNamespace

import grpc
import pytest
import torch

from service.api.interceptors import REQUEST_ID_KEY, CallGuard
from service.api.logs import JsonFormatter, TextFormatter
from service.api.metrics import Metrics
from service.model.hardware import device_failure
from tests.service.fakes import Aborted, FakeContext

TOKEN = "a-token-of-enough-length"


def guarded(handler, method="/nextword.v1.NextWord/Suggest", **options):
    """(the wrapped unary handler, the guard) for ``handler(request, context)``."""
    guard = CallGuard(Metrics(), **options)
    details = SimpleNamespace(method=method)
    wrapped = guard.intercept_service(lambda _: grpc.unary_unary_rpc_method_handler(handler), details)
    return wrapped.unary_unary, guard


def count(guard: CallGuard, code: str, method: str = "Suggest") -> float:
    value = guard.metrics.registry.get_sample_value(
        "nextword_requests_total", {"method": method, "code": code, "model": "", "protocol": "grpc"}
    )
    return value or 0.0


def test_a_sane_request_id_is_kept_and_an_insane_one_replaced():
    call, _ = guarded(lambda request, context: "ok")
    context = FakeContext([(REQUEST_ID_KEY, "client-42")])
    assert call(None, context) == "ok" and context.trailing == ((REQUEST_ID_KEY, "client-42"),)
    context = FakeContext([(REQUEST_ID_KEY, "no spaces allowed")])
    call(None, context)
    made = context.trailing[0][1]
    assert re.fullmatch(r"[0-9a-f]{16}", made)
    call(None, context)
    assert context.trailing[0][1] != made  # a new one for each call


def test_tokens_are_required_except_for_health():
    call, guard = guarded(lambda request, context: "ok", tokens=[TOKEN])
    context = FakeContext([("authorization", "Bearer wrong-token-0123456789")])
    with pytest.raises(Aborted):
        call(None, context)
    assert context.status == grpc.StatusCode.UNAUTHENTICATED and count(guard, "UNAUTHENTICATED") == 1
    assert call(None, FakeContext([("authorization", f"Bearer {TOKEN}")])) == "ok"
    health, _ = guarded(lambda request, context: "serving", method="/grpc.health.v1.Health/Check", tokens=[TOKEN])
    assert health(None, FakeContext()) == "serving"


def test_calls_beyond_the_limit_are_refused_while_one_runs():
    inner = {}

    def handler(request, context):
        if request == "outer":  # a second call arrives while this one runs
            inner["context"] = FakeContext()
            with pytest.raises(Aborted):
                call("inner", inner["context"])
        return "done"

    call, guard = guarded(handler, max_concurrent_rpcs=1)
    assert call("outer", FakeContext()) == "done"
    assert inner["context"].status == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the limit is 1" in inner["context"].details
    assert guard.active == 0 and count(guard, "OK") == 1 and count(guard, "RESOURCE_EXHAUSTED") == 1


def test_an_abort_passes_through_and_an_exception_becomes_internal(caplog):
    def invalid(request, context):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "text must not be empty")

    call, guard = guarded(invalid)
    context = FakeContext()
    with pytest.raises(Aborted):
        call(None, context)
    assert context.details == "text must not be empty" and count(guard, "INVALID_ARGUMENT") == 1

    def broken(request, context):
        raise ValueError(f"a bug near {request!r}")  # a library's error that quotes what a user typed

    call, guard = guarded(broken)
    context = FakeContext([(REQUEST_ID_KEY, "req-7")])
    with caplog.at_level(logging.ERROR, logger="nextword"), pytest.raises(Aborted):
        call("private text", context)
    assert context.status == grpc.StatusCode.INTERNAL and "request id req-7" in context.details
    assert count(guard, "INTERNAL") == 1 and guard.active == 0
    record = caplog.records[-1]
    assert record.request_id == "req-7" and record.exc_info
    for formatter in (JsonFormatter(), TextFormatter()):  # the line the server writes
        line = formatter.format(record)
        assert "private text" not in line
        assert "ValueError" in line and "in broken" in line  # the type and where, for whoever debugs it


def test_malformed_bytes_are_invalid_argument_naming_the_type_and_never_the_payload(caplog):
    from service.pb.nextword.v1 import nextword_pb2 as pb

    guard = CallGuard(Metrics())
    handler = grpc.unary_unary_rpc_method_handler(
        lambda request, context: request.text, request_deserializer=pb.SuggestRequest.FromString
    )
    details = SimpleNamespace(method="/nextword.v1.NextWord/Suggest")
    call = guard.intercept_service(lambda _: handler, details).unary_unary
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
    details = SimpleNamespace(method="/nextword.v1.NextWord/Type")
    call = guard.intercept_service(lambda _: method, details).stream_stream
    context = FakeContext()
    answers = []
    with pytest.raises(Aborted):
        for answer in call(iter([pb.TypeRequest(append="ok").SerializeToString(), b"\xff\xff"]), context):
            answers.append(answer)
    assert answers == ["ok"] and context.status == grpc.StatusCode.INVALID_ARGUMENT
    assert "nextword.v1.TypeRequest" in context.details and count(guard, "INVALID_ARGUMENT", "Type") == 1


def test_new_request_ids_are_unique_and_sane():
    from service.api.interceptors import _SANE_ID, new_request_id

    ids = [new_request_id() for _ in range(1000)]
    assert len(set(ids)) == 1000 and all(_SANE_ID.fullmatch(i) for i in ids)


TORCHSCRIPT_CUDNN_FAILURE = (
    "The following operation failed in the TorchScript interpreter.\n"
    "Traceback of TorchScript, serialized code (most recent call last):\n"
    '  File "code/__torch__/training/model.py", line 27, in forward_last\n'
    "    x, new_state, = (self).encode(tokens, state, )\n"
    "RuntimeError: cuDNN error: CUDNN_STATUS_INTERNAL_ERROR\n"
)


@pytest.mark.parametrize(
    "error, said",
    [
        (RuntimeError(TORCHSCRIPT_CUDNN_FAILURE), "RuntimeError: cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"),
        (
            RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
            "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        ),
        (
            RuntimeError("CUDA error: an illegal memory access was encountered\nCompile with `TORCH_USE_CUDA_DSA`"),
            "CUDA error: an illegal memory access was encountered",
        ),
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB."), "CUDA out of memory. Tried"),
        (RuntimeError("shape '[2, 3]' is invalid for input of size 5"), None),
        (ValueError("CUDA error: not from torch"), None),
    ],
)
def test_a_gpu_failure_is_told_from_other_errors_by_torchs_message(error, said):
    found = device_failure(error)
    assert found == said if said is None else found.startswith(said)


def test_a_gpu_failure_is_unavailable_and_stops_the_server_once(caplog):
    def failing(request, context):
        raise RuntimeError(f"{TORCHSCRIPT_CUDNN_FAILURE}\nwhile reading {request!r}")

    call, guard = guarded(failing)
    stops = []
    guard.on_device_failure = lambda: stops.append(1)
    with caplog.at_level(logging.ERROR, logger="nextword"):
        for request_id in ("req-1", "req-2"):
            context = FakeContext([(REQUEST_ID_KEY, request_id)])
            with pytest.raises(Aborted):
                call("private text", context)
            assert context.status == grpc.StatusCode.UNAVAILABLE
            assert f"request id {request_id}" in context.details and "retry" in context.details
    assert stops == [1] and count(guard, "UNAVAILABLE") == 2 and count(guard, "INTERNAL") == 0
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.request_id for r in failures] == ["req-1", "req-2"]
    assert failures[0].exc_info and not failures[1].exc_info  # one traceback, then a line per call
    assert "CUDNN_STATUS_INTERNAL_ERROR" in failures[1].getMessage()
    assert not any("private text" in JsonFormatter().format(record) for record in failures)


def test_out_of_memory_fails_the_call_with_resource_exhausted_and_keeps_the_server():
    def failing(request, context):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    call, guard = guarded(failing)
    stops = []
    guard.on_device_failure = lambda: stops.append(1)
    context = FakeContext([(REQUEST_ID_KEY, "req-9")])
    with pytest.raises(Aborted):
        call("text", context)
    assert context.status == grpc.StatusCode.RESOURCE_EXHAUSTED and "out of memory" in context.details
    assert stops == [] and count(guard, "RESOURCE_EXHAUSTED") == 1
