"""The rule nextword served a user's history by before it was part of the distribution, kept as a baseline
for ``nextword-eval --learn`` (``--learn-rule rerank``): the served suggestions re-ranked with the user's
predicted words, none of it in the probabilities (so perplexity cannot see it).

Over the first ``SERVED_FOR_HISTORY`` served suggestions, with share = E / (E + ``EVIDENCE_SCALE``) (E: the
count of the longest context the user typed before, or of the units matching the prefix):

    a word among them:                   (1 - KNOWN_WEIGHT * share) * P_served + KNOWN_WEIGHT * share * P_user
    a word the model's vocabulary lacks: min(MAX_WEIGHT, share) * P_user
    any other word:                      KNOWN_WEIGHT * share * P_user

and for a next word (no prefix) both weights times the served model's doubt (1 - its top probability).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

from service.model.personal import UserHistory, units
from service.model.tokenizer import UNK

SERVED_FOR_HISTORY = 50
EVIDENCE_SCALE = 10.0
MAX_WEIGHT = 0.9
KNOWN_WEIGHT = 0.1
CONTEXT_CHARS = 256


def personalize(
    suggestions: Sequence[tuple[str, float]],
    predicted: Sequence[tuple[str, float]],
    weights: tuple[float, float],
    k: int,
    completing: bool = False,
    lacks: Callable[[str], bool] | None = None,
) -> list[tuple[str, float]]:
    """The served suggestions re-ranked with the user's predictions. ``weights``: (novel, known)."""
    novel, known = weights
    if novel <= 0 or not predicted:
        return list(suggestions[:k])
    if not completing:  # a next word: where the served model is sure, it decides
        doubt = 1.0 - max((p for _, p in suggestions), default=0.0)
        novel, known = novel * doubt, known * doubt
    mixed: dict[str, list] = {}
    for text, p in suggestions:
        mixed[text.casefold()] = [text, (1 - known) * p]
    for text, p in predicted:
        entry = mixed.get(text.casefold())
        if entry is None:
            mixed[text.casefold()] = [text, (novel if lacks is None or lacks(text) else known) * p]
        else:
            entry[1] += known * p
    ranked = sorted(mixed.values(), key=lambda entry: -entry[1])
    return [(text, p) for text, p in ranked[:k]]


def vocabulary_lacks(tokenizer) -> Callable[[str], bool]:
    """Whether a model's vocabulary lacks a word: its tokens include ``<unk>``."""

    @functools.lru_cache(maxsize=4096)
    def lacks(word: str) -> bool:
        return UNK in tokenizer.encode(word)

    return lacks


def rerank(
    history: UserHistory,
    context: str,
    prefix: str,
    served: Sequence[tuple[str, float]],
    k: int,
    lacks: Callable[[str], bool] | None = None,
) -> list[tuple[str, float]]:
    """The first ``k`` of ``served`` (``SERVED_FOR_HISTORY`` of them, best first) re-ranked with ``history``."""
    if not len(history):
        return list(served[:k])
    predicted, evidence = history.predict(units(context[-CONTEXT_CHARS:]), prefix, time.time(), limit=k)
    share = evidence / (evidence + EVIDENCE_SCALE) if evidence else 0.0
    weights = (min(MAX_WEIGHT, share), KNOWN_WEIGHT * share)
    return personalize(served, predicted, weights, k, completing=bool(prefix), lacks=lacks)
