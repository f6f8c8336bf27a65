"""DropConnect on the recurrent weights while training (``nextword-train --weight-drop P``).

Each training window, every hidden-to-hidden weight matrix is masked: a fraction P of its entries is
zeroed and the rest scaled by 1 / (1 - P), one mask per window, shared by every position and every row of
the batch. Dropout on activations cannot regularise the recurrence itself without disturbing the state
carried from step to step; a dropped weight leaves the state alone and thins the connections instead.

The mask is applied to the weights in place for the forward and backward passes, so the layers keep
their own kernels (PyTorch's fused LSTM); the gradient of the masked weight is then masked the same way
(the chain rule through ``W * mask / (1 - P)``) and the weights are put back before the optimizer steps.
Evaluation and export never see a mask. The masks come from a generator seeded by the run's seed and
the step, so every process of a distributed run draws the same mask (their gradients are averaged) and
a resumed run draws the masks it would have drawn.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from training.model import LanguageModel


def recurrent_weights(model: LanguageModel) -> list[nn.Parameter]:
    """The hidden-to-hidden weight of every layer, first to last."""
    weights = []
    for layer in [model.first, *model.rest]:
        rnn = getattr(layer, "rnn", None)
        weights.append(rnn.weight_hh_l0 if rnn is not None else layer.weight_hh)
    return weights


@contextmanager
def dropped_weights(model: LanguageModel, p: float, seed: int, step: int):
    """Within the block the recurrent weights are masked; leaving it masks their gradients and restores them."""
    if p <= 0.0:
        yield
        return
    weights = recurrent_weights(model)
    generator = torch.Generator(device=weights[0].device).manual_seed(seed * 1_000_003 + step)
    kept = [w.detach().clone() for w in weights]
    masks = [torch.empty_like(w).bernoulli_(1.0 - p, generator=generator).div_(1.0 - p) for w in weights]
    with torch.no_grad():
        for w, mask in zip(weights, masks, strict=True):
            w.mul_(mask)
    try:
        yield
    finally:
        with torch.no_grad():
            for w, mask, original in zip(weights, masks, kept, strict=True):
                if w.grad is not None:
                    w.grad.mul_(mask)
                w.copy_(original)
