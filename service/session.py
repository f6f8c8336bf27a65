"""Typing sessions: the text typed so far and the model state that reads it.

The state after reading the context is kept at the end of each update in a
bounded history, keyed by how many tokens of the window it has read. An edit
re-tokenises the context (cheap), finds the longest common prefix with what was
read before, goes back to the latest state within it and reads only the rest:

    read:     <s> I ▁like ▁eat ing              states kept after: 1, 3, 5 tokens
    edit:     <s> I ▁like ▁eaten                common prefix 3 -> resume at 3, read "▁eaten"

So a keystroke costs a step or two however long the text is, and a delete
goes back to an earlier state without reading the text again.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import Tensor

from service.runner import StepModel, encode_context, window_start
from service.suggest import Suggester, SuggestResult


class IncrementalContext:
    def __init__(self, model: StepModel, limit: int, history: int = 64) -> None:
        self.model = model
        self.limit = limit
        self.start = 0
        self.window: list[int] = []
        self.saved: deque[tuple[int, Tensor, Tensor]] = deque(maxlen=history)  # (tokens read, log-probs, state)
        self.steps = 0  # tokens the model has read, for tests and metrics

    def read(self, token_ids: list[int]) -> tuple[Tensor, Tensor]:
        """(log-probs [V], state [L, 1, S]) after ``<s>`` and the window of ``token_ids``."""
        start = window_start(len(token_ids), self.limit)
        window = token_ids[start:]
        common = 0
        if start == self.start:
            if window[: len(self.window)] == self.window:  # the usual keystroke: same or longer context
                common = len(self.window)
            else:
                for a, b in zip(window, self.window):
                    if a != b:
                        break
                    common += 1
        else:
            self.saved.clear()
        while self.saved and self.saved[-1][0] > common:
            self.saved.pop()
        if self.saved:
            done, log_probs, state = self.saved[-1]
            if done < len(window):
                log_probs, state = self.model.advance(torch.tensor([window[done:]], dtype=torch.long), state)
                log_probs = log_probs[0]
                self.steps += len(window) - done
        else:
            log_probs, state, _ = encode_context(self.model, token_ids, self.limit)
            self.steps += len(window) + 1
        if not self.saved or self.saved[-1][0] != len(window):
            self.saved.append((len(window), log_probs, state))
        self.start, self.window = start, window
        return log_probs, state


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
            raise EditError(f"the session's text would be {len(self.text) + len(text)} characters; "
                            f"the limit is {self.max_chars}")
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
