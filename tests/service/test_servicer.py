"""The servicer on a fake engine and a fake context: validation, error mapping, sessions, model info."""

import itertools
import threading
import time

import grpc
import pytest

from service.api.config import ServerConfig
from service.api.servicer import EDIT_QUEUE, NextWordServicer
from service.pb.nextword.v1 import nextword_pb2 as pb
from tests.service.fakes import Aborted, FakeContext, fake_engine


def servicer(**overrides) -> NextWordServicer:
    return NextWordServicer(fake_engine(), ServerConfig(**overrides))


def aborted(call) -> FakeContext:
    """Run ``call(context)`` expecting an abort; returns the context with its status and details."""
    context = FakeContext()
    with pytest.raises(Aborted):
        result = call(context)
        if hasattr(result, "__next__"):
            list(result)
    return context


@pytest.mark.parametrize(
    "request_, message",
    [
        (pb.SuggestRequest(text=""), "text must not be empty"),
        (pb.SuggestRequest(text="a" * 101), "text has 101 characters; the limit is 100"),
        (
            pb.SuggestRequest(text="ab", num_suggestions=21),
            "num_suggestions is 21; it must be 0 (meaning 3) to 20 (server setting max_suggestions)",
        ),
    ],
)
def test_suggest_refuses_what_is_outside_the_limits(request_, message):
    context = aborted(lambda c: servicer(max_text_chars=100).Suggest(request_, c))
    assert context.status == grpc.StatusCode.INVALID_ARGUMENT and context.details == message


def test_suggest_converts_the_engine_answer():
    service = servicer()
    response = service.Suggest(pb.SuggestRequest(text="ab ", num_suggestions=2), FakeContext())
    expected = service.engine.suggester.suggest("ab ", 2)
    assert [(s.text, pytest.approx(s.probability)) for s in response.suggestions] == expected.suggestions
    assert len(response.suggestions) == 2 and not response.completes_word


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"temperature": float("nan")}, "temperature is nan; it must be from 0 to 10 (0 is greedy)"),
        ({"top_p": 0.0}, "top_p is 0.0; it must be in (0, 1]"),
        ({"max_tokens": 600}, "max_tokens is 600; the limit is 512"),
        ({"stop": [""]}, "a stop string has 0 characters; each must have 1 to 64"),
    ],
)
def test_generate_refuses_bad_parameters(fields, message):
    context = aborted(lambda c: servicer().Generate(pb.GenerateRequest(prompt="a", **fields), c))
    assert context.status == grpc.StatusCode.INVALID_ARGUMENT and context.details == message


def test_generate_streams_text_then_the_finish_reason():
    request = pb.GenerateRequest(prompt="a", temperature=0, max_tokens=4)
    responses = list(servicer().Generate(request, FakeContext()))
    assert "".join(r.text for r in responses) == "aaaa"
    assert responses[-1].finished.reason == pb.FINISH_REASON_LENGTH and responses[-1].finished.generated_tokens == 4


def test_type_answers_each_edit_and_names_a_bad_one():
    edits = [pb.TypeRequest(append="ab"), pb.TypeRequest(delete=1), pb.TypeRequest(delete=0)]
    context = FakeContext()
    answers = []
    with pytest.raises(Aborted):
        for answer in servicer().Type(iter(edits), context):
            answers.append(answer)
    assert [(a.edit_index, a.text_length) for a in answers] == [(1, 2), (2, 1)]
    assert context.status == grpc.StatusCode.INVALID_ARGUMENT and context.details == "edit 3: delete must be at least 1"


def test_type_beyond_the_session_limit_is_resource_exhausted():
    service = servicer(max_sessions=1)
    first = service.Type(iter([pb.TypeRequest(append="a")] * 2), FakeContext())
    next(first)  # the first session is open
    context = aborted(lambda c: service.Type(iter([pb.TypeRequest(append="a")]), c))
    assert context.status == grpc.StatusCode.RESOURCE_EXHAUSTED and "the limit is 1 at once" in context.details
    first.close()
    assert service.active_sessions == 0


def test_the_edit_reader_ends_with_its_call_even_when_its_queue_is_full():
    before = threading.active_count()
    pulled: list[int] = []
    endless = (pulled.append(1) or pb.TypeRequest(append="a") for _ in itertools.count())
    session = servicer().Type(endless, FakeContext())
    next(session)  # one answer, then the client stops reading: the reader fills the queue and waits
    deadline = time.monotonic() + 5
    while threading.active_count() == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before + 1
    time.sleep(0.2)  # the queue is full by now: the reader waits with EDIT_QUEUE edits read ahead
    read = len(pulled)
    time.sleep(0.2)
    assert EDIT_QUEUE <= read <= EDIT_QUEUE + 3 and len(pulled) == read  # and it reads no more
    session.close()  # the call ends (cancel, abort or deadline)
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert threading.active_count() == before


def test_model_info_reads_the_manifest_and_the_limits():
    info = servicer(max_suggestions=7).GetModelInfo(pb.GetModelInfoRequest(), FakeContext())
    assert (info.tokenizer, info.cell, info.num_layers, info.hidden_size, info.parameters) == (
        "char",
        "lstm",
        1,
        8,
        123,
    )
    assert info.stream_validation_perplexity == 12.5 and list(info.corpus) == ["fake.txt"]
    assert info.max_suggestions == 7 and info.device == "cpu" and '"format": "nextword-model"' in info.manifest_json
