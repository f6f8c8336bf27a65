"""Personal answers: a user's history as part of the served distribution (service/model/personal_tokens.py).

``PersonalMix.mix`` turns the served next-token distribution after a text into

    P(w | h) = (1 - lambda_b) P_served(w | h) + lambda_b P_user(w | h)

and gives the words the vocabulary lacks their share beside it, so that Suggest (next words, completions,
phrases: service/model/suggest.py), typing sessions and Generate rank what the user typed with the
model's own words, and pinyin conversions (service/model/pinyin.py) read the mixed distribution at every
syllable. A user with no history gets exactly the unpersonalised answer.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence

import numpy as np
import torch

from service.model.personal import UserHistory, units
from service.model.personal_tokens import (
    NOTHING_LACKING,
    Lacking,
    LearnedWeights,
    UserDistribution,
    bucket_of,
    distribution,
    mix,
    token_probability,
    tokens_of,
)
from service.model.tokenizer import UNK, is_cjk

CONTEXT_CHARS = 256  # of the text before the cursor, read for the user's last units
UNFINISHED = re.compile(r"[\w'’]+$")  # the word being typed at the end of a text


class PersonalMix:
    """One user's history mixed into one model's next-token distributions, for one call (``now``)."""

    def __init__(
        self,
        history: UserHistory,
        tokenizer,
        weights: LearnedWeights,
        now: float | None = None,
        next_tokens: NextTokens | None = None,
    ) -> None:
        self.history = history
        self.tokenizer = tokenizer
        self.weights = weights
        self.now = time.time() if now is None else now
        self.words = tokenizer.kind == "word"
        self._next_tokens = next_tokens  # built at first use within a word, unless the engine keeps one

    def __bool__(self) -> bool:
        return bool(len(self.history))

    def user(self, text: str) -> UserDistribution | None:
        """P_user after ``text`` (ending where a unit begins), or None: no history."""
        view = tokens_of(self.history, self.tokenizer)
        return distribution(self.history, view, units(text[-CONTEXT_CHARS:]), self.now)

    def mix(self, text: str, log_probs: torch.Tensor) -> tuple[torch.Tensor, Lacking]:
        """The served next-token log-probabilities [V] after ``text``, mixed with the user's history, and
        the units the vocabulary lacks with their probabilities."""
        if not len(self.history):
            return log_probs, NOTHING_LACKING
        partial = None if self.words else UNFINISHED.search(text)
        if partial is not None and not is_cjk(text[-1]):
            return self._mix_within_word(text, partial, log_probs), NOTHING_LACKING
        user = self.user(text)
        if user is None:
            return log_probs, NOTHING_LACKING
        weight = self.weights.weight(user.seen, user.evidence)
        if weight <= 0:
            return log_probs, NOTHING_LACKING
        mixed, lacking = mix(_probabilities(log_probs), user, weight)
        return _log(mixed, log_probs), self._named(lacking)

    def observed(self, before: str, unit: str, log_probs: torch.Tensor) -> tuple[float, float, int]:
        """For fitting the user's weights as they type (personal_tokens.OnlineWeights): the probability of the
        token that ``unit`` begins with, typed after ``before``, under the served model (its log-probabilities
        there) and under the user's history, and its bucket (-1: no history there)."""
        user = self.user(before) if len(self.history) else None
        target = tokens_of(self.history, self.tokenizer).id_of(unit.casefold(), unit)
        vocab = self.tokenizer.vocab_size
        token = target if target < vocab else UNK
        served = math.exp(float(log_probs[token]))
        return served, token_probability(user, token, vocab), bucket_of(user, len(self.weights.weights))

    def lacking(self, text: str) -> Lacking:
        """The units the vocabulary lacks, with their probabilities in the mix, as the next unit after ``text``."""
        if not len(self.history):
            return NOTHING_LACKING
        user = self.user(text)
        if user is None:
            return NOTHING_LACKING
        weight = self.weights.weight(user.seen, user.evidence)
        return self._named(weight * user.probabilities[self.tokenizer.vocab_size :])

    def _named(self, lacking: np.ndarray) -> Lacking:
        """The probabilities of the units the vocabulary lacks (by their ids past it), with their written forms."""
        extra = tokens_of(self.history, self.tokenizer).extra
        return Lacking([self.history.shown.get(key, key) for key in extra[: len(lacking)]], lacking)

    def mix_rows(self, texts: Sequence[str], log_probs: torch.Tensor) -> torch.Tensor:
        """``mix`` for each row of [B, V] after the texts."""
        if not len(self.history):
            return log_probs
        return torch.stack([self.mix(text, row)[0] for text, row in zip(texts, log_probs)])

    def _mix_within_word(self, text: str, partial: re.Match, log_probs: torch.Tensor) -> torch.Tensor:
        """Within a word of a model whose tokens are pieces of words: the user's words that start with what is
        typed of it, as the tokens that go on with them, weighted as at the word's start."""
        before = text[: partial.start()]
        user = self.user(before)
        predicted, _ = self.history.predict(units(before[-CONTEXT_CHARS:]), partial.group(), self.now)
        if user is None or not predicted:
            return log_probs
        if self._next_tokens is None:
            self._next_tokens = NextTokens(self.tokenizer)
        theirs = self._next_tokens.distribution(text, predicted)
        weight = self.weights.weight(user.seen, user.evidence)
        if theirs is None or weight <= 0:
            return log_probs
        return _log((1 - weight) * _probabilities(log_probs) + weight * theirs, log_probs)


def _probabilities(log_probs: torch.Tensor) -> np.ndarray:
    """exp of the log-probabilities, in float64, by numpy (a tenth of torch's time for one row on CPU)."""
    return np.exp(log_probs.detach().cpu().numpy().astype(np.float64))


def _log(probabilities: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """log of the probabilities, as a tensor of ``like``'s dtype and device."""
    with np.errstate(divide="ignore"):
        return torch.from_numpy(np.log(probabilities)).to(dtype=like.dtype, device=like.device)


class NextTokens:
    """A user's predicted words as a distribution over a model's next tokens, for Generate: a token gets the
    probability of the words whose rest (after what is typed of the current word) it begins."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self._exact: dict[str, list[int]] = {}
        self._bare: dict[str, list[int]] = {}  # by the text without leading white space
        for i in range(self.vocab_size):
            text = tokenizer.normalize(tokenizer.token_text(i))
            if text:
                self._exact.setdefault(text, []).append(i)
            if text.strip():
                self._bare.setdefault(text.lstrip(), []).append(i)

    def distribution(self, text: str, predicted: Sequence[tuple[str, float]]) -> np.ndarray | None:
        """[V] probabilities of the next token given the text so far, or None when no prediction maps."""
        partial_match = UNFINISHED.search(text)
        partial = self.tokenizer.normalize(partial_match.group()) if partial_match else ""
        starts_word = not text or text[-1].isspace()
        table = self._bare if starts_word else self._exact
        lead = "" if starts_word or partial else " "
        found = np.zeros(self.vocab_size, dtype=np.float64)
        for word, p in predicted:
            rest = self.tokenizer.normalize(word)[len(partial) :]
            if not rest:
                continue
            target = lead + rest
            for end in range(1, len(target) + 1):
                for i in table.get(target[:end], ()):
                    found[i] += p
        total = found.sum()
        return found / total if total > 0 else None
