"""A fake StepModel with fixed next-token distributions, keyed by the tokens read so far."""

from __future__ import annotations

import math

import torch

from service.tokenizer import SPECIAL_TOKENS, CharTokenizer, WordTokenizer


class FakeModel:
    """``table(history) -> {token: probability}``; the state holds an index into the histories seen."""

    def __init__(self, vocab_size: int, table) -> None:
        self.vocab_size = vocab_size
        self.table = table
        self.histories: list[tuple[int, ...]] = [()]
        self.calls = 0
        self.tokens_read = 0

    def init_state(self, batch_size: int) -> torch.Tensor:
        return torch.zeros(1, batch_size, 1)

    def advance(self, tokens, state):
        self.calls += 1
        self.tokens_read += tokens.numel()
        rows, keys = [], []
        for row, key in zip(tokens.tolist(), state[0, :, 0].long().tolist()):
            history = self.histories[key] + tuple(row)
            self.histories.append(history)
            keys.append(len(self.histories) - 1)
            probs = torch.full((self.vocab_size,), 1e-9)
            for token, p in self.table(history).items():
                probs[token] = p
            rows.append((probs / probs.sum()).log())
        return torch.stack(rows), torch.tensor(keys, dtype=torch.float32).view(1, -1, 1)


def char_tokenizer(chars: str) -> CharTokenizer:
    return CharTokenizer(list(SPECIAL_TOKENS) + list(chars))


def word_tokenizer(words: list[str], lowercase: bool = False) -> WordTokenizer:
    return WordTokenizer(list(SPECIAL_TOKENS) + words, lowercase)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)
