"""Steps of different lengths in one forward (service/model/steps.py): the same answers as one call per step."""

import pytest
import torch

from service.model.hardware import ThreadPlan
from service.model.steps import PackedNetwork, ScriptedModel, advance_ragged
from training.model import LanguageModel, ModelConfig


def scripted(cell: str, input: str = "embedding") -> ScriptedModel:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=31, cell=cell, input=input, num_layers=2, hidden_size=16, embedding_size=12, dropout=0.0
    )
    model = LanguageModel(config).eval()
    return ScriptedModel(torch.jit.script(model), config.vocab_size)


def ragged_steps(model, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Contexts, beams and keystrokes as a batch holds them: 1 to 3 rows, 1 to 9 tokens, varied states."""
    generator = torch.Generator().manual_seed(seed)
    steps = []
    for i in range(14):
        rows, length = 1 + i % 3, 1 + (i * 5) % 9
        tokens = torch.randint(4, model.vocab_size, (rows, length), generator=generator)
        state = model.init_state(rows) + 0.3 * torch.randn(model.init_state(rows).shape, generator=generator)
        steps.append((tokens, state))
    return steps


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_packed_rows_of_different_lengths_equal_one_call_per_step(cell):
    model = scripted(cell)
    assert model._packed is not None  # this layout is read packed, not per length
    steps = ragged_steps(model)
    results = model.advance_ragged(steps)
    assert len(results) == len(steps)
    for (tokens, state), (log_probs, new_state) in zip(steps, results):
        expected_log_probs, expected_state = model.advance(tokens, state)
        assert log_probs.shape == (tokens.size(0), model.vocab_size)
        torch.testing.assert_close(log_probs, expected_log_probs, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(new_state, expected_state, atol=1e-5, rtol=1e-4)


def test_a_one_hot_network_is_run_per_length_with_the_same_answers():
    model = scripted("lstm", input="onehot")
    assert PackedNetwork.of(model.module) is None
    steps = ragged_steps(model, seed=1)
    for (tokens, state), (log_probs, new_state) in zip(steps, advance_ragged(model, steps)):
        expected_log_probs, expected_state = model.advance(tokens, state)
        torch.testing.assert_close(log_probs, expected_log_probs)
        torch.testing.assert_close(new_state, expected_state)


def test_the_mix_reads_ragged_steps_as_it_reads_each_step(tiny_word_model):
    from service.model.artifact import load_artifact
    from service.model.mix import MixedModel, served_model

    artifact = load_artifact(tiny_word_model)
    mixed = served_model(ScriptedModel(artifact.model, artifact.tokenizer.vocab_size), artifact)
    assert isinstance(mixed, MixedModel)
    generator = torch.Generator().manual_seed(2)
    steps = []
    for i in range(10):
        rows, length = 1 + i % 2, 1 + (i * 3) % 7
        state = mixed.init_state(rows)
        _, state = mixed.advance(torch.randint(4, mixed.vocab_size, (rows, 3), generator=generator), state)
        steps.append((torch.randint(4, mixed.vocab_size, (rows, length), generator=generator), state))
    for (tokens, state), (log_probs, new_state) in zip(steps, mixed.advance_ragged(steps)):
        expected_log_probs, expected_state = mixed.advance(tokens, state)
        torch.testing.assert_close(log_probs, expected_log_probs, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(new_state, expected_state, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_a_model_on_one_intra_op_thread_runs_atens_recurrent_kernels_with_onednns_answers(cell):
    """The thread plan picks ATen's RNN kernels for a model run on one intra-op thread and leaves torch's
    default (oneDNN) for more (service/model/hardware.py): for speed alone, so the answers are oneDNN's."""
    previous = torch.backends.mkldnn.enabled
    try:
        torch.backends.mkldnn.enabled = True
        ThreadPlan(worker=2, others=1).choose_rnn_kernels()
        ThreadPlan(worker=None, others=None).choose_rnn_kernels()
        assert torch.backends.mkldnn.enabled
        model = scripted(cell)
        steps = ragged_steps(model, seed=2)
        onednn = [model.advance(tokens, state) for tokens, state in steps]
        ThreadPlan(worker=1, others=1).choose_rnn_kernels()
        assert not torch.backends.mkldnn.enabled
        aten = [model.advance(tokens, state) for tokens, state in steps]
    finally:
        torch.backends.mkldnn.enabled = previous
    for (log_probs, state), (expected_log_probs, expected_state) in zip(aten, onednn):
        torch.testing.assert_close(log_probs, expected_log_probs, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(state, expected_state, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("cores", "gpu_gib", "cpu", "cuda"),
    [(1, 141, 1, 1), (2, 141, 2, 2), (16, 141, 4, 16), (64, 141, 4, 16), (16, 16, 4, 8), (8, 3, 4, 1)],
)
def test_the_default_worker_count_follows_the_cores_the_device_and_its_memory(monkeypatch, cores, gpu_gib, cpu, cuda):
    """A copy of the model per core on the CPU, up to 4; on CUDA one per core, up to 16 and one per 2 GiB of
    the GPU's memory (docs/performance.md)."""
    from service.model import hardware

    monkeypatch.setattr(hardware, "usable_cores", lambda: cores)
    monkeypatch.setattr(hardware, "gpu_memory", lambda: gpu_gib << 30)
    assert (hardware.default_workers("cpu"), hardware.default_workers("cuda")) == (cpu, cuda)
