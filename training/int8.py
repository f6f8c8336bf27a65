"""int8 weights for CPU serving, on oneDNN's int8 matrix product (``torch.ops.onednn.qlinear_pointwise``).

Each weight matrix is stored as plain int8 rows with one float scale per row (symmetric: the row's
largest magnitude maps to 127). Each product's input is quantised to uint8 (zero point 128) with a
scale fixed at export: every input the network multiplies is bounded, since a recurrent layer's
output (an LSTM's, a GRU's, a tanh RNN's) lies in [-1, 1], and the first layer's input is a row of
the embedding, whose largest magnitude is known. A fixed scale keeps each row's answer
independent of the rows batched with it, and costs no pass over the input to find one. oneDNN
multiplies uint8 by int8, adds the bias and scales back to float in one call; its blocked copy of
the weights is made at a layer's first call in the process and is not part of the file.
Embeddings, biases, the start state and the n-gram memory stay float.

No quantised tensor type is involved (``torch.quantize_per_tensor`` and the packed parameters of
``torch.ao``'s dynamic quantisation, which torch deprecates), so a file loads without warnings, and
its weights are ordinary buffers that the file's checksum reads like any other. The recurrent
layers run as ``Recurrence``s (training/model.py): the input gates of all positions in one product,
the hidden state's at each step; an LSTM's or a tanh RNN's step of one position (a keystroke, a
generated token) is one product of [input | h]. Measured against float and the earlier torch.ao files:
``python -m benchmarks.int8`` (docs/performance.md).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from service.model.artifact import Artifact, write_artifact
from training.model import LanguageModel, ModelConfig, OneHotLayer, Recurrence

LEVELS = 127  # symmetric int8 weights: -127..127; inputs: 128 - 127..128 + 127 in uint8
RECURRENT_BOUND = 1.0  # |output| of an LSTM, GRU or tanh RNN layer: every input but the embedding's


def quantize_rows(weight: Tensor, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """[N, K] float -> int8 [N, K] and a float scale per row [N] (weight ≈ int8 * scale); by default each
    row's own scale (its largest magnitude maps to 127)."""
    if scale is None:
        scale = weight.detach().abs().amax(dim=1).clamp_min(1e-12) / LEVELS
    q = torch.round(weight.detach() / scale[:, None]).clamp(-LEVELS, LEVELS).to(torch.int8)
    return q, scale.to(torch.float32)


class Int8Linear(nn.Module):
    """``F.linear`` with int8 weights, for inputs within ``[-bound, bound]`` (larger ones are clipped);
    ``scale``: the rows' scales, when they are chosen for more than this product (by default its own)."""

    if TYPE_CHECKING:  # for the type checker only: TorchScript reads class annotations as attribute types
        weight: Tensor  # buffers (register_buffer below)
        scale: Tensor
        bias: Tensor

    def __init__(self, weight: Tensor, bias: Tensor | None, bound: float, scale: Tensor | None = None) -> None:
        super().__init__()
        q, scale = quantize_rows(weight, scale)
        self.out_features = int(weight.size(0))
        self.register_buffer("weight", q)  # [N, K]
        self.register_buffer("scale", scale)  # [N]
        zeros = torch.zeros(self.out_features, dtype=torch.float32)
        self.register_buffer("bias", zeros if bias is None else bias.detach().to(torch.float32).clone())
        step = max(float(bound), 1e-12) / LEVELS
        self.register_buffer("input_step", torch.tensor(step, dtype=torch.float32))  # the inputs' scale
        self.input_gain = 1.0 / step
        # x -> x / step + 128, rounded: 128.5 added, then truncated by the cast (every value is positive)
        self.input_offset = torch.tensor(128.5, dtype=torch.float32)
        self.input_zero = torch.tensor(128, dtype=torch.int32)
        self.weight_zero = torch.zeros(self.out_features, dtype=torch.int32)
        self.packed = torch.empty(0, dtype=torch.int8)  # oneDNN's copy of the weights, made at the first call

    def quantize(self, rows: Tensor) -> Tensor:
        """[M, K] float -> [M, K] uint8: each value / input_step + 128, rounded, clipped to 0..255."""
        return torch.clamp(torch.add(self.input_offset, rows, alpha=self.input_gain), 0.0, 255.0).to(torch.uint8)

    def product(self, q: Tensor, packed: Tensor, bias: Tensor) -> Tensor:
        """oneDNN's int8 product of quantised rows [M, K] and ``packed`` weights with this layer's scales."""
        return torch.ops.onednn.qlinear_pointwise(
            q, self.input_step, self.input_zero, packed, self.scale, self.weight_zero, bias,
            1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        if self.packed.numel() == 0:
            self.packed = torch.ops.onednn.qlinear_prepack(self.weight, None)
        shape = list(x.shape[:-1])
        shape.append(self.out_features)
        rows = x.reshape(-1, x.size(-1))
        if rows.size(0) == 0:
            return torch.zeros(shape, dtype=torch.float32, device=x.device)
        return self.product(self.quantize(rows), self.packed, self.bias).reshape(shape)


class Int8Layer(Recurrence):
    """A recurrent layer (any cell) with int8 input and hidden weights.

    An LSTM's or a tanh RNN's input and hidden rows share one scale per gate (the input's folded in: its rows
    are scaled by its bound), so that a step of one position is one product of [input | h] by [W_ih | W_hh],
    where a longer input takes one product for all its positions and then one per step.
    """

    def __init__(self, cell: str, rnn: nn.RNNBase, input_bound: float) -> None:
        super().__init__(cell, rnn.hidden_size)
        weights = dict(rnn.named_parameters())
        w_ih, w_hh = weights["weight_ih_l0"].detach(), weights["weight_hh_l0"].detach()
        self.fused = cell != "gru"  # a GRU's hidden gates are not summed with the input's
        shared = None
        if self.fused:
            largest = torch.maximum(w_ih.abs().amax(dim=1) * input_bound, w_hh.abs().amax(dim=1))
            shared = largest.clamp_min(1e-12) / LEVELS
        bound = max(float(input_bound), 1e-12)
        self.ih = Int8Linear(w_ih, weights.get("bias_ih_l0"), bound, None if shared is None else shared / bound)
        self.hh = Int8Linear(w_hh, weights.get("bias_hh_l0"), RECURRENT_BOUND, shared)
        self.both = torch.empty(0, dtype=torch.int8)  # oneDNN's copy of [W_ih | W_hh], made at the first step
        self.both_bias = torch.empty(0)

    def input_gates(self, x: Tensor) -> Tensor:
        return self.ih(x)

    def hidden_gates(self, h: Tensor) -> Tensor:
        return self.hh(h)

    def forward(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        if not self.fused or x.size(1) != 1 or x.size(0) == 0:
            return self.recur(self.input_gates(x), state)
        if self.both.numel() == 0:
            self.both = torch.ops.onednn.qlinear_prepack(torch.cat([self.ih.weight, self.hh.weight], dim=1), None)
            self.both_bias = self.ih.bias + self.hh.bias
        H = self.hidden_size
        h = state[:, :H]
        # x / bound and h share the hidden product's step, 1 / 127: one product of [x | h]
        q = torch.cat([self.ih.quantize(x[:, 0]), self.hh.quantize(h)], dim=1)
        h, c = self.summed_step(self.hh.product(q, self.both, self.both_bias), state[:, H:])
        return h.unsqueeze(1), torch.cat([h, c], dim=1) if self.cell == "lstm" else h


class Int8OneHotLayer(Recurrence):
    """The one-hot first layer with int8 hidden weights; its input rows stay float (a gather)."""

    if TYPE_CHECKING:  # for the type checker only: TorchScript reads class annotations as attribute types
        input_weight: Tensor  # buffers (register_buffer below)
        bias_ih: Tensor

    def __init__(self, layer: OneHotLayer) -> None:
        super().__init__(layer.cell, layer.hidden_size)
        self.register_buffer("input_weight", layer.input_weight.detach().clone())
        self.register_buffer("bias_ih", layer.bias_ih.detach().clone())
        self.hh = Int8Linear(layer.weight_hh, layer.bias_hh, RECURRENT_BOUND)

    def input_gates(self, x: Tensor) -> Tensor:
        return torch.nn.functional.embedding(x, self.input_weight) + self.bias_ih

    def hidden_gates(self, h: Tensor) -> Tensor:
        return self.hh(h)


def _int8_layer(cell: str, layer: nn.Module, input_bound: float) -> Recurrence:
    if isinstance(layer, OneHotLayer):
        return Int8OneHotLayer(layer)
    rnn = getattr(layer, "rnn", None)
    if not isinstance(rnn, nn.RNNBase) or rnn.num_layers != 1 or rnn.bidirectional:
        raise TypeError(f"no int8 form for layer {type(layer).__name__}")
    return Int8Layer(cell, rnn, input_bound)


@torch.no_grad()
def quantize_int8(model: LanguageModel, cell: str) -> LanguageModel:
    """A copy of ``model`` whose recurrent layers and decoder hold int8 weights (CPU only)."""
    quantized = copy.deepcopy(model).eval()
    embedding = getattr(model.embedding, "weight", None)  # None: one-hot input (its rows stay float)
    bound = float(embedding.detach().abs().max()) if embedding is not None else RECURRENT_BOUND
    quantized.first = _int8_layer(cell, quantized.first, bound)
    quantized.rest = nn.ModuleList([_int8_layer(cell, layer, RECURRENT_BOUND) for layer in quantized.rest])
    quantized.add_module("decoder", Int8Linear(model.decoder.weight, model.decoder.bias, RECURRENT_BOUND))
    return quantized


def eager_network(artifact: Artifact) -> tuple[LanguageModel, str]:
    """A float model file's network as an eager module, and its cell: what its int8 forms are made of."""
    config = ModelConfig(**artifact.manifest.network)
    model = LanguageModel(config)
    model.load_weights(artifact.model.state_dict())
    return model.eval(), config.cell


def torch_ao_int8(model: LanguageModel) -> nn.Module:
    """What ``--quantize int8`` wrote before these layers: torch.ao's dynamic quantisation, which torch
    deprecates; made only to compare with it and to check that such files still serve."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            model, {torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN, torch.nn.Linear}, dtype=torch.qint8
        )


def write_int8(artifact: Artifact, module: nn.Module, path: str) -> str:
    """``module`` (an int8 form of the artifact's network) scripted and written to ``path`` with the artifact's
    manifest, tokenizer and memory."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(module)
    manifest = replace(artifact.manifest, quantization="int8")
    write_artifact(path, scripted, manifest, artifact.tokenizer, memory=artifact.memory)
    return path
