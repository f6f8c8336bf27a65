"""int8 weights (training/int8.py): close to float, a row's answer independent of its batch, every cell and
input, and files written before them (torch.ao's dynamic quantisation) still served."""

import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from service.model.artifact import load_artifact
from tests.conftest import ROOT
from training.int8 import Int8Linear, eager_network, quantize_int8, torch_ao_int8, write_int8
from training.model import LanguageModel, ModelConfig


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def test_int8_linear_is_close_to_float_for_any_shape_and_clips_past_its_bound():
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 40) * 0.1, torch.randn(96)
    layer = torch.jit.script(Int8Linear(weight, bias, bound=1.0))
    x = torch.rand(2, 5, 40) * 2 - 1
    assert layer(x).shape == (2, 5, 96)
    assert relative_error(layer(x), F.linear(x, weight, bias)) < 0.02
    assert layer(torch.zeros(0, 40)).shape == (0, 96)  # no rows: no product
    assert relative_error(layer(x * 3), F.linear((x * 3).clamp(-1, 1), weight, bias)) < 0.02  # clipped


def test_a_rows_answer_does_not_depend_on_the_rows_batched_with_it():
    torch.manual_seed(1)
    weight = torch.randn(64, 32) * 0.1
    layer = torch.jit.script(Int8Linear(weight, None, bound=1.0))
    row = torch.rand(1, 32) * 0.1  # small values beside a large one: a scale taken per batch would change
    batch = torch.cat([row, torch.ones(1, 32)])
    torch.testing.assert_close(layer(batch)[:1], layer(row), rtol=0, atol=0)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("input_kind", ["embedding", "onehot"])
def test_int8_network_of_every_cell_and_input_scripts_and_stays_close_to_float(cell, input_kind):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=200, cell=cell, input=input_kind, hidden_size=48, embedding_size=48)
    model = LanguageModel(config).eval()
    scripted = torch.jit.script(quantize_int8(model, cell))
    tokens = torch.randint(0, 200, (3, 9))
    state = model.init_state(3)
    with torch.no_grad():
        expected, expected_state = model(tokens, state)
        logits, new_state = scripted(tokens, state)
        last, last_state = scripted.forward_last(tokens, state)
        empty, _ = scripted.forward_last(tokens[:0], model.init_state(0))
    assert relative_error(logits, expected) < 0.05
    assert relative_error(new_state, expected_state) < 0.05
    torch.testing.assert_close(last, logits[:, -1])
    torch.testing.assert_close(last_state, new_state)
    assert empty.shape == (0, 200)
    stepped, step_state = [], state
    with torch.no_grad():
        for t in range(tokens.size(1)):  # one position at a time: an LSTM's or RNN's step is one product
            out, step_state = scripted.forward_last(tokens[:, t : t + 1], step_state)
            stepped.append(out)
    torch.testing.assert_close(torch.stack(stepped, dim=1), logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step_state, new_state, atol=1e-4, rtol=1e-4)
    assert not any(p.is_quantized for p in scripted.state_dict().values())  # plain tensors, no torch.ao types


LOAD_AND_STEP = (
    "import sys, torch\n"
    "from service.model.artifact import load_artifact\n"
    "a = load_artifact(sys.argv[1])\n"
    "logits, _ = a.model.forward_last(torch.tensor([[5, 6]]), a.model.init_state(1))\n"
    "print(tuple(logits.shape))\n"
)


@pytest.mark.slow
def test_int8_file_loads_without_warnings_and_files_of_torch_ao_int8_still_serve(tiny_word_model, tmp_path, caplog):
    from service.api.config import ServerConfig
    from service.model.engine import Engine

    artifact = load_artifact(tiny_word_model)
    model, cell = eager_network(artifact)
    int8 = write_int8(artifact, quantize_int8(model, cell), str(tmp_path / "int8.pt"))
    old = write_int8(artifact, torch_ao_int8(model), str(tmp_path / "torch-ao.pt"))  # as files were written before
    outputs = {}
    for name, path in (("int8", int8), ("torch.ao", old)):
        result = subprocess.run([sys.executable, "-c", LOAD_AND_STEP, path], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        outputs[name] = result
    assert outputs["int8"].stdout.strip() == f"(1, {artifact.tokenizer.vocab_size})"
    assert "deprecated" not in outputs["int8"].stderr, outputs["int8"].stderr
    assert "deprecated" in outputs["torch.ao"].stderr  # torch's own warning, which the new files no longer cause
    for path in (int8, old):
        with caplog.at_level(logging.WARNING, logger="nextword"):
            engine = Engine.load(ServerConfig(model=path, metrics_port=0))
        assert engine.suggester.suggest("we ", 3).suggestions
    advice = [r.getMessage() for r in caplog.records if "torch.ao's format" in r.getMessage()]
    assert advice == [
        f"{old}: int8 weights in torch.ao's format, which torch deprecates (its warning above); it "
        "serves as before. Export it again with --quantize int8 for nextword's own int8 layers"
    ]
