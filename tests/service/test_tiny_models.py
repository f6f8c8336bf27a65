"""Real (tiny) exported models: incremental reading, context windows, sessions against Suggest, languages."""

import random

import pytest
import torch

from service.model.artifact import load_artifact
from service.model.steps import ScriptedModel, encode_context, window_start
from service.model.suggest import SuggestConfig, Suggester
from service.model.typing_session import IncrementalContext, TypingSession


def engine(path, **config):
    artifact = load_artifact(path)
    model = ScriptedModel(artifact.model, artifact.tokenizer.vocab_size)
    return Suggester(model, artifact.tokenizer, SuggestConfig(**config))


def same(a, b):
    assert a.completes_word == b.completes_word and a.prefix == b.prefix
    assert [w for w, _ in a.suggestions] == [w for w, _ in b.suggestions]
    for (_, p), (_, q) in zip(a.suggestions, b.suggestions):
        assert p == pytest.approx(q, rel=1e-4)


def test_window_start_keeps_the_last_tokens_and_moves_by_half_the_limit():
    assert window_start(10, 16) == 0 and window_start(16, 16) == 0
    assert window_start(17, 16) == 8 and window_start(24, 16) == 8 and window_start(25, 16) == 16
    for n in range(200):
        assert 0 <= n - window_start(n, 16) <= 16


def test_incremental_reading_equals_reading_the_whole_text(tiny_char_model):
    s = engine(tiny_char_model)
    ids = s.tokenizer.encode("the children eat fresh bread every morning. we like rice.")
    context = IncrementalContext(s.model, limit=1024)
    for end in range(1, len(ids) + 1):
        log_probs, state = context.read(ids[:end])
        full_log_probs, full_state, _ = encode_context(s.model, ids[:end], 1024)
        torch.testing.assert_close(log_probs, full_log_probs, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(state, full_state, atol=1e-5, rtol=1e-4)
    assert context.steps == len(ids) + 1  # each token read once, plus <s>


def test_a_delete_goes_back_without_reading_the_text_again(tiny_char_model):
    s = engine(tiny_char_model)
    ids = s.tokenizer.encode("we like green tea in the evening")
    context = IncrementalContext(s.model, limit=1024)
    for end in range(1, len(ids) + 1):
        context.read(ids[:end])
    before = context.steps
    context.read(ids[:-3])
    assert context.steps == before  # a saved state: no model step at all
    context.read(ids[:-3] + ids[-2:])
    assert context.steps == before + 2


@pytest.mark.slow  # its models come from getfixturevalue, which the slow rule in conftest does not see
@pytest.mark.parametrize("model_name", ["tiny_char_model", "tiny_word_model", "tiny_zh_model"])
def test_typing_session_answers_equal_suggest_after_random_edits(model_name, request):
    s = engine(request.getfixturevalue(model_name))
    text_source = (
        "我们昨天去了书店。妈妈今天买了苹果！"
        if model_name == "tiny_zh_model"
        else "the old man likes fresh bread. my friend wants green tea at night."
    )
    session = TypingSession(s, max_chars=1000)
    rng = random.Random(0)
    position = 0
    for _ in range(60):
        if rng.random() < 0.75 or not session.text:
            piece = text_source[position : position + rng.randint(1, 3)] or "a"
            position = (position + len(piece)) % len(text_source)
            session.append(piece)
        else:
            session.delete(rng.randint(1, 4))
        if session.text:
            same(session.suggest(3), s.suggest(session.text, 3))


def test_long_text_keeps_its_last_tokens_and_session_agrees(tiny_char_model):
    s = engine(tiny_char_model, max_context_tokens=32)
    text = "the children eat fresh bread every morning and we like rice at night "
    session = TypingSession(s, max_chars=1000)
    for ch in text:
        session.append(ch)
        same(session.suggest(3), s.suggest(session.text, 3))
    assert session.context.steps < 4 * len(text)  # re-reads at most the limit once per half limit


def test_english_and_chinese_suggestions_are_sensible(tiny_char_model, tiny_zh_model):
    en = engine(tiny_char_model)
    words = [w for w, _ in en.suggest("she cook fresh ", 3).suggestions]
    assert "bread" in words
    completion = en.suggest("we want gre", 3)
    assert completion.completes_word and all(w.startswith("gre") for w, _ in completion.suggestions)
    assert completion.suggestions[0][0] == "green"
    zh = engine(tiny_zh_model)
    phrases = [w for w, _ in zh.suggest("妈妈昨天去了", 5).suggestions]
    assert set(phrases) & {"书店", "公园", "学校", "一本书", "电影"}
