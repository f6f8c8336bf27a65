"""Runs the network for the engine: tokens and states in, log-probabilities out.

Everything above this module (suggestions, generation, typing sessions) talks
to a ``StepModel``: ``init_state(batch)`` and ``advance(tokens, state)``. The
real one wraps the TorchScript network; tests use fakes with fixed logits; the
batcher (service/model/batching.py) stacks many callers' steps into one call.

Steps of different lengths (a 3-token context, a 9-token one, a keystroke) go
through one forward with ``advance_ragged``: the rows are packed by length
(``torch.nn.utils.rnn.pack_padded_sequence``), each layer reads the rows still
going at each position, and the output layer runs once over every row's last
position. Models without it are called once per length (``ragged_by_length``).

Context limit: an RNN could read any length, but cost grows with it, so a text
longer than ``max_context_tokens`` keeps its last tokens. The window start moves
in steps of half the limit, so that a typing session that grows past the limit
re-encodes at most ``limit`` tokens once per ``limit / 2`` tokens, and a single
request with the same tokens sees exactly the same window:

    n tokens:      0 ........ limit ........ limit + half ........ limit + 2*half
    window start:  0          0 | half                  | 2*half
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from service.model.tokenizer import BOS


class StepModel(Protocol):
    vocab_size: int

    def init_state(self, batch_size: int) -> Tensor:
        """The state a text starts from, [L, batch_size, S] (a new tensor)."""

    def advance(self, tokens: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """tokens [B, T] int64, state [L, B, S] -> (log-probabilities [B, V] after the last token, state)."""


Step = tuple[Tensor, Tensor]  # (tokens [b, T], state [L, b, S]) in; (log-probs [b, V], state) out


def ragged_by_length(model: StepModel, steps: Sequence[Step], **options) -> list[Step]:
    """``advance`` for each step, steps of equal length stacked into one call (``options`` passed on)."""
    by_length: dict[int, list[int]] = {}
    for index, (tokens, _) in enumerate(steps):
        by_length.setdefault(tokens.size(1), []).append(index)
    results: dict[int, Step] = {}
    for members in by_length.values():
        if len(members) == 1:
            results[members[0]] = model.advance(*steps[members[0]], **options)
            continue
        log_probs, states = model.advance(
            torch.cat([steps[i][0] for i in members]), torch.cat([steps[i][1] for i in members], dim=1), **options
        )
        sizes = [steps[i][0].size(0) for i in members]
        for i, lp, st in zip(members, log_probs.split(sizes), states.split(sizes, dim=1)):
            results[i] = (lp, st)
    return [results[i] for i in range(len(steps))]


def advance_ragged(model: StepModel, steps: Sequence[Step], **options) -> list[Step]:
    """Many steps of any lengths: in one forward when the model can, else one per length."""
    ragged = getattr(model, "advance_ragged", None)
    return ragged(steps, **options) if ragged is not None else ragged_by_length(model, steps, **options)


def window_start(num_tokens: int, limit: int) -> int:
    if num_tokens <= limit:
        return 0
    half = max(1, limit // 2)
    return -(-(num_tokens - limit) // half) * half  # ceil((n - limit) / half) * half


def encode_context(model: StepModel, token_ids: list[int], limit: int) -> tuple[Tensor, Tensor, int]:
    """Feed ``<s>`` and the window of ``token_ids``; returns (log-probs [V], state [L, 1, S], window start)."""
    start = window_start(len(token_ids), limit)
    tokens = torch.tensor([[BOS, *token_ids[start:]]], dtype=torch.int64)
    log_probs, state = model.advance(tokens, model.init_state(1))
    return log_probs[0], state, start


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading items ``a`` and ``b`` share."""
    if len(a) >= len(b) and a[: len(b)] == b:  # the usual case: one more keystroke
        return len(b)
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


class PrefixStates:
    """The model's output after prefixes of one token sequence, kept so that reading a longer or an
    edited sequence feeds the model only the tokens after the longest prefix already read:

        read  <s> I ▁like ▁eat ing        kept after 1, 3, 5 tokens (the ends of earlier reads)
        read  <s> I ▁like ▁eaten          shares 3 tokens -> resume after 3, feed "▁eaten"

    The sequences include ``<s>``. Typing sessions, evaluation and anything else that reads many
    prefixes of a text go through here.
    """

    def __init__(self, model: StepModel, capacity: int | None = 64) -> None:
        self.model = model
        self.tokens: list[int] = []  # the sequence whose prefixes are kept
        self.saved: deque[tuple[int, Tensor, Tensor]] = deque(maxlen=capacity)  # (tokens read, log-probs, state)
        self.steps = 0  # tokens the model has read, for tests and metrics

    @classmethod
    def from_walk(
        cls, model: StepModel, tokens: Sequence[int], outputs: Sequence[tuple[Tensor, Tensor]]
    ) -> PrefixStates:
        """Kept outputs after every prefix of ``tokens``, from ``walk`` or ``walk_batch``."""
        prefixes = cls(model, capacity=None)
        prefixes.tokens = list(tokens)
        prefixes.saved.extend((count, log_probs, state) for count, (log_probs, state) in enumerate(outputs, 1))
        return prefixes

    def clear(self) -> None:
        self.tokens = []
        self.saved.clear()

    def read(self, tokens: Sequence[int], keep: bool = True) -> tuple[Tensor, Tensor]:
        """(log-probs [V], state [L, 1, S]) after ``tokens``. ``keep``: remember this sequence and its
        output (and forget the kept outputs it does not share); else only read."""
        common = common_prefix(tokens, self.tokens)
        if keep:
            while self.saved and self.saved[-1][0] > common:
                self.saved.pop()
        found = None
        for entry in reversed(self.saved):
            if entry[0] <= common:
                found = entry
                break
        log_probs: Any
        done, log_probs, state = found if found is not None else (0, None, self.model.init_state(1))
        if done < len(tokens):
            log_probs, state = self.model.advance(torch.tensor([tokens[done:]], dtype=torch.long), state)
            log_probs = log_probs[0]
            self.steps += len(tokens) - done
        if keep:
            if not self.saved or self.saved[-1][0] != len(tokens):
                self.saved.append((len(tokens), log_probs, state))
            self.tokens = list(tokens)
        return log_probs, state

    def walk(self, tokens: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
        """Read ``tokens`` one at a time; the output after each of them (len(tokens) entries)."""
        return [self.read(tokens[: end + 1]) for end in range(len(tokens))]


def walk_batch(model: StepModel, sequences: Sequence[Sequence[int]]) -> list[list[tuple[Tensor, Tensor]]]:
    """What ``PrefixStates.walk`` gives for each sequence, for many sequences in one model call per position:

        sequences, longest first     a b c d      position t feeds the rows still going:
                                     e f g        [rows, 1] tokens, state[:, :rows]
                                     h

    Returns, per sequence, the (log-probs [V], state [L, 1, S]) after each of its tokens.
    """
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    ordered = [sequences[i] for i in order]
    outputs: list[list[tuple[Tensor, Tensor]]] = [[] for _ in sequences]
    if not ordered or not ordered[0]:
        return outputs
    state = model.init_state(len(ordered))
    for position in range(len(ordered[0])):
        rows = sum(1 for sequence in ordered if len(sequence) > position)
        tokens = torch.tensor([[sequence[position]] for sequence in ordered[:rows]], dtype=torch.long)
        log_probs, state = model.advance(tokens, state[:, :rows])
        for row in range(rows):
            outputs[order[row]].append((log_probs[row], state[:, row : row + 1]))
    return outputs


def compact_recurrent_weights(module: Any) -> None:
    """Give each CUDA recurrent layer's weights one buffer, in cuDNN's layout.

    cuDNN reads a layer's weights from one buffer. A loaded file has a tensor per weight, so without this
    each forward first copies them into a new buffer (and torch warns "RNN module weights are not part of
    single contiguous chunk of memory"). ``nn.RNNBase.flatten_parameters`` does this for an eager module;
    a TorchScript one does not have it, so it is done here the same way: the weights become views of the
    buffer in place, which the scripted layer's own list of them sees. CPU layers are left as they are."""
    if not torch._use_cudnn_rnn_flatten_weight():
        return
    from torch.backends.cudnn import rnn as cudnn_rnn

    for layer in module.modules():
        weights = list(getattr(layer, "_flat_weights", None) or [])
        if (
            not weights
            or not all(w.is_cuda and w.dtype == weights[0].dtype for w in weights)
            or not all(torch.backends.cudnn.is_acceptable(w) for w in weights)
            or len({w.data_ptr() for w in weights}) != len(weights)
        ):
            continue
        per_layer = (4 if layer.bias else 2) + (1 if layer.proj_size > 0 else 0)
        with torch.cuda.device_of(weights[0]), torch.no_grad():
            torch._cudnn_rnn_flatten_weight(
                weights,
                per_layer,
                layer.input_size,
                cudnn_rnn.get_cudnn_mode(layer.mode),
                layer.hidden_size,
                layer.proj_size,
                layer.num_layers,
                layer.batch_first,
                bool(layer.bidirectional),
            )


class ScriptedModel:
    """The exported TorchScript network on one device; safe to call from many threads.

    ``advance`` and ``advance_ragged`` give log-probabilities, or with ``probabilities=True`` the
    probabilities themselves (one softmax), which the linear mix adds to the memory's (service/model/mix.py)."""

    gives_probabilities = True

    def __init__(self, module: Any, vocab_size: int, device: str | torch.device = "cpu", half: bool = False) -> None:
        self.device = torch.device(device)
        self.module = module.to(self.device)
        self.dtype = torch.float16 if half else torch.float32
        if half:
            self.module = self.module.half()
        compact_recurrent_weights(self.module)
        self.vocab_size = vocab_size
        # forward_last computes the logits of the last position only; files exported before it have forward alone
        self._forward_last = hasattr(self.module, "forward_last")
        # where every text starts: the file's start state (zeros in files exported before it existed)
        self._start = self.module.init_state(1).to("cpu", torch.float32)
        self._lock = threading.Lock()  # one forward at a time: the model uses all intra-op threads
        self._packed = PackedNetwork.of(self.module)  # None: this file's network cannot read packed rows

    def init_state(self, batch_size: int) -> Tensor:
        # States live on the CPU in float32 between steps; advance() moves them to the device.
        return self._start.repeat(1, batch_size, 1)

    @staticmethod
    def _normalised(logits: Tensor, probabilities: bool) -> Tensor:
        logits = logits.float()
        return torch.softmax(logits, dim=-1) if probabilities else torch.log_softmax(logits, dim=-1)

    @torch.inference_mode()
    def advance(self, tokens: Tensor, state: Tensor, probabilities: bool = False) -> tuple[Tensor, Tensor]:
        with self._lock:
            tokens, state = tokens.to(self.device), state.to(self.device, self.dtype)
            if self._forward_last:
                logits, new_state = self.module.forward_last(tokens, state)
            else:
                logits, new_state = self.module(tokens, state)
                logits = logits[:, -1]
            return self._normalised(logits, probabilities).cpu(), new_state.to("cpu", torch.float32)

    @torch.inference_mode()
    def advance_ragged(self, steps: Sequence[Step], probabilities: bool = False) -> list[Step]:
        """Steps of different lengths in one forward (see the module docstring)."""
        if self._packed is None or len({tokens.size(1) for tokens, _ in steps}) == 1:
            # one length: forward_last is a little faster
            return ragged_by_length(self, steps, probabilities=probabilities)
        lengths = torch.tensor([tokens.size(1) for tokens, _ in steps])
        sizes = [tokens.size(0) for tokens, _ in steps]
        padded = torch.zeros(sum(sizes), int(lengths.max()), dtype=torch.int64)
        row = 0
        for tokens, _ in steps:
            padded[row : row + tokens.size(0), : tokens.size(1)] = tokens
            row += tokens.size(0)
        with self._lock:
            state = torch.cat([s for _, s in steps], dim=1).to(self.device, self.dtype)
            logits, new_state = self._packed(
                padded.to(self.device), lengths.repeat_interleave(torch.tensor(sizes)), state
            )
            log_probs = self._normalised(logits, probabilities).cpu()
            new_state = new_state.to("cpu", torch.float32)
        return list(zip(log_probs.split(sizes), new_state.split(sizes, dim=1)))


class PackedNetwork:
    """The exported network's layers as eager modules that read packed rows of different lengths.

    A file exported by nextword-export has ``embedding``, ``first`` and ``rest`` (each with an
    ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN`` in ``rnn``) and ``decoder``; the state of a layer is
    [h | c] for an LSTM and h otherwise. Dropout is off in a served model. Anything else (one-hot
    input, int8 layers, an unknown layout) gets None from ``of`` and is run per length."""

    CELLS = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}

    def __init__(self, embedding: nn.Module, layers: list[nn.RNNBase], decoder: nn.Module) -> None:
        self.embedding = embedding
        self.layers = layers
        self.decoder = decoder
        self.lstm = isinstance(layers[0], nn.LSTM)
        self.hidden_size = layers[0].hidden_size

    @classmethod
    def of(cls, module: torch.jit.ScriptModule) -> PackedNetwork | None:
        try:
            if bool(module.onehot):
                return None
            rest = [getattr(module.rest, name) for name in sorted(module.rest._modules.keys(), key=int)]
            scripted = [module.first.rnn, *(layer.rnn for layer in rest)]
            layers = [cls._eager(rnn) for rnn in scripted]
            return cls(module.embedding, layers, module.decoder)
        except (AttributeError, KeyError, RuntimeError, TypeError, ValueError):
            return None

    @classmethod
    def _eager(cls, rnn: torch.jit.ScriptModule) -> nn.RNNBase:
        kind = cls.CELLS[rnn.original_name]
        weights = dict(rnn.named_parameters())
        if (
            rnn.num_layers != 1
            or not rnn.batch_first
            or rnn.bidirectional
            or set(weights)
            != {
                "weight_ih_l0",
                "weight_hh_l0",
                "bias_ih_l0",
                "bias_hh_l0",
            }
        ):
            raise TypeError("not a plain one-layer recurrent layer")
        options = {"nonlinearity": rnn.nonlinearity} if kind is nn.RNN else {}
        eager = kind(rnn.input_size, rnn.hidden_size, batch_first=True, **options)
        eager.load_state_dict({name: value.detach() for name, value in weights.items()})
        first = next(iter(weights.values()))
        return eager.to(first.device, first.dtype).eval()

    def __call__(self, tokens: Tensor, lengths: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """tokens [B, T] (rows padded after their length), lengths [B], state [L, B, S] -> the logits after each
        row's last token [B, V] and the state there."""
        x = pack_padded_sequence(self.embedding(tokens), lengths, batch_first=True, enforce_sorted=False)
        states = []
        for layer, layer_state in zip(self.layers, state):
            if self.lstm:
                h, c = layer_state.unsqueeze(0).split(self.hidden_size, dim=2)
                x, (h, c) = layer(x, (h.contiguous(), c.contiguous()))
                states.append(torch.cat([h, c], dim=2)[0])
            else:
                x, h = layer(x, layer_state.unsqueeze(0).contiguous())
                states.append(h[0])
        last = states[-1][:, : self.hidden_size]  # the last layer's output at each row's last token
        return self.decoder(last), torch.stack(states)
