"""The personal history as part of the served distribution (service/model/personal_tokens.py and
personal_mix.py): known probabilities, the mix, suggestions that a user's words enter, and the fit."""

import math
import time

import numpy as np
import pytest
import torch

from service.model.personal import HistoryConfig, UserHistory, ngrams_ending, units
from service.model.personal_mix import PersonalMix
from service.model.personal_tokens import (
    EVIDENCE_BINS,
    MIN_WEIGHT,
    ONLINE_PRIOR,
    LearnedWeights,
    OnlineWeights,
    bucket_of,
    distribution,
    evidence_bin,
    fit,
    log_loss,
    tokens_of,
)
from service.model.suggest import Suggester
from service.model.tokenizer import UNK
from tests.service.fakes import FakeModel, char_tokenizer, word_tokenizer

NOW = 1_000_000.0
FLAT = LearnedWeights(tuple((0.5,) * (len(EVIDENCE_BINS) + 1) for _ in range(3)))


def typed(*lines: str, order: int = 3) -> UserHistory:
    history = UserHistory(HistoryConfig(order=order))
    for line in lines:
        for gram in ngrams_ending(units(line), 0, order):
            history.add(gram, 1.0, NOW)
    return history


def test_the_user_distribution_is_witten_bell_down_to_the_unigram():
    tokenizer = word_tokenizer(["moses", "said", "unto", "the"], lowercase=True)
    history = typed("Moses said unto Zelda")
    view = tokens_of(history, tokenizer)
    ids = {w: tokenizer.encode(w)[0] for w in ("moses", "said", "unto")}
    zelda = view.ids["zelda"]
    assert zelda >= tokenizer.vocab_size  # a word the vocabulary lacks keeps an id of its own
    alone = distribution(history, view, [], NOW)  # no context: how often each unit was typed
    assert alone.seen == 0 and alone.evidence == pytest.approx(4.0)
    assert alone.probabilities[ids["moses"]] == pytest.approx(0.25) and alone.probabilities[zelda] == pytest.approx(
        0.25
    )
    after = distribution(history, view, units("Moses said unto"), NOW)
    # trigram context "said unto" seen once, followed by zelda: C = 1, T = 1 at each level
    p1 = {w: 0.25 * 0.5 for w in ("moses", "said", "unto", "zelda")}
    p1["zelda"] += 0.5
    p2 = {w: p * 0.5 for w, p in p1.items()}
    p2["zelda"] += 0.5
    assert after.seen == 2 and after.evidence == pytest.approx(1.0)
    assert after.probabilities[zelda] == pytest.approx(p2["zelda"]) == pytest.approx(0.8125)
    assert after.probabilities[ids["said"]] == pytest.approx(p2["said"])
    assert after.probabilities.sum() == pytest.approx(1.0)
    tokens = after.over_tokens(tokenizer.vocab_size)  # over the vocabulary: zelda is <unk>
    assert tokens[UNK] == pytest.approx(0.8125) and tokens.sum() == pytest.approx(1.0)
    assert (
        distribution(UserHistory(HistoryConfig()), tokens_of(UserHistory(HistoryConfig()), tokenizer), [], NOW) is None
    )


def test_a_typed_word_is_observed_as_the_evaluator_scores_its_token():
    """What moves a user's weights as they type (PersonalMix.observed): the token's probability under the served
    model and under the history before the word is learned, and its bucket."""
    tokenizer = word_tokenizer(["moses", "said", "unto", "the"], lowercase=True)
    mix = PersonalMix(typed("Moses said unto Zelda"), tokenizer, FLAT, now=NOW)
    log_probs = torch.log(torch.full((tokenizer.vocab_size,), 1.0 / tokenizer.vocab_size))
    log_probs[UNK] = math.log(0.01)
    # after "Moses said unto", zelda has P_user 0.8125 (the test above); the vocabulary lacks it: <unk>
    served, mine, bucket = mix.observed("Moses said unto ", "Zelda", log_probs)
    assert served == pytest.approx(0.01) and mine == pytest.approx(0.8125)
    assert bucket == 2 * (len(EVIDENCE_BINS) + 1)  # two units of context typed, once
    served, mine, bucket = mix.observed("", "said", log_probs)  # no context: how often it was typed, 1 in 4
    assert served == pytest.approx(1.0 / tokenizer.vocab_size) and mine == pytest.approx(0.25)
    assert bucket == evidence_bin(4.0)
    empty = PersonalMix(UserHistory(HistoryConfig()), tokenizer, FLAT, now=NOW)
    assert empty.observed("", "said", log_probs)[1:] == (0.0, -1)  # no history: nothing to fit


def test_a_break_ends_the_context_and_learning_keeps_the_view_current():
    tokenizer = word_tokenizer(["a", "b", "c"])
    history = typed("a b")
    view = tokens_of(history, tokenizer)
    assert distribution(history, view, units("a"), NOW).seen == 1
    assert distribution(history, view, units("a."), NOW).seen == 0  # punctuation: another clause
    for gram in ngrams_ending(units("c c c"), 0, 3):
        history.add(gram, 1.0, NOW)
    assert view.unigram[tokenizer.encode("c")[0]] == pytest.approx(3.0)  # learned after the view was built
    history.forget("c")
    assert not history.views  # rebuilt at the next use, without the forgotten word
    assert tokens_of(history, tokenizer).unigram[tokenizer.encode("c")[0]] == 0.0


def test_the_mix_is_linear_with_the_weight_of_the_bucket():
    tokenizer = word_tokenizer(["a", "b", "c"])
    history = typed("a b", "a b", "a c")
    weights = LearnedWeights(((0.1,) * 5, (0.2, 0.4, 0.6, 0.7, 0.8), (0.3,) * 5))
    served = torch.full((tokenizer.vocab_size,), 1.0 / tokenizer.vocab_size).log()
    mixed, lacking = PersonalMix(history, tokenizer, weights, now=NOW).mix("a", served)
    user = distribution(history, tokens_of(history, tokenizer), ["a"], NOW)
    assert user.seen == 1 and user.evidence == pytest.approx(3.0)  # "a" typed 3 times: the second bin
    expected = 0.4 * user.over_tokens(tokenizer.vocab_size) + 0.6 / tokenizer.vocab_size  # 3 <= E < 10: 0.4
    assert np.allclose(mixed.exp().numpy(), expected)
    assert mixed.exp().sum().item() == pytest.approx(1.0)
    assert not len(lacking.words)
    empty = PersonalMix(UserHistory(HistoryConfig()), tokenizer, weights, now=NOW)
    assert empty.mix("a", served)[0] is served  # no history: the served distribution itself


def _flat_model(tokenizer):
    return FakeModel(tokenizer.vocab_size, lambda history: {i: 1.0 for i in range(4, tokenizer.vocab_size)})


def test_a_word_typed_three_times_rises_to_first_place():
    filler = [f"w{i}" for i in range(8)]
    tokenizer = word_tokenizer(["the", "king", "salem", *filler], lowercase=True)
    # as a model after "the": no word much more likely than the rest
    table = {tokenizer.encode("king")[0]: 0.12, tokenizer.encode("salem")[0]: 0.02}
    table.update({tokenizer.encode(word)[0]: 0.1075 for word in filler})
    suggester = Suggester(FakeModel(tokenizer.vocab_size, lambda history: table), tokenizer)
    history = UserHistory(HistoryConfig())
    for _ in range(3):
        for gram in ngrams_ending(units("the salem"), 0, 3):
            history.add(gram, 1.0, NOW)
    personal = PersonalMix(history, tokenizer, LearnedWeights(), now=NOW)
    assert suggester.suggest("the ", 3).suggestions[0][0] == "king"  # nobody's: the model's own
    assert suggester.suggest("the ", 3, personal).suggestions[0][0] == "salem"
    assert suggester.suggest("a ", 3, personal).suggestions[0][0] == "king"  # a context they never typed


def test_words_the_vocabulary_lacks_are_suggested_and_completed_by_name():
    tokenizer = word_tokenizer(["the", "king", "of"], lowercase=True)
    model = FakeModel(tokenizer.vocab_size, lambda history: {tokenizer.encode("king")[0]: 0.9})
    suggester = Suggester(model, tokenizer)
    history = typed(*["the Zelda of"] * 5)
    personal = PersonalMix(history, tokenizer, LearnedWeights(), now=NOW)
    found = dict(suggester.suggest("the ", 5, personal).suggestions)
    assert "Zelda" in found and found["Zelda"] > 0
    completions = suggester.suggest("the Ze", 3, personal)
    assert completions.suggestions[0][0] == "Zelda" and completions.suggestions[0][1] == pytest.approx(1.0)
    both = dict(suggester.suggest("the k", 3, personal).suggestions)
    assert set(both) == {"king"}  # only what completes the prefix


def test_phrases_of_a_character_model_follow_the_user():
    tokenizer = char_tokenizer("我们的昨天今")
    ids = {ch: tokenizer.encode(ch)[0] for ch in "我们的昨天今"}
    flat = {ids[ch]: 0.15 for ch in "我们的天今"} | {ids["昨"]: 0.05}  # no character much more likely than the rest
    model = FakeModel(tokenizer.vocab_size, lambda history: flat)
    suggester = Suggester(model, tokenizer)
    assert "昨天" not in [text for text, _ in suggester.suggest("我", 6).suggestions]
    history = typed(*["我昨天"] * 6)
    personal = PersonalMix(history, tokenizer, LearnedWeights(), now=NOW)
    # 昨 rises, and the phrase goes on with 天 because the mix, not the model, makes 天 likely after 我昨
    assert "昨天" in [text for text, _ in suggester.suggest("我", 6, personal).suggestions]


def test_em_recovers_the_weight_that_generated_the_tokens():
    rng = np.random.default_rng(0)
    n = 20_000
    served, user = rng.uniform(0.01, 0.5, n), rng.uniform(0.01, 0.5, n)
    buckets = np.where(rng.uniform(size=n) < 0.5, 0, len(EVIDENCE_BINS) + 1)  # (0, bin 0) and (1, bin 0)
    # tokens drawn from the mix: with weight w the user's distribution picked them (their probability is higher)
    truth = {0: 0.2, len(EVIDENCE_BINS) + 1: 0.7}
    from_user = rng.uniform(size=n) < np.vectorize(truth.get)(buckets)
    user = np.where(from_user, user * 4, user / 4)
    fitted = fit(served, user, buckets, (3, len(EVIDENCE_BINS) + 1))
    assert fitted.weights[0][0] < fitted.weights[1][0]
    assert fitted.weights[2] == (MIN_WEIGHT,) * (len(EVIDENCE_BINS) + 1)  # no tokens there: the least weight
    assert log_loss(served, user, buckets, fitted) < log_loss(served, user, buckets, FLAT)
    few = fit(served[:40], user[:40], buckets[:40], (3, len(EVIDENCE_BINS) + 1), prior=FLAT)
    assert few == FLAT  # 40 tokens are too few to move a weight: each keeps the one it had
    assert bucket_of(None, 3) == -1


def test_online_weights_move_from_the_start_toward_what_the_users_typing_supports():
    columns = len(EVIDENCE_BINS) + 1
    start = LearnedWeights(((0.2,) * columns, (0.4,) * columns, (0.6,) * columns))
    online = OnlineWeights(start)
    assert online.current == start  # nothing typed yet
    n = int(ONLINE_PRIOR)
    # bucket (1, 0): the history gave every token all of its probability and the model none: each share is 1;
    # bucket (2, 0): the history gave them nothing: each share is 0
    served = np.concatenate([np.zeros(n), np.full(n, 0.5)])
    user = np.concatenate([np.ones(n), np.zeros(n)])
    buckets = np.concatenate([np.full(n, columns), np.full(n, 2 * columns)])
    weights = online.observe(served, user, buckets)
    assert weights.weights[1][0] == pytest.approx((ONLINE_PRIOR * 0.4 + n) / (ONLINE_PRIOR + n))  # 0.7
    assert weights.weights[2][0] == pytest.approx(ONLINE_PRIOR * 0.6 / (ONLINE_PRIOR + n))  # 0.3
    assert weights.weights[0] == start.weights[0] and weights.weights[1][1:] == start.weights[1][1:]  # untyped
    for _ in range(40):  # a user whose history never helps: that bucket goes down to the least weight
        weights = online.observe(np.full(n, 0.5), np.zeros(n), np.full(n, 2 * columns))
    assert weights.weights[2][0] == MIN_WEIGHT
    assert online.observe(np.ones(3), np.ones(3), np.full(3, -1)) == weights  # no history: nothing to learn from


def test_weights_parse_and_print():
    weights = LearnedWeights.parse(str(FLAT))
    assert weights == FLAT
    with pytest.raises(ValueError, match="rows of 5 weights"):
        LearnedWeights.parse("0.1,0.2")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        LearnedWeights.parse(";".join(["1,1,1,1,1"] * 3))
    assert time.time() > NOW
