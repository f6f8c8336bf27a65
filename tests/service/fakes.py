"""A fake StepModel with fixed next-token distributions, keyed by the tokens read so far."""

from __future__ import annotations

import math

import torch

from service.model.tokenizer import SPECIAL_TOKENS, CharTokenizer, WordTokenizer


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


class Aborted(Exception):
    """What FakeContext.abort raises, as grpc's context.abort raises to end the handler."""


class FakeContext:
    """The parts of grpc.ServicerContext that nextword's servicer and interceptor use."""

    def __init__(self, metadata=(), active: bool = True) -> None:
        self.metadata = tuple(metadata)
        self.trailing: tuple = ()
        self.status = None
        self.details = ""
        self.active = active

    def invocation_metadata(self):
        return self.metadata

    def set_trailing_metadata(self, metadata) -> None:
        self.trailing = tuple(metadata)

    def abort(self, code, details: str):
        self.status, self.details = code, details
        raise Aborted(code, details)

    def code(self):
        return self.status

    def is_active(self) -> bool:
        return self.active

    def time_remaining(self):
        return None  # no deadline


def fake_engine(model=None, tokenizer=None):
    """An Engine over a FakeModel and a char tokenizer, with a manifest that says so."""
    from service.model.artifact import Artifact, Manifest, Provenance, TokenizerSpec
    from service.model.engine import Engine
    from service.model.generation import Generator
    from service.model.suggest import Suggester

    tokenizer = tokenizer or char_tokenizer("abc ")
    model = model or FakeModel(tokenizer.vocab_size, lambda history: {4: 0.5, 5: 0.3, 6: 0.15, 7: 0.05})
    model.device = "cpu"
    manifest = Manifest(
        network={"cell": "lstm", "num_layers": 1, "hidden_size": 8, "vocab_size": tokenizer.vocab_size},
        parameters=123,
        state_size=16,
        tokenizer=TokenizerSpec(kind=tokenizer.kind, vocab_size=tokenizer.vocab_size),
        provenance=Provenance(corpus=["fake.txt"], stream_validation_perplexity=12.5),
        created="2026-01-01T00:00:00+00:00",
    )
    artifact = Artifact(path="fake.pt", model=None, manifest=manifest, tokenizer=tokenizer)
    return Engine(artifact, model, Suggester(model, tokenizer), Generator(model, tokenizer))
