"""Raw bytes from an outside client: every method answers malformed messages with INVALID_ARGUMENT."""

from __future__ import annotations

import logging

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.pb.nextword.v1 import nextword_pb2 as pb
from tests.e2e.test_server import start

UNARY = {
    "/nextword.v1.NextWord/Suggest": pb.SuggestRequest(text="we like", num_suggestions=2),
    "/nextword.v1.NextWord/GetModelInfo": pb.GetModelInfoRequest(),
    "/nextword.v1.NextWord/Learn": pb.LearnRequest(text="we like rice"),
    "/nextword.v1.NextWord/Forget": pb.ForgetRequest(word="rice"),
    "/nextword.v1.NextWord/Convert": pb.ConvertRequest(context="we", pinyin="nihao"),  # an English model: refused
    "/grpc.health.v1.Health/Check": None,
}
STREAMED = {
    "/nextword.v1.NextWord/Generate": pb.GenerateRequest(prompt="we", max_tokens=2, temperature=0),
    "/nextword.v1.NextWord/ExportHistory": pb.ExportHistoryRequest(),
}
TYPE = "/nextword.v1.NextWord/Type"
IMPORT = "/nextword.v1.NextWord/ImportHistory"  # client-streaming: a user's history, chunk by chunk
AS_USER = (("x-nextword-user", "fuzz"),)
VALID = [
    pb.SuggestRequest(text="we like", num_suggestions=2).SerializeToString(),
    pb.GenerateRequest(prompt="we", max_tokens=2, stop=["x"]).SerializeToString(),
    pb.TypeRequest(append="we").SerializeToString(),
    pb.ConvertRequest(context="我", pinyin="nihao", model="").SerializeToString(),
]
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
BYTES = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def string_field_with_bad_utf8(data: bytes) -> bytes:
    """Field 1 (the text of Suggest, Generate's prompt, Type's append) holding invalid UTF-8."""
    return b"\x0a" + bytes([len(data)]) + data


def mangled(draw_from):
    """Valid messages with one byte flipped, cut short, or an unknown field added; or random bytes."""
    return st.one_of(
        st.binary(max_size=40),
        st.builds(
            lambda m, i, b: m[: i % len(m)] + bytes([b]) + m[i % len(m) + 1 :],
            st.sampled_from(draw_from),
            st.integers(0, 100),
            st.integers(0, 255),
        ),
        st.builds(lambda m, i: m[: i % len(m)], st.sampled_from(draw_from), st.integers(0, 100)),
        st.builds(
            lambda m, extra: m + extra,
            st.sampled_from(draw_from),
            st.sampled_from([b"\xf8\x01\x05", b"\xa2\x06\x03abc", b"\x98\x3e\x01"]),
        ),
        st.builds(
            string_field_with_bad_utf8,
            st.sampled_from([b"\xff", b"h\xc3(", b"\xed\xa0\x80\xed\xb0\x80", b"\xc0\xaf", b"ok\xf5\x80"]),
        ),
    )


@pytest.fixture(scope="module")
def served(tiny_char_model):
    server, port, engine = start(tiny_char_model, max_generate_tokens=64)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=30)
    yield server, channel
    channel.close()
    server.stop(0)


def code_of(call, request, streamed: bool = False, metadata=None) -> grpc.StatusCode:
    try:
        answer = call(request, timeout=30, metadata=metadata)
        if streamed:
            list(answer)
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()


def healthy(channel) -> None:
    suggest = channel.unary_unary("/nextword.v1.NextWord/Suggest", response_deserializer=pb.SuggestResponse.FromString)
    assert suggest(pb.SuggestRequest(text="we like ").SerializeToString(), timeout=30).suggestions


@given(data=mangled(VALID))
@BYTES
def test_unary_and_server_streaming_methods_never_answer_internal(served, data):
    _, channel = served
    for method in UNARY:
        assert code_of(channel.unary_unary(method), data) not in NEVER, method
    for method in STREAMED:
        assert code_of(channel.unary_stream(method), data, streamed=True) not in NEVER, method
    assert code_of(channel.stream_stream(TYPE), iter([data]), streamed=True) not in NEVER
    valid_chunk = pb.HistoryChunk(lines="").SerializeToString()
    assert code_of(channel.stream_unary(IMPORT), iter([valid_chunk, data]), metadata=AS_USER) not in NEVER


def test_each_malformed_form_is_invalid_argument_counted_and_logged_without_a_traceback(served, caplog):
    server, channel = served
    forms = [
        b"\x01\x02\x03\x04\x05",
        pb.SuggestRequest(text="we like").SerializeToString()[:-2],
        string_field_with_bad_utf8(b"\xff\xfe"),
        string_field_with_bad_utf8(b"\xed\xa0\x80\xed\xb0\x80"),
    ]  # CESU-8 surrogates
    before = (
        server.metrics.registry.get_sample_value(
            "nextword_requests_total",
            {"method": "Suggest", "code": "INVALID_ARGUMENT", "model": "", "protocol": "grpc"},
        )
        or 0
    )
    with caplog.at_level(logging.INFO):
        for data in forms:
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary("/nextword.v1.NextWord/Suggest")(data, timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details().startswith("request is not a valid nextword.v1.SuggestRequest: ")
        with pytest.raises(grpc.RpcError) as caught:
            list(channel.unary_stream("/nextword.v1.NextWord/Generate")(b"\xff", timeout=30))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "GenerateRequest" in caught.value.details()
    after = server.metrics.registry.get_sample_value(
        "nextword_requests_total", {"method": "Suggest", "code": "INVALID_ARGUMENT", "model": "", "protocol": "grpc"}
    )
    assert after - before == len(forms)
    lines = [r for r in caplog.records if r.getMessage() == "call" and getattr(r, "code", "") == "INVALID_ARGUMENT"]
    assert len(lines) >= len(forms) + 1 and all(getattr(r, "request_id", "") for r in lines)
    assert not any(r.exc_info for r in caplog.records) and not any(r.name.startswith("grpc") for r in caplog.records)
    healthy(channel)


def test_a_type_stream_that_receives_garbage_after_valid_edits_ends_with_invalid_argument(served):
    _, channel = served
    type_ = channel.stream_stream(TYPE, response_deserializer=pb.TypeResponse.FromString)
    edits = [
        pb.TypeRequest(append="we ").SerializeToString(),
        pb.TypeRequest(append="li").SerializeToString(),
        b"\x0a\x02\xff\xfe",
    ]
    answers = []
    with pytest.raises(grpc.RpcError) as caught:
        for answer in type_(iter(edits), timeout=30):
            answers.append(answer)
    assert [a.edit_index for a in answers] == [1, 2]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        caught.value.details() == "edit 3: request is not a valid nextword.v1.TypeRequest: String field had bad UTF-8"
    )
    healthy(channel)


def test_an_import_stream_that_receives_garbage_after_a_valid_chunk_is_invalid_argument(served):
    _, channel = served
    chunks = [pb.HistoryChunk(lines="").SerializeToString(), b"\x0a\x02\xff\xfe"]
    with pytest.raises(grpc.RpcError) as caught:
        channel.stream_unary(IMPORT)(iter(chunks), timeout=30, metadata=AS_USER)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "HistoryChunk" in caught.value.details()
    healthy(channel)
