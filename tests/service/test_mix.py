"""The n-gram memory and the mix, with known answers."""

import numpy as np
import pytest
import torch

from service.model.memory import MemoryModel, MemoryOrder, NgramMemory
from service.model.mix import MixedModel, served_model
from service.model.suggest import Suggester
from service.model.tokenizer import BOS
from service.model.typing_session import TypingSession
from tests.conftest import TINY_EN
from training.mix_fit import Evidence, fit_weights
from training.ngram import NgramCounts, to_memory
from training.vocabulary import build_tokenizer

LINES = open(TINY_EN, encoding="utf-8").read().splitlines()


@pytest.fixture(scope="module")
def word_memory():
    tokenizer = build_tokenizer("word", LINES, lowercase=True)
    counts = NgramCounts.from_text(LINES, tokenizer, 4)
    return tokenizer, counts, NgramMemory.from_bytes(to_memory(counts).to_bytes())


class Uniform:
    """A stand-in network: uniform next tokens, a state of one layer of 8 zeros."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def init_state(self, batch_size):
        return torch.zeros(1, batch_size, 8)

    def advance(self, tokens, state):
        return torch.full((tokens.size(0), self.vocab_size), -float(np.log(self.vocab_size))), state + 1


def test_the_stored_memory_gives_the_kneser_ney_probabilities_of_training_ngram(word_memory):
    tokenizer, counts, memory = word_memory
    histories, expected = [], []
    for line in LINES[:60]:
        ids = [BOS, *tokenizer.encode(line)]
        for end in range(1, len(ids) + 1):
            history = ids[max(0, end - 3) : end]
            histories.append([-1] * (3 - len(history)) + history)
            expected.append(counts.kneser_ney(history))
    histories.append([-1, -1, -1])  # nothing read yet: the unigram level
    expected.append(counts.kneser_ney([]))
    probabilities, longest = memory.probabilities(np.array(histories))
    np.testing.assert_allclose(probabilities, np.stack(expected), atol=1e-6)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert longest.max() == 3 and longest[-1] == 0


def _contexts(memory: NgramMemory) -> list[list[tuple[int, ...]]]:
    """Each order's contexts (oldest token first), in key order, decoded from the chained keys."""
    decoded: list[list[tuple[int, ...]]] = [[()]]
    for o in memory.orders[1:]:
        vocab = np.uint64(memory.vocab_size)
        decoded.append([(int(key % vocab), *decoded[-1][int(key // vocab)]) for key in o.keys])
    return decoded


def test_a_high_order_over_a_large_vocabulary_gives_the_kneser_ney_probabilities(word_memory):
    tokenizer = word_memory[0]
    # 12,000 tokens and contexts of 7: as packed numbers they would need 12000**7 > 2**64 values
    sequences = [tokenizer.encode(line) for line in LINES]
    counts = NgramCounts(sequences, 8, 12_000)
    memory = NgramMemory.from_bytes(to_memory(counts).to_bytes())
    assert memory.chained and memory.order == 8
    for k, (o, contexts) in enumerate(zip(memory.orders, _contexts(memory))):
        assert set(contexts) == set(counts.kn[k]) and (np.diff(o.keys.astype(np.float64)) > 0).all()
    histories, expected = [], []
    for ids in sequences[:40]:
        ids = [BOS, *ids]
        for end in range(1, len(ids) + 1):
            history = ids[max(0, end - 7) : end]
            histories.append([-1] * (7 - len(history)) + history)
            expected.append(counts.kneser_ney(history))
    probabilities, longest = memory.probabilities(np.array(histories))
    np.testing.assert_allclose(probabilities, np.stack(expected), atol=1e-6)
    assert longest.max() == 7


def test_a_memory_with_the_packed_keys_of_older_files_answers_as_before(word_memory):
    tokenizer, counts, memory = word_memory
    vocab = memory.vocab_size
    orders = [memory.orders[0]]
    for o, contexts in zip(memory.orders[1:], _contexts(memory)[1:]):
        packed = np.array([sum(t * vocab ** (len(c) - 1 - i) for i, t in enumerate(c)) for c in contexts], np.uint64)
        order = np.argsort(packed)
        spans = [np.arange(o.offsets[i], o.offsets[i + 1]) for i in order]
        flat = np.concatenate(spans)
        offsets = np.concatenate([[0], np.cumsum([len(span) for span in spans])]).astype(np.int64)
        orders.append(MemoryOrder(packed[order], o.gamma[order], offsets, o.ids[flat], o.probs[flat]))
    older = NgramMemory.from_bytes(NgramMemory(orders, vocab, chained=False).to_bytes())
    assert not older.chained
    ids = [BOS, *(t for line in LINES[:30] for t in tokenizer.encode(line))]
    histories = np.array([ids[end - 3 : end] for end in range(3, len(ids) + 1)] + [[-1, BOS, ids[1]]])
    (new, new_longest), (old, old_longest) = memory.probabilities(histories), older.probabilities(histories)
    np.testing.assert_allclose(old, new, atol=1e-7)
    np.testing.assert_array_equal(old_longest, new_longest)
    assert set(new_longest) == {1, 2, 3}


def test_pruning_keeps_a_distribution_and_shrinks_the_memory(word_memory):
    tokenizer, counts, memory = word_memory
    pruned = to_memory(counts, min_count=3)
    assert pruned.entries() < memory.entries()
    history = np.array([[BOS, *tokenizer.encode("the old")]])
    np.testing.assert_allclose(pruned.probabilities(history)[0].sum(), 1.0, atol=1e-5)


def test_a_damaged_memory_is_refused():
    with pytest.raises(ValueError, match="unreadable n-gram memory"):
        NgramMemory.from_bytes(b"PK\x03\x04 not an archive")


@pytest.mark.parametrize("rule", ["linear", "log-linear"])
@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_the_mix_with_weight_0_or_1_is_each_component(word_memory, weight, rule):
    tokenizer, _, memory = word_memory
    network, model = Uniform(tokenizer.vocab_size), MemoryModel(memory)
    mixed = MixedModel(network, model, [weight] * memory.order, rule)
    tokens = torch.tensor([[BOS, *tokenizer.encode("the old man")]])
    log_probs, state = mixed.advance(tokens, mixed.init_state(1))
    alone = (model if weight == 1.0 else network).advance(tokens, (model if weight == 1.0 else network).init_state(1))
    torch.testing.assert_close(log_probs.exp(), alone[0].float().exp(), atol=1e-6, rtol=1e-5)
    assert state.shape == (2, 1, 8) and state[-1, 0, :3].tolist() == tokens[0, -3:].float().tolist()


class Peaked(Uniform):
    """A stand-in network with a fixed, uneven next-token distribution."""

    def advance(self, tokens, state):
        logits = torch.sin(torch.arange(self.vocab_size, dtype=torch.float32) * 0.7) * 3
        return torch.log_softmax(logits, 0).expand(tokens.size(0), -1).clone(), state + 1


def test_the_log_linear_mix_is_the_normalised_weighted_sum_of_log_probabilities(word_memory):
    tokenizer, _, memory = word_memory
    network = Peaked(tokenizer.vocab_size)
    weights = [0.1, 0.3, 0.5, 0.9]
    mixed = MixedModel(network, MemoryModel(memory), weights, "log-linear")
    texts = ["the old man", "she cook", "zzz unknown words", "the"]
    steps = [(torch.tensor([[BOS, *tokenizer.encode(text)]]), mixed.init_state(1)) for text in texts]
    for (tokens, state), (ragged_log_probs, _) in zip(steps, mixed.advance_ragged(steps)):
        log_probs, new_state = mixed.advance(tokens, state)
        history = new_state[-1, :, : memory.width].numpy().astype(np.int64)
        memory_p, longest = memory.probabilities(history)
        w = weights[int(longest[0])]
        expected = w * np.log(np.maximum(memory_p[0], 1e-30)) + (1 - w) * network.advance(tokens, state)[0][0].numpy()
        expected -= np.logaddexp.reduce(expected)
        np.testing.assert_allclose(log_probs[0].numpy(), expected, atol=1e-4)
        torch.testing.assert_close(ragged_log_probs, log_probs)
        assert abs(float(log_probs.exp().sum()) - 1.0) < 1e-4


def test_an_unknown_mixing_rule_is_refused(word_memory):
    tokenizer, _, memory = word_memory
    with pytest.raises(ValueError, match="unknown mixing rule 'geometric'; choose one of linear, log-linear"):
        MixedModel(Uniform(tokenizer.vocab_size), MemoryModel(memory), [0.5] * memory.order, "geometric")


def test_em_recovers_the_weights_of_a_synthetic_mixture():
    rng = np.random.default_rng(0)
    truth = [0.1, 0.4, 0.8]
    p_memory, p_network = np.array([0.7, 0.2, 0.1]), np.array([0.1, 0.3, 0.6])  # two sources over 3 tokens
    seen = rng.integers(0, 3, 100_000)
    from_memory = rng.random(len(seen)) < np.array(truth)[seen]
    tokens = np.where(from_memory, rng.choice(3, len(seen), p=p_memory), rng.choice(3, len(seen), p=p_network))
    evidence = Evidence(network=p_network[tokens], memory=p_memory[tokens], seen=seen)
    weights = fit_weights(evidence, order=3, iterations=200)
    assert weights == pytest.approx(truth, abs=0.02)


def test_a_session_answers_as_suggest_with_the_mix_on(tiny_word_model):
    from service.model.artifact import load_artifact
    from service.model.steps import ScriptedModel
    from tests.service.test_tiny_models import same

    artifact = load_artifact(tiny_word_model)
    assert artifact.memory is not None
    network = ScriptedModel(artifact.model, artifact.tokenizer.vocab_size)
    mixed = served_model(network, artifact)
    assert isinstance(mixed, MixedModel)
    suggester = Suggester(mixed, artifact.tokenizer)
    session = TypingSession(suggester, max_chars=1000)
    for ch in "the old man likes fresh bread. my friend wants gr":
        session.append(ch)
        same(session.suggest(3), suggester.suggest(session.text, 3))


def test_the_linear_mix_of_a_real_network_adds_its_probabilities_to_the_memorys(tiny_word_model):
    """A scripted network gives the linear mix its probabilities directly (one softmax): the served
    distribution is still w * P_memory + (1 - w) * P_network, alone and in a ragged batch."""
    from service.model.artifact import load_artifact
    from service.model.steps import ScriptedModel

    artifact = load_artifact(tiny_word_model)
    network = ScriptedModel(artifact.model, artifact.tokenizer.vocab_size)
    weights = np.linspace(0.2, 0.9, artifact.memory.order).tolist()  # a different weight per context seen
    mixed = MixedModel(network, MemoryModel(artifact.memory), weights, "linear")
    texts = ["the old man", "she cook", "my friend wants", "the"]
    steps = [(torch.tensor([[BOS, *artifact.tokenizer.encode(text)]]), mixed.init_state(1)) for text in texts]
    for (tokens, state), (ragged_log_probs, ragged_state) in zip(steps, mixed.advance_ragged(steps)):
        log_probs, new_state = mixed.advance(tokens, state)
        network_log_probs, _ = network.advance(tokens, state[:-1])
        probabilities, _ = network.advance(tokens, state[:-1], probabilities=True)
        torch.testing.assert_close(probabilities, network_log_probs.exp())
        history = new_state[-1, :, : artifact.memory.width].numpy().astype(np.int64)
        memory_p, longest = artifact.memory.probabilities(history)
        w = weights[int(longest[0])]
        expected = w * memory_p[0] + (1 - w) * network_log_probs[0].exp().numpy()
        np.testing.assert_allclose(log_probs[0].exp().numpy(), expected, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(ragged_log_probs, log_probs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ragged_state, new_state)
