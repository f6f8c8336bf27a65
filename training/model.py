"""The recurrent language model: tokens in, logits and state out.

    tokens [B, T] --input--> x [B, T, E] --layer 1..L--> h [B, T, H] --decoder--> logits [B, T, V]

The state of all layers travels as ONE tensor ``[L, B, K*H]`` (K = 2 for an
LSTM: hidden and cell side by side; K = 1 for GRU and tanh RNN). One tensor per
batch makes it easy for the service to stack and split sequences (dim 1).

The state a line starts from, ``init_state``, is ``start_state``: training reads
its lines as one stream, so the network meets ``<s>`` in the state left by the
line before it, never in the zero state. Training stores the mean of those
states (see ``line_start_state``) and the service starts every text from it;
a model without one (older checkpoints) starts from zeros.

One-hot input multiplies a one-hot vector by the first layer's input weights,
which selects one column of them. We store those weights as ``input_weight``
[V, G*H] (one row per token; G gates) and gather the row instead of doing the
V-wide matrix product; the first layer then runs its recurrence on the
gathered gate inputs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GATES = {"lstm": 4, "gru": 3, "rnn": 1}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    cell: str = "lstm"  # lstm | gru | rnn (tanh)
    input: str = "embedding"  # embedding | onehot
    num_layers: int = 2
    hidden_size: int = 512
    embedding_size: int = 512
    dropout: float = 0.2
    tie_weights: bool = False

    def __post_init__(self) -> None:
        if self.cell not in GATES:
            raise ValueError(f"cell must be one of {sorted(GATES)}, got {self.cell!r}")
        if self.input not in ("embedding", "onehot"):
            raise ValueError(f"input must be embedding or onehot, got {self.input!r}")
        if self.tie_weights and self.input == "onehot":
            raise ValueError("--tie-weights needs --input embedding (one-hot input has no embedding to tie)")
        if self.tie_weights and self.embedding_size != self.hidden_size:
            raise ValueError(
                f"--tie-weights needs --embedding-size equal to --hidden-size "
                f"(got {self.embedding_size} and {self.hidden_size})"
            )

    @property
    def state_size(self) -> int:
        return self.hidden_size * (2 if self.cell == "lstm" else 1)

    def to_dict(self) -> dict:
        return asdict(self)


class LSTMLayer(nn.Module):
    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.rnn = nn.LSTM(input_size, hidden_size, batch_first=True)

    def forward(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        # state [B, 2H] -> h, c [1, B, H]
        h, c = state.unsqueeze(0).split(self.hidden_size, dim=2)
        out, (h, c) = self.rnn(x, (h.contiguous(), c.contiguous()))
        return out, torch.cat([h, c], dim=2).squeeze(0)


class GRULayer(nn.Module):
    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.rnn = nn.GRU(input_size, hidden_size, batch_first=True)

    def forward(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        out, h = self.rnn(x, state.unsqueeze(0).contiguous())
        return out, h.squeeze(0)


class TanhRNNLayer(nn.Module):
    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.rnn = nn.RNN(input_size, hidden_size, nonlinearity="tanh", batch_first=True)

    def forward(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        out, h = self.rnn(x, state.unsqueeze(0).contiguous())
        return out, h.squeeze(0)


class Recurrence(nn.Module):
    """A recurrent layer stepped in TorchScript, one position at a time: the gate inputs of every
    position come from ``input_gates`` at once, the hidden state's from ``hidden_gates`` at each step.

    Gate order follows PyTorch's cells: LSTM (i, f, g, o), GRU (r, z, n). The one-hot first layer
    and the int8 layers (training/int8.py) are recurrences; the other float layers run PyTorch's own.
    """

    def __init__(self, cell: str, hidden_size: int) -> None:
        super().__init__()
        self.cell = cell
        self.hidden_size = hidden_size

    def input_gates(self, x: Tensor) -> Tensor:  # [B, T, ...] -> [B, T, G*H], the input bias included
        raise NotImplementedError

    def hidden_gates(self, h: Tensor) -> Tensor:  # [B, H] -> [B, G*H], the hidden bias included
        raise NotImplementedError

    def forward(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        return self.recur(self.input_gates(x), state)

    def recur(self, x_gates: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """From the input gates of every position [B, T, G*H] and the state: the outputs and the new state."""
        H = self.hidden_size
        h = state[:, :H]
        c = state[:, H:]
        outputs: list[Tensor] = []
        for t in range(x_gates.size(1)):
            h, c = self.step(x_gates[:, t], self.hidden_gates(h), h, c)
            outputs.append(h)
        new_state = torch.cat([h, c], dim=1) if self.cell == "lstm" else h
        return torch.stack(outputs, dim=1), new_state

    def step(self, x_t: Tensor, h_gates: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """One position: the new h and c (c is unused but by an LSTM)."""
        if self.cell == "gru":
            x_r, x_z, x_n = x_t.chunk(3, dim=1)
            h_r, h_z, h_n = h_gates.chunk(3, dim=1)
            r = torch.sigmoid(x_r + h_r)
            z = torch.sigmoid(x_z + h_z)
            n = torch.tanh(x_n + r * h_n)
            return (1.0 - z) * n + z * h, c
        return self.summed_step(x_t + h_gates, c)

    def summed_step(self, gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """One position of an LSTM or a tanh RNN from its summed gates (input and hidden): the new h and c."""
        if self.cell == "lstm":
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        return torch.tanh(gates), c


class OneHotLayer(Recurrence):
    """First layer for one-hot input: gathers input-weight rows, then recurs."""

    def __init__(self, cell: str, vocab_size: int, hidden_size: int) -> None:
        super().__init__(cell, hidden_size)
        gates = GATES[cell] * hidden_size
        bound = hidden_size**-0.5
        self.input_weight = nn.Parameter(torch.empty(vocab_size, gates).uniform_(-bound, bound))
        self.weight_hh = nn.Parameter(torch.empty(gates, hidden_size).uniform_(-bound, bound))
        self.bias_ih = nn.Parameter(torch.empty(gates).uniform_(-bound, bound))
        self.bias_hh = nn.Parameter(torch.empty(gates).uniform_(-bound, bound))

    def input_gates(self, x: Tensor) -> Tensor:
        # x is the tokens [B, T]: one_hot(tokens) @ input_weight == input_weight[tokens], a gather
        return F.embedding(x, self.input_weight) + self.bias_ih

    def hidden_gates(self, h: Tensor) -> Tensor:
        return F.linear(h, self.weight_hh, self.bias_hh)


_LAYERS = {"lstm": LSTMLayer, "gru": GRULayer, "rnn": TanhRNNLayer}


class LanguageModel(nn.Module):
    if TYPE_CHECKING:  # for the type checker only: TorchScript reads class annotations as attribute types
        start_state: Tensor  # a buffer [L, S] (register_buffer below)
        embedding: nn.Module
        first: nn.Module

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_layers = config.num_layers
        self.state_size = config.state_size
        self.vocab_size = config.vocab_size
        self.onehot = config.input == "onehot"
        H = config.hidden_size
        if self.onehot:
            self.embedding = nn.Identity()  # unused: the first layer gathers its own weights
            self.first = OneHotLayer(config.cell, config.vocab_size, H)
        else:
            self.embedding = nn.Embedding(config.vocab_size, config.embedding_size)
            self.first = _LAYERS[config.cell](config.embedding_size, H)
        self.rest = nn.ModuleList([_LAYERS[config.cell](H, H) for _ in range(config.num_layers - 1)])
        self.dropout = nn.Dropout(config.dropout)
        self.decoder = nn.Linear(H, config.vocab_size)
        if config.tie_weights:
            self.decoder.weight = self.embedding.weight  # type: ignore[assignment] # [V, H] shared with the input
        # where each line starts (see the module docstring); not a weight, so it stays float when the
        # layers are quantised, and it gives the states their dtype and device
        self.register_buffer("start_state", torch.zeros(config.num_layers, self.state_size))
        self._init_weights(config)

    def _init_weights(self, config: ModelConfig) -> None:
        if not self.onehot:
            nn.init.uniform_(self.embedding.weight, -0.1, 0.1)  # type: ignore[arg-type]
        nn.init.zeros_(self.decoder.bias)
        if not config.tie_weights:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    @torch.jit.export
    def init_state(self, batch_size: int) -> Tensor:
        """The state a line starts from, [L, batch_size, S] (a new tensor)."""
        return self.start_state.unsqueeze(1).repeat(1, batch_size, 1)

    def zero_state(self, batch_size: int) -> Tensor:
        """All zeros, [L, batch_size, S]: where training's stream starts."""
        return self.start_state.new_zeros(self.num_layers, batch_size, self.state_size)

    def load_weights(self, weights: dict[str, Tensor]) -> None:
        """load_state_dict that accepts checkpoints written before ``start_state`` existed (zeros)."""
        weights = dict(weights)
        weights.setdefault("start_state", torch.zeros_like(self.start_state))
        self.load_state_dict(weights)

    def forward(self, tokens: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """tokens [B, T] int64, state [L, B, S] -> logits [B, T, V], state [L, B, S]."""
        x, new_state = self.encode(tokens, state)
        return self.decoder(self.dropout(x)), new_state

    @torch.jit.export
    def forward_last(self, tokens: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """Like forward, with the logits of the last position only: [B, V].

        What serving needs: the decoder (V x H, most of the work for a small model)
        runs once per sequence instead of once per token.
        """
        x, new_state = self.encode(tokens, state)
        return self.decoder(self.dropout(x[:, -1])), new_state

    def encode(self, tokens: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """tokens [B, T], state [L, B, S] -> the last layer's outputs [B, T, H], state [L, B, S]."""
        if self.onehot:
            x, first_state = self.first(tokens, state[0])
        else:
            x, first_state = self.first(self.dropout(self.embedding(tokens)), state[0])
        states = [first_state]
        for i, layer in enumerate(self.rest):
            x, layer_state = layer(self.dropout(x), state[i + 1])
            states.append(layer_state)
        return x, torch.stack(states, dim=0)


@torch.no_grad()
def line_start_state(
    model: LanguageModel, sequences: Sequence[Sequence[int]], count: int = 256, seed: int = 0
) -> Tensor:
    """The mean state after ``<s> ... </s>`` over ``count`` of ``sequences`` (picked by ``seed``): [L, S].

    The state training's stream is in when the next line's ``<s>`` arrives. Lines of
    the same length run as one batch, from the zero state, without dropout.
    """
    if not sequences:
        return model.start_state.new_zeros(model.start_state.shape)
    picked = random.Random(seed).sample(range(len(sequences)), min(count, len(sequences)))
    by_length: dict[int, list[Sequence[int]]] = {}
    for i in picked:
        by_length.setdefault(len(sequences[i]), []).append(sequences[i])
    was_training = model.training
    model.eval()
    total = model.start_state.new_zeros(model.start_state.shape)
    for group in by_length.values():
        tokens = torch.tensor([list(s) for s in group], dtype=torch.long, device=total.device)
        _, state = model.encode(tokens, model.zero_state(len(group)))
        total += state.sum(dim=1)
    model.train(was_training)
    return total / len(picked)
