"""Typing sessions: the text typed so far and the model state that reads it.

An edit re-tokenises the context (cheap) and reads it through ``PrefixStates``
(service/model/steps.py), which keeps the output after the ends of recent reads and
feeds the model only what follows the longest prefix it shares with them:

    read:     <s> I ▁like ▁eat ing              kept after: 1, 3, 5 tokens
    edit:     <s> I ▁like ▁eaten                common prefix 3 -> resume at 3, read "▁eaten"

So a keystroke costs a step or two however long the text is, and a delete
goes back to a kept state without reading the text again.

On a Chinese model a session also composes pinyin: letters typed into the
composition are converted (service/model/pinyin.py) after the session's text, read
from the same kept states; selecting a candidate commits its text and removes
the letters it stands for. A keystroke in the composition reads mostly the
tokens the last one read (the same readings of the same syllables), so the
session keeps the model's outputs of its last conversion, by the tokens read
after its text, and the next conversion computes only the rows it lacks.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from torch import Tensor

from service.model.pinyin import Candidate, Converter
from service.model.steps import PrefixStates, StepModel, window_start
from service.model.suggest import Suggester, SuggestResult
from service.model.tokenizer import BOS


class IncrementalContext:
    """Reads growing and shrinking texts within the context window (see service/model/steps.py)."""

    def __init__(self, model: StepModel, limit: int, history: int = 64) -> None:
        self.limit = limit
        self.start = 0
        self.prefixes = PrefixStates(model, history)

    @property
    def steps(self) -> int:
        """Tokens the model has read, for tests and metrics."""
        return self.prefixes.steps

    def read(self, token_ids: list[int], keep: bool = True) -> tuple[Tensor, Tensor]:
        """(log-probs [V], state [L, 1, S]) after ``<s>`` and the window of ``token_ids``. ``keep``: as
        ``PrefixStates.read`` (False: a look back that leaves the kept states as they are)."""
        start = window_start(len(token_ids), self.limit)
        if keep and start != self.start:  # the window moved: nothing kept is a prefix of it
            self.prefixes.clear()
            self.start = start
        return self.prefixes.read([BOS, *token_ids[start:]], keep)


class EditError(ValueError):
    """An edit the session refuses (its text would pass the length limit)."""


class TypingSession:
    """One Type stream: apply edits, answer with suggestions (same as Suggest for the same text)."""

    def __init__(
        self,
        suggester: Suggester,
        max_chars: int,
        history: int = 64,
        converter: Converter | None = None,
        max_letters: int = 64,
    ) -> None:
        self.suggester = suggester
        self.max_chars = max_chars
        self.text = ""
        self.context = IncrementalContext(suggester.model, suggester.config.max_context_tokens, history)
        self._context_text, self._context_ids = "", list[int]()  # keystrokes inside a word keep the same context
        self.converter = converter  # pinyin composition, on a Chinese model
        self.max_letters = max_letters
        self.composition = ""  # pinyin letters typed and not yet committed
        self.candidates: list[Candidate] = []  # the composition's candidates, as last answered
        # the model's outputs of the last conversion, by the tokens read after the text (while it is unchanged)
        self._memo: dict = {}
        self._memo_text = ""

    def append(self, text: str) -> None:
        if len(self.text) + len(text) > self.max_chars:
            raise EditError(
                f"the session's text would be {len(self.text) + len(text)} characters; the limit is {self.max_chars}"
            )
        self.text += text

    def delete(self, count: int) -> None:
        """Letters of the composition go first, then characters of the text."""
        letters = min(count, len(self.composition))
        self.composition = self.composition[: len(self.composition) - letters]
        count -= letters
        if count:
            self.text = self.text[: max(0, len(self.text) - count)]

    def reset(self) -> None:
        self.text = self.composition = ""

    def compose(self, letters: str) -> None:
        if self.converter is None:
            raise EditError("compose needs a Chinese model: this one does not convert pinyin")
        if len(self.composition) + len(letters) > self.max_letters:
            raise EditError(
                f"the composition would hold {len(self.composition) + len(letters)} letters; "
                f"the limit is {self.max_letters} (server setting max_pinyin_letters)"
            )
        self.composition += letters

    def select(self, index: int) -> None:
        """Commit candidate ``index`` of the last answer: its text joins the text, its letters leave."""
        if index >= len(self.candidates):
            raise EditError(f"select {index}: the last answer had {len(self.candidates)} candidate(s), numbered from 0")
        chosen = self.candidates[index]
        self.append(chosen.text)
        self.composition = self.composition[chosen.consumed :]

    def convert(self, k: int, fuzzy: bool = False, personal=None) -> list[Candidate]:
        """The composition's candidates after the session's text (whose model state the session keeps);
        ``personal``: a user's history mixed in (personal_mix.PersonalMix)."""
        self.candidates = []
        if self.converter is None or not self.composition.strip("'"):
            return self.candidates
        start = self.context.read(self.suggester.tokenizer.encode(self.text))
        if self._memo_text != self.text:
            self._memo, self._memo_text = {}, self.text
        self.candidates = self.converter.convert(
            self.text, self.composition, k, fuzzy, start=start, memo=self._memo, personal=personal
        )
        return self.candidates

    def next_log_probs(self, text: str) -> Tensor:
        """The model's next-token log-probabilities [V] after ``text`` (which ends where a word begins), read
        from the states the session keeps (the text before a word just finished was read as it began)."""
        return self.context.read(self.suggester.context_ids(self.suggester.split(text)), keep=False)[0]

    def suggest(self, k: int, personal=None) -> SuggestResult:
        """Suggestions for the session's text; ``personal``: a user's history mixed in (personal_mix.PersonalMix)."""
        if not self.text:
            return SuggestResult([])
        split = self.suggester.split(self.text)
        if split.context != self._context_text:
            self._context_text, self._context_ids = split.context, self.suggester.context_ids(split)
        log_probs, state = self.context.read(self._context_ids)
        return self.suggester.suggest_from(split, log_probs, state, k, personal)


class EditStream:
    """A session's incoming edits, read ahead on a thread of their own so that waiting for the next one can
    time out (an idle session) while the stream itself blocks. At most ``ahead`` edits wait; an exception of
    type ``passes`` from the stream is handed on as an item (the caller answers it), and any other ends the
    stream as if it had finished."""

    END = object()  # the stream finished

    def __init__(self, edits: Iterator, ahead: int, passes: type[Exception], poll: float = 0.25) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._ended = threading.Event()  # the session is over: the reader stops too
        self._poll = poll  # seconds between a blocked reader's checks that the session is still on
        threading.Thread(target=self._read, args=(edits, passes), daemon=True, name="type-reader").start()

    def _offer(self, item) -> bool:
        while not self._ended.is_set():
            try:
                self._queue.put(item, timeout=self._poll)
                return True
            except queue.Full:
                pass
        return False

    def _read(self, edits: Iterator, passes: type[Exception]) -> None:
        try:
            for item in edits:
                if not self._offer(item):
                    return
        except passes as error:
            self._offer(error)
            return
        except Exception:  # noqa: BLE001 - the stream broke or was cancelled: the session ends
            pass
        self._offer(self.END)

    def next(self, timeout: float):
        """The next edit, an exception of type ``passes``, or END; raises ``queue.Empty`` after ``timeout`` s."""
        return self._queue.get(timeout=timeout)

    def close(self) -> None:
        self._ended.set()
