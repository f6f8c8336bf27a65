"""Text generation: sampling with temperature, top-k and top-p, stop strings, seeds.

``Generator.generate`` yields ``GenerationEvent``s: text pieces as they come
(each valid UTF-8: tokens are whole characters), then one event with the
finish reason. Text that could be the start of a stop string is held back
until it is known not to be one, so a stop string never reaches the client.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from service.model.steps import StepModel, encode_context
from service.model.tokenizer import BOS, EOS, PAD, UNK, Tokenizer

LENGTH, END_TOKEN, STOP_STRING, CANCELLED = "length", "end_token", "stop_string", "cancelled"


@dataclass(frozen=True)
class GenerationParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = all tokens
    top_p: float = 1.0  # nucleus mass, (0, 1]
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None  # None = a random seed


@dataclass(frozen=True)
class GenerationEvent:
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0


def filter_logits(log_probs: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """[V] log-probabilities -> [V] logits to sample from (tokens cut off are -inf)."""
    logits = log_probs / temperature
    if 0 < top_k < logits.numel():
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the ones before it already reach top_p; the first one always stays
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def pick_token(log_probs: Tensor, params: GenerationParams, rng: torch.Generator) -> int:
    if params.temperature == 0:
        return int(log_probs.argmax())
    logits = filter_logits(log_probs, params.temperature, params.top_k, params.top_p)
    return int(torch.multinomial(logits.softmax(dim=-1), 1, generator=rng))


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that begins some stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-size:]):
                longest = size
                break
    return longest


@dataclass
class Generator:
    model: StepModel
    tokenizer: Tokenizer
    max_context_tokens: int = 1024
    banned: tuple[int, ...] = field(default=(PAD, BOS, UNK))

    def generate(
        self,
        prompt: str,
        params: GenerationParams,
        cancelled: Callable[[], bool] = lambda: False,
        adjust: Callable[[str, Tensor], Tensor] | None = None,
    ) -> Iterator[GenerationEvent]:
        """``adjust(text so far, log-probs)``: the distribution each token is drawn from (a user's history)."""
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        rng = torch.Generator().manual_seed(seed)
        ids = self.tokenizer.encode(prompt)
        log_probs, state, start = encode_context(self.model, ids, self.max_context_tokens)
        prompt_count = len(ids) - start
        banned = torch.tensor(self.banned, dtype=torch.long)
        text, emitted, count = "", 0, 0
        reason = LENGTH
        trim_leading = prompt[-1:].isspace()
        while count < params.max_tokens:
            if cancelled():
                reason = CANCELLED
                break
            if adjust is not None:
                log_probs = adjust(prompt + text, log_probs)
            token = pick_token(log_probs.index_fill(0, banned, float("-inf")), params, rng)
            count += 1
            if token == EOS:
                reason = END_TOKEN
                break
            piece = self.tokenizer.display_text(token)
            if trim_leading and not text:
                piece = piece.lstrip()
            text += piece
            hits = [i for i in (text.find(s) for s in params.stop) if i >= 0]
            if hits:
                cut = min(hits)
                if cut > emitted:
                    yield GenerationEvent(text=text[emitted:cut])
                emitted = len(text)
                reason = STOP_STRING
                break
            safe = len(text) - _held_back(text, params.stop)
            if safe > emitted:
                yield GenerationEvent(text=text[emitted:safe])
                emitted = safe
            if count < params.max_tokens:
                log_probs, state = self.model.advance(torch.tensor([[token]], dtype=torch.long), state)
                log_probs = log_probs[0]
        if reason != STOP_STRING and emitted < len(text):
            yield GenerationEvent(text=text[emitted:])
        yield GenerationEvent(finish_reason=reason, prompt_tokens=prompt_count, generated_tokens=count)
