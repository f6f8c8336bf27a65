"""Personal suggestions: the served model's answers mixed with a user's history (service/model/personal.py).

Over the first ``SERVED_FOR_HISTORY`` served suggestions, with the weights of ``UserHistory.weight``:

    a word among them:                   (1 - known_weight * share) * P_served + known_weight * share * P_user
    a word the model's vocabulary lacks: min(max_weight, share) * P_user
    any other word (ranked lower):       known_weight * share * P_user

and for a next word (no prefix) both weights times the served model's doubt (1 - its top
probability). Pinyin conversions and Generate's next token are mixed the same way (below).
A user with no history, or none that applies, gets exactly the unpersonalised answer.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from service.model.personal import UserHistory, units
from service.model.tokenizer import UNK

CONTEXT_CHARS = 256  # of the text before the cursor, read for the user's last units
# A conversion the user chose counts faster than a word they typed: an input method moves a chosen
# reading to the front (weight E / (E + 2): one use is a third, three uses 0.6).
CONVERSION_EVIDENCE_SCALE = 2.0
# The history is mixed with this many of the served suggestions, so that a word the model ranks below
# the few shown keeps its own probability in the mix rather than counting as a word the model lacks.
SERVED_FOR_HISTORY = 50
UNFINISHED = re.compile(r"[\w'’]+$")  # the word being typed at the end of a text


def personalize(
    suggestions: Sequence[tuple[str, float]],
    predicted: Sequence[tuple[str, float]],
    weights: tuple[float, float],
    k: int,
    completing: bool = False,
    lacks: Callable[[str], bool] | None = None,
) -> list[tuple[str, float]]:
    """The served suggestions mixed with the user's predictions. ``weights``: (novel, known). A word the
    served suggestions have scores (1 - known) * served + known * user; a word the model lacks (``lacks``,
    a name it never saw; by default every word the suggestions do not have) scores novel * user, and any
    other word known * user."""
    novel, known = weights
    if novel <= 0 or not predicted:
        return list(suggestions[:k])
    if not completing:  # a next word: where the served model is sure, it decides
        doubt = 1.0 - max((p for _, p in suggestions), default=0.0)
        novel, known = novel * doubt, known * doubt
    mixed: dict[str, list] = {}
    for text, p in suggestions:
        mixed[text.casefold()] = [text, (1 - known) * p, True]
    for text, p in predicted:
        entry = mixed.get(text.casefold())
        if entry is None:
            mixed[text.casefold()] = [text, (novel if lacks is None or lacks(text) else known) * p, False]
        else:
            entry[1] += known * p
    ranked = sorted(mixed.values(), key=lambda entry: -entry[1])
    return [(text, p) for text, p, _ in ranked[:k]]


def vocabulary_lacks(tokenizer) -> Callable[[str], bool]:
    """Whether a model's vocabulary lacks a word: its tokens include ``<unk>``."""

    @functools.lru_cache(maxsize=4096)
    def lacks(word: str) -> bool:
        return UNK in tokenizer.encode(word)

    return lacks


def suggest(
    history: UserHistory,
    context: str,
    prefix: str,
    served: Sequence[tuple[str, float]],
    k: int,
    lacks: Callable[[str], bool] | None = None,
):
    """The first ``k`` of ``served`` (best first; give ``SERVED_FOR_HISTORY`` of them) mixed with
    ``history`` for the text ``context`` + ``prefix``; ``lacks``: whether the model's vocabulary lacks a word."""
    if not len(history):
        return list(served[:k])
    tail = context[-CONTEXT_CHARS:]  # the last few units are all the prediction reads
    predicted, evidence = history.predict(units(tail), prefix, time.time(), limit=k)
    return personalize(served, predicted, history.weight(evidence), k, completing=bool(prefix), lacks=lacks)


def rerank_conversions(history: UserHistory, context: str, candidates: Sequence) -> list:
    """Pinyin conversions (service/model/pinyin.py Candidates) re-ranked with the user's ``history``: within
    each group that consumes as many letters, a candidate's share is mixed with P_user(its characters |
    context), normalised over the group, with the weight the evidence gives a word the model lacks."""
    if not len(history):
        return list(candidates)
    now, before = time.time(), units(context[-CONTEXT_CHARS:])
    scored = []
    for candidate in candidates:
        probability, evidence, read = 1.0, 0.0, list(before)
        for index, unit in enumerate(units(candidate.text)):
            predicted, seen = history.predict(read, "", now)
            if predicted:  # a context the user has typed: what followed it
                p = dict(predicted).get(unit, 0.0)
            else:  # none: how often they typed the character at all
                p, seen = history.unigram(unit, now)
            if index == 0:
                evidence = seen
            probability *= p
            if probability == 0.0:
                break
            read.append(unit)
        scored.append((candidate, probability, evidence))
    out = []
    for _, grouped in itertools.groupby(scored, key=lambda entry: entry[0].consumed):
        group = list(grouped)
        total = sum(p for _, p, _ in group)
        if total > 0:
            evidence = max(e for _, _, e in group)
            weight = min(history.config.max_weight, evidence / (evidence + CONVERSION_EVIDENCE_SCALE))
            mixed = [
                dataclasses.replace(c, probability=(1 - weight) * c.probability + weight * p / total)
                for c, p, _ in group
            ]
            out.extend(sorted(mixed, key=lambda c: -c.probability))
        else:
            out.extend(c for c, _, _ in group)
    return out


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


def mix_next_token(history: UserHistory, tokens: NextTokens, text: str, log_probs):
    """Generate's next-token log-probabilities [V] after ``text``, mixed with the user's predicted words."""
    if not len(history):
        return log_probs
    partial = UNFINISHED.search(text)
    context = text[: partial.start()] if partial else text
    prefix = partial.group() if partial else ""
    predicted, evidence = history.predict(units(context[-CONTEXT_CHARS:]), prefix, time.time(), limit=10)
    weight, _ = history.weight(evidence)  # a distribution over every token: one weight
    theirs = tokens.distribution(text, predicted) if weight > 0 else None
    if theirs is None:
        return log_probs
    mixed = (1 - weight) * np.exp(log_probs.double().numpy()) + weight * theirs
    with np.errstate(divide="ignore"):
        return torch.from_numpy(np.log(mixed)).to(log_probs.dtype)
