"""Runs the network for the engine: tokens and states in, log-probabilities out.

Everything above this module (suggestions, generation, typing sessions) talks
to a ``StepModel``: ``init_state(batch)`` and ``advance(tokens, state)``. The
real one wraps the TorchScript network; tests use fakes with fixed logits; the
batcher (service/batching.py) stacks many callers' steps into one call.

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
from typing import Protocol

import torch
from torch import Tensor

from service.tokenizer import BOS


class StepModel(Protocol):
    vocab_size: int

    def init_state(self, batch_size: int) -> Tensor:
        """The state a text starts from, [L, batch_size, S] (a new tensor)."""

    def advance(self, tokens: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """tokens [B, T] int64, state [L, B, S] -> (log-probabilities [B, V] after the last token, state)."""


def resolve_device(name: str) -> str:
    """"auto" -> "cuda" when available, else "cpu"; "cuda" without a CUDA device is a ValueError."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def use_intra_op_threads(count: int) -> None:
    """Give the calling thread ``count`` intra-op threads for torch's CPU kernels.

    OpenMP teams belong to the thread that starts them, and when the threads of all
    teams outnumber the cores, GNU OpenMP stops spinning between parallel regions: a
    small forward made of many short regions then takes about twice as long (1.6 ms
    against 3.5 ms for the default model on 2 cores). So a batching server gives the
    model worker all the threads and every other thread one, and only one team exists.
    """
    torch.get_num_threads()  # torch's once-per-thread default runs now, so it cannot undo this later
    torch.set_num_threads(count)


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


class ScriptedModel:
    """The exported TorchScript network on one device; safe to call from many threads."""

    def __init__(self, module: torch.jit.ScriptModule, vocab_size: int, device: str | torch.device = "cpu",
                 half: bool = False) -> None:
        self.device = torch.device(device)
        self.module = module.to(self.device)
        self.dtype = torch.float16 if half else torch.float32
        if half:
            self.module = self.module.half()
        self.vocab_size = vocab_size
        # forward_last computes the logits of the last position only; files exported before it have forward alone
        self._forward_last = hasattr(self.module, "forward_last")
        # where every text starts: the file's start state (zeros in files exported before it existed)
        self._start = self.module.init_state(1).to("cpu", torch.float32)
        self._lock = threading.Lock()  # one forward at a time: the model uses all intra-op threads

    def init_state(self, batch_size: int) -> Tensor:
        # States live on the CPU in float32 between steps; advance() moves them to the device.
        return self._start.repeat(1, batch_size, 1)

    @torch.inference_mode()
    def advance(self, tokens: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        with self._lock:
            tokens, state = tokens.to(self.device), state.to(self.device, self.dtype)
            if self._forward_last:
                logits, new_state = self.module.forward_last(tokens, state)
            else:
                logits, new_state = self.module(tokens, state)
                logits = logits[:, -1]
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            return log_probs.cpu(), new_state.to("cpu", torch.float32)
