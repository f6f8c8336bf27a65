import torch

from service.model.generation import (
    CANCELLED,
    END_TOKEN,
    LENGTH,
    STOP_STRING,
    GenerationParams,
    Generator,
    filter_logits,
    pick_token,
)
from service.model.tokenizer import BOS, EOS, PAD, UNK
from tests.service.fakes import FakeModel, char_tokenizer

TOK = char_tokenizer("abc ")
A, B, C, SP = (TOK.index[ch] for ch in "abc ")


def table(history):
    return {A: 0.5, B: 0.3, C: 0.15, SP: 0.05}


def generator(t=table):
    return Generator(FakeModel(TOK.vocab_size, t), TOK)


def run(gen, prompt="a", **params):
    events = list(gen.generate(prompt, GenerationParams(**params)))
    return "".join(e.text for e in events), events[-1]


def test_temperature_zero_is_greedy():
    text, end = run(generator(), temperature=0, max_tokens=5)
    assert text == "aaaaa" and end.finish_reason == LENGTH and end.generated_tokens == 5


def test_top_k_1_and_tiny_top_p_are_greedy():
    assert run(generator(), top_k=1, max_tokens=6, seed=3)[0] == "aaaaaa"
    assert run(generator(), top_p=0.01, max_tokens=6, seed=3)[0] == "aaaaaa"


def test_same_seed_same_text_and_other_seeds_differ():
    first = run(generator(), max_tokens=40, seed=7)[0]
    assert run(generator(), max_tokens=40, seed=7)[0] == first
    assert any(run(generator(), max_tokens=40, seed=s)[0] != first for s in range(8, 12))


def test_max_tokens_respected():
    text, end = run(generator(), max_tokens=3, seed=1)
    assert len(text) == 3 and end.generated_tokens == 3


def test_stop_string_is_cut_and_never_sent():
    seq = "abcabc"

    def scripted(history):
        n = len(history) - 2  # history: <s>, prompt "a", then generated tokens
        return {TOK.index[seq[n % len(seq)]]: 1.0}

    gen = generator(scripted)
    events = list(gen.generate("a", GenerationParams(temperature=0, max_tokens=20, stop=("ca",))))
    text = "".join(e.text for e in events)
    assert text == "ab" and events[-1].finish_reason == STOP_STRING
    assert all("c" not in e.text for e in events)  # "c" was held back as a possible start of "ca"


def test_end_token_finishes():
    text, end = run(generator(lambda h: {EOS: 1.0}), temperature=0)
    assert text == "" and end.finish_reason == END_TOKEN and end.generated_tokens == 1


def test_cancel_stops_generation():
    calls = {"n": 0}

    def cancelled():
        calls["n"] += 1
        return calls["n"] > 4

    events = list(generator().generate("a", GenerationParams(temperature=0, max_tokens=100), cancelled))
    assert events[-1].finish_reason == CANCELLED and events[-1].generated_tokens == 4


def test_streamed_pieces_are_the_seeded_draws_in_order():
    params = GenerationParams(max_tokens=30, seed=5)
    events = list(generator().generate("a", params))
    assert len([e for e in events if e.text]) > 1
    # the same draws, made by hand: the fake's distribution does not depend on the history
    log_probs = FakeModel(TOK.vocab_size, table).advance(torch.tensor([[A]]), torch.zeros(1, 1, 1))[0][0]
    log_probs = log_probs.index_fill(0, torch.tensor([PAD, BOS, UNK]), float("-inf"))
    rng = torch.Generator().manual_seed(5)
    expected = "".join(TOK.token_text(pick_token(log_probs, params, rng)) for _ in range(30))
    assert "".join(e.text for e in events) == expected


def test_filter_logits_top_p_keeps_the_smallest_set_reaching_p():
    log_probs = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = filter_logits(log_probs, 1.0, 0, 0.75).isfinite().tolist()
    assert kept == [True, True, False, False]
    kept = filter_logits(log_probs, 1.0, 3, 1.0).isfinite().tolist()
    assert kept == [True, True, True, False]
