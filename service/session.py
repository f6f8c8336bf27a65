"""Typing sessions: the text typed so far and the model state that reads it.

An edit re-tokenises the context (cheap) and reads it through ``PrefixStates``
(service/runner.py), which keeps the output after the ends of recent reads and
feeds the model only what follows the longest prefix it shares with them:

    read:     <s> I ▁like ▁eat ing              kept after: 1, 3, 5 tokens
    edit:     <s> I ▁like ▁eaten                common prefix 3 -> resume at 3, read "▁eaten"

So a keystroke costs a step or two however long the text is, and a delete
goes back to a kept state without reading the text again.
"""

from __future__ import annotations

from torch import Tensor

from service.runner import PrefixStates, StepModel, window_start
from service.suggest import Suggester, SuggestResult
from service.tokenizer import BOS


class IncrementalContext:
    """Reads growing and shrinking texts within the context window (see service/runner.py)."""

    def __init__(self, model: StepModel, limit: int, history: int = 64) -> None:
        self.limit = limit
        self.start = 0
        self.prefixes = PrefixStates(model, history)

    @property
    def steps(self) -> int:
        """Tokens the model has read, for tests and metrics."""
        return self.prefixes.steps

    def read(self, token_ids: list[int]) -> tuple[Tensor, Tensor]:
        """(log-probs [V], state [L, 1, S]) after ``<s>`` and the window of ``token_ids``."""
        start = window_start(len(token_ids), self.limit)
        if start != self.start:  # the window moved: nothing kept is a prefix of it
            self.prefixes.clear()
            self.start = start
        return self.prefixes.read([BOS, *token_ids[start:]])


class EditError(ValueError):
    """An edit the session refuses (its text would pass the length limit)."""


class TypingSession:
    """One Type stream: apply edits, answer with suggestions (same as Suggest for the same text)."""

    def __init__(self, suggester: Suggester, max_chars: int, history: int = 64) -> None:
        self.suggester = suggester
        self.max_chars = max_chars
        self.text = ""
        self.context = IncrementalContext(suggester.model, suggester.config.max_context_tokens, history)
        self._context_text, self._context_ids = "", []  # keystrokes inside a word keep the same context

    def append(self, text: str) -> None:
        if len(self.text) + len(text) > self.max_chars:
            raise EditError(
                f"the session's text would be {len(self.text) + len(text)} characters; the limit is {self.max_chars}"
            )
        self.text += text

    def delete(self, count: int) -> None:
        self.text = self.text[: max(0, len(self.text) - count)]

    def reset(self) -> None:
        self.text = ""

    def suggest(self, k: int) -> SuggestResult:
        if not self.text:
            return SuggestResult([])
        split = self.suggester.split(self.text)
        if split.context != self._context_text:
            self._context_text, self._context_ids = split.context, self.suggester.context_ids(split)
        log_probs, state = self.context.read(self._context_ids)
        return self.suggester.suggest_from(split, log_probs, state, k)
