"""An engine as one user sees it: its answers mixed with that user's history, and what their typing
sessions learn. The servicer asks for one per call and holds no history policy of its own."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from service.history.histories import Histories
from service.model.engine import Engine
from service.model.personal import unit_spans
from service.model.personal_mix import UNFINISHED, PersonalMix
from service.model.suggest import SuggestResult

FIT_UNITS = 64  # of the units one edit finishes (a paste), the last this many move the user's weights


class SessionLearner:
    """What one Type session learns: a word once a boundary (space, punctuation, newline) follows it, and
    the rest at a commit or when the session ends. Text deleted before it was finished is never learned,
    and deleting and retyping finished text does not learn it twice. ``fit(text, spans)``, before the units of
    ``text`` at ``spans`` (``unit_spans``) are learned, moves the user's weights by them (``PersonalEngine.fit``)."""

    def __init__(self, histories: Histories, user: str, fit: Callable[[str, list], None] | None = None) -> None:
        self.histories = histories
        self.user = user
        self.fit = fit
        self.learned: list[str] = []  # the units of the session's text learned so far, in order

    def update(self, text: str, final: bool = False) -> None:
        finished = text if final else text[: len(text) - len(m.group())] if (m := UNFINISHED.search(text)) else text
        spans = unit_spans(finished)
        sequence = [unit for unit, _ in spans]
        common = 0
        for a, b in zip(sequence, self.learned):
            if a != b:
                break
            common += 1
        if common == len(sequence):  # nothing new (the same text, or some of it deleted)
            return
        if self.fit is not None:
            self.fit(finished, spans[max(common, len(sequence) - FIT_UNITS) :])
        self.histories.learn(self.user, sequence, start=common)
        self.learned = sequence


@dataclass(frozen=True)
class PersonalEngine:
    """``engine`` for ``user`` (None: a call that names no one, answered as the engine answers)."""

    engine: Engine
    histories: Histories | None
    user: str | None

    def personal(self) -> PersonalMix | None:
        """The user's history mixed into the engine's distributions, or None (no user, no history)."""
        if self.histories is None or self.user is None:
            return None
        mix = self.histories.personal(
            self.user, self.engine.name, self.engine.artifact.tokenizer, self.engine.next_tokens
        )
        return mix if mix else None

    def suggest(self, suggest: Callable[..., SuggestResult], text: str, count: int) -> SuggestResult:
        """``suggest(count, personal)`` (the engine's, or a typing session's) with the user's history as part of
        the distribution it ranks by (service/model/personal_mix.py)."""
        personal = self.personal() if text else None
        return suggest(count, personal) if personal is not None else suggest(count)

    def next_token_mix(self) -> Callable | None:
        """For Generate: the next-token distribution mixed with the user's history, or None."""
        personal = self.personal()
        if personal is None:
            return None
        return lambda text, log_probs: personal.mix(text, log_probs)[0]

    def learner(self, incognito: bool, read: Callable[[str], Tensor] | None = None) -> SessionLearner | None:
        """What a Type session learns, or None: no user, incognito, or learning off. ``read(text)``: the model's
        next-token log-probabilities after a text, as the session reads them; with it, what the user types also
        fits the history's weights to them (``fit``)."""
        if self.histories is None or self.user is None or incognito or not self.histories.learning:
            return None
        return SessionLearner(self.histories, self.user, functools.partial(self.fit, read) if read else None)

    def fit(self, read: Callable[[str], Tensor], text: str, spans: list[tuple[str, int]]) -> None:
        """Move the user's weights on this model by the units of ``text`` at ``spans``, about to be learned:
        each one's probability under the served model (``read`` after the text before it) and under their
        history so far (personal_tokens.OnlineWeights)."""
        personal = self.personal()
        if personal is None or self.histories is None or self.user is None:
            return  # no history yet: it has no weight to fit
        rows = [personal.observed(text[:at], unit, read(text[:at])) for unit, at in spans if unit]
        if rows:
            served, mine, buckets = (np.array(column) for column in zip(*rows))
            self.histories.fit(self.user, self.engine.name, served, mine, buckets.astype(np.int64))
