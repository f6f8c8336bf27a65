import pytest
import torch
import torch.nn.functional as F

from training.model import LanguageModel, ModelConfig, line_start_state

CELLS = ["lstm", "gru", "rnn"]


def make(cell, input="embedding", layers=2, **kw):
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=23, cell=cell, input=input, num_layers=layers, hidden_size=16, embedding_size=16, dropout=0.0, **kw
    )
    return LanguageModel(config).eval()


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("input", ["embedding", "onehot"])
def test_shapes(cell, input):
    model = make(cell, input)
    tokens = torch.randint(0, 23, (3, 7))
    logits, state = model(tokens, model.init_state(3))
    assert logits.shape == (3, 7, 23)
    assert state.shape == (2, 3, 32 if cell == "lstm" else 16)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("input", ["embedding", "onehot"])
def test_forward_in_chunks_with_carried_state_equals_one_long_forward(cell, input):
    model = make(cell, input)
    tokens = torch.randint(0, 23, (2, 12))
    whole, whole_state = model(tokens, model.init_state(2))
    state, parts = model.init_state(2), []
    for chunk in tokens.split(5, dim=1):
        logits, state = model(chunk, state)
        parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), whole)
    torch.testing.assert_close(state, whole_state)


@pytest.mark.parametrize("cell", CELLS)
def test_onehot_gather_equals_the_dense_one_hot_product(cell):
    layer = make(cell, "onehot").first
    tokens = torch.randint(0, 23, (4, 6))
    dense = F.one_hot(tokens, 23).float() @ layer.input_weight + layer.bias_ih  # [B, T, V] @ [V, G*H]
    torch.testing.assert_close(layer.input_gates(tokens), dense)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_onehot_layer_matches_pytorch_cell_given_the_same_weights(cell):
    """The hand-written recurrence is the same function as nn.LSTM / nn.GRU."""
    model = make(cell, "onehot", layers=1)
    layer = model.first
    reference = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(23, 16, batch_first=True)
    with torch.no_grad():
        reference.weight_ih_l0.copy_(layer.input_weight.t())
        reference.weight_hh_l0.copy_(layer.weight_hh)
        reference.bias_ih_l0.copy_(layer.bias_ih)
        reference.bias_hh_l0.copy_(layer.bias_hh)
    tokens = torch.randint(0, 23, (2, 5))
    ours, _ = layer(tokens, model.init_state(2)[0])
    theirs, _ = reference(F.one_hot(tokens, 23).float())
    torch.testing.assert_close(ours, theirs)


def test_tied_weights_share_one_tensor():
    model = make("lstm", tie_weights=True)
    assert model.decoder.weight is model.embedding.weight


def test_bad_configs_are_refused_with_reasons():
    with pytest.raises(ValueError, match="tie-weights needs --embedding-size"):
        ModelConfig(vocab_size=10, hidden_size=8, embedding_size=4, tie_weights=True)
    with pytest.raises(ValueError, match="cell must be"):
        ModelConfig(vocab_size=10, cell="transformer")


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("input", ["embedding", "onehot"])
def test_scripts_with_torchscript_and_gives_the_same_logits(cell, input):
    model = make(cell, input)
    scripted = torch.jit.script(model)
    tokens = torch.randint(0, 23, (2, 5))
    torch.testing.assert_close(scripted(tokens, scripted.init_state(2))[0], model(tokens, model.init_state(2))[0])


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("input", ["embedding", "onehot"])
def test_forward_last_is_the_last_position_of_forward_eager_and_scripted(cell, input):
    model = make(cell, input)
    tokens = torch.randint(0, 23, (3, 9))
    state = torch.randn(model.init_state(3).shape)
    logits, new_state = model(tokens, state)
    for module in (model, torch.jit.script(model)):
        last, last_state = module.forward_last(tokens, state)
        assert last.shape == (3, 23)
        torch.testing.assert_close(last, logits[:, -1])
        torch.testing.assert_close(last_state, new_state)


@pytest.mark.parametrize("cell", CELLS)
def test_init_state_is_the_start_state_in_a_new_tensor_eager_and_scripted(cell):
    model = make(cell)
    assert torch.equal(model.init_state(3), torch.zeros(2, 3, model.state_size))  # a new model starts from zeros
    start = torch.randn(2, model.state_size)
    model.start_state.copy_(start)
    for m in (model, torch.jit.script(model)):
        state = m.init_state(3)
        assert state.shape == (2, 3, model.state_size)
        for b in range(3):
            torch.testing.assert_close(state[:, b], start)
        state.add_(1.0)  # the caller owns it: the model's start state is untouched
        torch.testing.assert_close(m.init_state(1)[:, 0], start)
    assert torch.equal(model.zero_state(2), torch.zeros(2, 2, model.state_size))


def test_weights_saved_before_the_start_state_existed_load_with_zeros():
    model = make("lstm")
    old = {k: v for k, v in model.state_dict().items() if k != "start_state"}
    fresh = make("lstm")
    fresh.start_state.fill_(1.0)
    fresh.load_weights(old)
    assert torch.equal(fresh.start_state, torch.zeros_like(fresh.start_state))
    with pytest.raises(RuntimeError):  # anything else missing is still an error
        fresh.load_weights({k: v for k, v in old.items() if k != "decoder.bias"})


@pytest.mark.parametrize("cell", CELLS)
def test_line_start_state_is_the_mean_state_after_each_whole_line(cell):
    model = make(cell)
    model.train()  # dropout is switched off while it reads, and the mode is restored
    lines = [[1, 5, 6, 2], [1, 7, 2], [1, 8, 9, 2], [1, 10, 11, 12, 13, 2]]  # two share a length: one batch
    start = line_start_state(model, lines, count=10)
    assert model.training
    model.eval()
    with torch.no_grad():
        ends = [model(torch.tensor([line]), model.zero_state(1))[1][:, 0] for line in lines]
    torch.testing.assert_close(start, torch.stack(ends).mean(dim=0))
    # a sample of the lines, the same one for the same seed
    torch.testing.assert_close(
        line_start_state(model, lines, count=2, seed=3), line_start_state(model, lines, count=2, seed=3)
    )
    assert torch.equal(line_start_state(model, [], count=2), torch.zeros(2, model.state_size))
