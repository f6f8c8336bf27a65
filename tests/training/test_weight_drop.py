import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from training.model import LanguageModel, ModelConfig
from training.weight_drop import dropped_weights, recurrent_weights


def small_model(cell="lstm", input="embedding"):
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=30, cell=cell, input=input, num_layers=2, hidden_size=16, embedding_size=16, dropout=0.0
    )
    return LanguageModel(config)


def loss_of(model, tokens, weights=None):
    state = model.zero_state(tokens.size(0))
    logits, _ = functional_call(model, weights, (tokens, state)) if weights else model(tokens, state)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


@pytest.mark.parametrize("cell,input", [("lstm", "embedding"), ("gru", "onehot")])
def test_a_masked_step_has_the_masked_gradient_and_leaves_the_weights_as_they_were(cell, input):
    model = small_model(cell, input)
    tokens = torch.randint(0, 30, (4, 12), generator=torch.Generator().manual_seed(1))
    names = {id(p): n for n, p in model.named_parameters()}
    weights = recurrent_weights(model)
    assert len(weights) == 2 and all(w.shape[1] == 16 for w in weights)
    before = [w.detach().clone() for w in weights]
    with dropped_weights(model, 0.5, seed=3, step=7):
        masks = [(w.detach() / b) for w, b in zip(weights, before, strict=True)]
        loss_of(model, tokens).backward()
    for w, b, mask in zip(weights, before, masks, strict=True):
        assert torch.equal(w.detach(), b)  # put back: the optimizer steps from the real weights
        assert set(mask.unique().tolist()) <= {0.0, 2.0}  # dropped, or kept and scaled by 1 / (1 - p)
        assert 0.35 < (mask == 0).float().mean().item() < 0.65
        assert torch.all(w.grad[mask == 0] == 0)
    # the gradient is that of the loss through W * mask, taken with respect to W
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    masked = dict(leaves)
    for w, mask in zip(weights, masks, strict=True):
        masked[names[id(w)]] = leaves[names[id(w)]] * mask
    loss_of(model, tokens, masked).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, leaves[name].grad, msg=name)


def test_the_mask_follows_the_seed_and_the_step_and_p_zero_leaves_everything_alone():
    model = small_model()
    first = recurrent_weights(model)[0]
    original = first.detach().clone()

    def drawn(seed, step, p=0.4):
        with dropped_weights(model, p, seed=seed, step=step):
            return first.detach().clone()

    assert torch.equal(drawn(0, 5), drawn(0, 5))  # every process, and a resumed run, draws the same mask
    assert not torch.equal(drawn(0, 5), drawn(0, 6))
    assert not torch.equal(drawn(0, 5), drawn(1, 5))
    assert torch.equal(drawn(0, 5, p=0.0), original)
    assert torch.equal(first.detach(), original)


def test_training_with_weight_drop_masks_its_steps_and_saves_the_setting(tmp_path):
    import json

    from tests.conftest import TINY_EN, train_tiny
    from training.checkpoint import load_checkpoint

    runs = {}
    for p in ("0", "0.5"):
        out = train_tiny(
            str(tmp_path / p), TINY_EN, "--tokenizer", "char", "--dropout", "0", "--max-steps", "3", "--weight-drop", p
        )
        with open(f"{out}/config.json") as handle:
            assert json.load(handle)["train"]["weight_drop"] == float(p)
        runs[p] = load_checkpoint(out)["model"]
    # the same seed and data: only the masks set the two runs apart, in every layer's weights
    assert all(not torch.equal(runs["0"][name], runs["0.5"][name]) for name in runs["0"] if "weight" in name)
