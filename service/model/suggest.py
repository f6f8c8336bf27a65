"""Whole-word suggestions, word completion and phrase association from a StepModel.

How the text before the cursor is read:

    "I like eating app"   context "I like eating" | typed " app" | prefix "app"  -> completions of "app"
    "I like eating "      context "I like eating" | typed " "    | no prefix     -> next words
    "我昨"                 context "我昨"           (text without spaces)          -> phrases of 1..N characters

* Word models: the next token is the next word; completions are the vocabulary
  words starting with the prefix, renormalised over all of them.
* Char and SentencePiece models: a beam search over tokens up to the next word
  boundary. A word's probability is the product over its tokens times the
  probability that a boundary (space, punctuation, end of sentence) follows,
  summed over the token paths that spell it. A typed prefix constrains the
  search to tokens that agree with it; completions are renormalised over the
  completions found.
* Text written without spaces (the last character is CJK): each of the most
  probable next tokens is extended, one token at a time, while the model's
  next token is at least ``phrase_threshold`` probable, up to
  ``max_phrase_chars`` characters: 我 -> 们, 的, 昨天 as an input method's
  association (联想) shows them. With word tokens (jieba) each suggestion is
  one whole word: 我 -> 昨天, 上学 -> 迟到.
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from service.model.personal_tokens import NOTHING_LACKING, Lacking
from service.model.steps import StepModel, encode_context
from service.model.tokenizer import EOS, SPECIAL_TOKENS, Tokenizer, is_cjk

_PARTIAL_WORD = re.compile(r"[\w'’]+$")
SUGGESTED_WORD = re.compile(r"[\w'’]*\w[\w'’]*")  # a word as suggestions show it (and evaluation scores it)
_NO_SPACE_SCRIPT = re.compile(r"[\u3000-\u303f\uff00-\uffef]")  # CJK punctuation and full-width forms


@dataclass(frozen=True)
class SuggestConfig:
    max_context_tokens: int = 1024  # longer text keeps its last tokens (see service/model/steps.py)
    beam_size: int = 8  # hypotheses kept per step of the word search
    max_word_chars: int = 24  # the word search gives up on longer words
    max_phrase_chars: int = 4  # longest phrase for text without spaces
    phrase_threshold: float = 0.25  # extend a phrase while the next token is at least this probable


@dataclass(frozen=True)
class SplitText:
    context: str  # the text the model reads
    typed: str  # what follows the context: white space and the half-typed word
    prefix: str  # the half-typed word, as typed ("" when none)
    phrases: bool  # text without spaces: suggest phrases


@dataclass(frozen=True)
class SuggestResult:
    suggestions: list[tuple[str, float]]
    completes_word: bool = False
    prefix: str = ""


class _Hypothesis(NamedTuple):
    """A partial word in the search."""

    score: float  # log-probability of the tokens so far
    text: str  # the text they spell
    log_probs: Tensor  # [V] the next token's
    state: Tensor  # [L, 1, S]


class _Candidate(NamedTuple):
    """A hypothesis extended by one token, before the model reads it."""

    score: float
    text: str
    parent: int  # index of the hypothesis it extends
    token: int


class _Personal:
    """A user's mix for a search that goes on from ``context``: each row's text is context + what it added."""

    def __init__(self, personal, context: str) -> None:
        self.personal, self.context = personal, context

    def after(self, added: list[str], log_probs: Tensor) -> Tensor:
        return self.personal.mix_rows([self.context + text for text in added], log_probs)


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    high, low = max(a, b), min(a, b)
    return high + math.log1p(math.exp(low - high))


class Suggester:
    def __init__(self, model: StepModel, tokenizer: Tokenizer, config: SuggestConfig = SuggestConfig()) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        texts = [tokenizer.token_text(i) for i in range(tokenizer.vocab_size)]
        if tokenizer.kind == "word":
            texts = [t.strip() for t in texts]
        self.texts = texts
        # words as they are shown: their written forms when the file has them ("lord" -> "LORD")
        self.written = getattr(tokenizer, "written", None) is not None
        self.shown = [tokenizer.display_text(i).strip() for i in range(tokenizer.vocab_size)] if self.written else texts
        vocab = len(texts)
        specials = torch.zeros(vocab, dtype=torch.bool)
        specials[: len(SPECIAL_TOKENS)] = True
        pieces = [t.lstrip() for t in texts]

        def mask(predicate) -> Tensor:
            return torch.tensor([predicate(t) for t in texts], dtype=torch.bool) & ~specials

        self.word_mask = mask(lambda t: bool(SUGGESTED_WORD.fullmatch(t)))  # a whole word
        self.starts_word = mask(lambda t: bool(SUGGESTED_WORD.fullmatch(t.lstrip())))  # may begin a word
        self.lead_space = mask(lambda t: t != "" and t.isspace())  # white space alone
        ends = torch.tensor([bool(t) and not (t[0].isalnum() or t[0] in "'’_") for t in texts], dtype=torch.bool)
        ends[EOS] = True
        self.ends_ids = ends.nonzero().flatten()  # a boundary follows
        self.cjk_ids = mask(lambda t: t.strip() != "" and all(is_cjk(c) for c in t.strip())).nonzero().flatten()
        # For prefix constraints: pieces sorted for "starts with r", and by exact piece for "is a prefix of r".
        order = sorted((p, i) for i, p in enumerate(pieces) if p and not specials[i])
        self._sorted_pieces = [p for p, _ in order]
        self._sorted_ids = [i for _, i in order]
        self._by_piece: dict[str, list[int]] = {}
        for p, i in order:
            self._by_piece.setdefault(p, []).append(i)

    # ------------------------------------------------------------------ reading the text

    def split(self, text: str) -> SplitText:
        stripped = text.rstrip()
        last = stripped[-1:] if stripped else ""
        if self.tokenizer.kind != "word" and (is_cjk(last) or _NO_SPACE_SCRIPT.match(last or " ")):
            return SplitText(context=stripped, typed="", prefix="", phrases=True)
        # A half-typed word is short: searching the tail keeps this O(1) in the text's length.
        match = _PARTIAL_WORD.search(text, max(0, len(text) - 4 * self.config.max_word_chars))
        prefix = match.group() if match else ""
        before = text[: len(text) - len(prefix)]
        context = before.rstrip()
        typed = text[len(context) :] if context else prefix
        return SplitText(context=context, typed=typed, prefix=prefix, phrases=False)

    def context_ids(self, split: SplitText) -> list[int]:
        return self.tokenizer.encode(split.context) if split.context else []

    def suggest(self, text: str, k: int, personal=None) -> SuggestResult:
        split = self.split(text)
        log_probs, state, _ = encode_context(self.model, self.context_ids(split), self.config.max_context_tokens)
        return self.suggest_from(split, log_probs, state, k, personal)

    def suggest_from(self, split: SplitText, log_probs: Tensor, state: Tensor, k: int, personal=None) -> SuggestResult:
        """Suggestions given the model's output after reading ``split.context``. ``personal``: a user's history
        mixed into every next-token distribution read (service/model/personal_mix.py PersonalMix), or None."""
        search = _Personal(personal, split.context) if personal else None
        if split.phrases:
            return SuggestResult(self._phrases(log_probs, state, k, search))
        prefix = self.tokenizer.normalize(split.prefix)
        if self.tokenizer.kind == "word":
            lacking = NOTHING_LACKING
            if personal:
                log_probs, lacking = personal.mix(split.context, log_probs)
            found = self._next_words(log_probs, prefix, k, lacking)
        else:
            typed = self.tokenizer.normalize(split.typed).lstrip()
            lacking = personal.lacking(split.context) if personal else NOTHING_LACKING
            found = self._search_words(log_probs, state, typed, k, search, lacking)
        if split.prefix and not (self.written and self.tokenizer.kind == "word"):
            # keep what was typed, case included: "App" -> "Apple" (written forms replace it: "mo" -> "Moses")
            found = [(split.prefix + word[len(prefix) :], p) for word, p in found]
        return SuggestResult(found, completes_word=bool(split.prefix), prefix=split.prefix)

    # ------------------------------------------------------------------ word models

    def _pieces_starting_with(self, start: str) -> list[int]:
        low = bisect.bisect_left(self._sorted_pieces, start)
        high = bisect.bisect_left(self._sorted_pieces, start + "\U0010ffff")
        return self._sorted_ids[low:high]

    def _next_words(
        self, log_probs: Tensor, prefix: str, k: int, lacking: Lacking = NOTHING_LACKING
    ) -> list[tuple[str, float]]:
        """The vocabulary's words (and the user's that it lacks, ``lacking``) ranked together; with a prefix,
        those that complete it, renormalised over all of them."""
        if prefix:
            candidates = torch.tensor(self._pieces_starting_with(prefix), dtype=torch.long)
            ids = candidates[self.word_mask[candidates]] if candidates.numel() else candidates
            extra = lacking.starting(prefix, self.tokenizer.normalize)
            if ids.numel() == 0 and not extra:
                return []
            scores = log_probs[ids]
            total = torch.logsumexp(scores, dim=0).item() if ids.numel() else -math.inf
            total = _logaddexp(total, math.log(sum(p for _, p in extra))) if extra else total
            top = scores.topk(min(k, ids.numel()))
            found = [(v - total, i) for v, i in zip(top.values.tolist(), ids[top.indices].tolist())]
            extra = [(word, math.log(p) - total) for word, p in extra[:k]]
        else:
            top = log_probs.masked_fill(~self.word_mask, -math.inf).topk(min(k, log_probs.numel()))
            found = [(v, i) for v, i in zip(top.values.tolist(), top.indices.tolist()) if v > -math.inf]
            extra = [(word, math.log(p)) for word, p in lacking.top(k)]
        ranked = [(self.shown[i], v) for v, i in found] + extra
        if extra:
            ranked.sort(key=lambda item: -item[1])
        return [(word, math.exp(v)) for word, v in ranked[:k]]

    # ------------------------------------------------------------------ char and sentencepiece models

    def _compatible(self, remaining: str) -> Tensor:
        """Tokens whose piece agrees with the text still to be matched: a prefix of it, or starting with it."""
        allowed = torch.zeros(len(self.texts), dtype=torch.bool)
        for end in range(1, len(remaining) + 1):
            for i in self._by_piece.get(remaining[:end], ()):
                allowed[i] = True
        allowed[self._pieces_starting_with(remaining)] = True
        return allowed

    def _allowed(self, generated: str, typed: str) -> Tensor:
        word = generated.lstrip()
        if word:
            base = self.word_mask  # word characters only: the word goes on
        else:
            base = self.starts_word | self.lead_space if generated == "" else self.starts_word
        remaining = typed[len(word) :]
        if remaining:
            compatible = self._compatible(remaining)
            if generated == "":
                compatible |= self.lead_space
            base = base & compatible
        return base.nonzero().flatten()

    def _search_words(
        self,
        log_probs: Tensor,
        state: Tensor,
        typed: str,
        k: int,
        personal: _Personal | None = None,
        lacking: Lacking = NOTHING_LACKING,
    ) -> list[tuple[str, float]]:
        """Words of pieces, searched token by token; ``lacking``: a user's words that the tokens cannot spell,
        ranked with them by their probabilities in the mix."""
        beam = max(self.config.beam_size, k)
        if personal is not None:
            log_probs = personal.after([""], log_probs[None])[0]
        hypotheses = [_Hypothesis(0.0, "", log_probs, state)]
        finished: dict[str, float] = {}  # word -> log-probability, summed over the token paths that spell it
        for _ in range(self.config.max_word_chars + len(typed) + 1):
            candidates: list[_Candidate] = []
            for parent, hypothesis in enumerate(hypotheses):
                word = hypothesis.text.lstrip()
                if word and len(word) >= len(typed):
                    end = torch.logsumexp(hypothesis.log_probs[self.ends_ids], dim=0).item()
                    finished[word] = _logaddexp(finished.get(word, -math.inf), hypothesis.score + end)
                if len(word) >= self.config.max_word_chars:
                    continue
                allowed = self._allowed(hypothesis.text, typed)
                if allowed.numel() == 0:
                    continue
                top = hypothesis.log_probs[allowed].topk(min(beam, allowed.numel()))
                for value, j in zip(top.values.tolist(), top.indices.tolist()):
                    token = int(allowed[j])
                    candidates.append(
                        _Candidate(hypothesis.score + value, hypothesis.text + self.texts[token], parent, token)
                    )
            candidates.sort(key=lambda c: -c.score)
            best = sorted(finished.values(), reverse=True)
            floor = best[k - 1] if len(best) >= k else -math.inf
            # extensions only lose probability: a candidate below the k-th finished word cannot enter
            candidates = [c for c in candidates[:beam] if c.score > floor]
            if not candidates:
                break
            tokens = torch.tensor([[c.token] for c in candidates], dtype=torch.long)
            states = torch.cat([hypotheses[c.parent].state for c in candidates], dim=1)
            next_log_probs, next_states = self.model.advance(tokens, states)
            if personal is not None:
                next_log_probs = personal.after([c.text for c in candidates], next_log_probs)
            hypotheses = [
                _Hypothesis(c.score, c.text, next_log_probs[i], next_states[:, i : i + 1])
                for i, c in enumerate(candidates)
            ]
        for word, p in lacking.starting(typed, self.tokenizer.normalize) if typed else lacking.top(k):
            finished[word] = _logaddexp(finished.get(word, -math.inf), math.log(p))
        ranked = sorted(finished.items(), key=lambda item: -item[1])
        if typed.strip():  # completing a word: renormalise over the completions found
            total = -math.inf
            for _, score in ranked:
                total = _logaddexp(total, score)
            ranked = [(word, score - total) for word, score in ranked]
        return [(word, math.exp(score)) for word, score in ranked[:k]]

    # ------------------------------------------------------------------ text without spaces

    def _phrases(self, log_probs: Tensor, state: Tensor, k: int, personal: _Personal | None = None):
        ids = self.cjk_ids
        if ids.numel() == 0:
            return []
        if personal is not None:
            log_probs = personal.after([""], log_probs[None])[0]
        limit = self.config.max_phrase_chars
        top = log_probs[ids].topk(min(ids.numel(), max(3 * k, 10)))
        live = [
            (v, self.texts[int(ids[j])].strip(), int(ids[j])) for v, j in zip(top.values.tolist(), top.indices.tolist())
        ]
        live = [c for c in live if len(c[1]) <= limit]
        done: list[tuple[float, str]] = []
        if self.tokenizer.kind == "jieba":  # word tokens: each suggestion is a whole word already
            done, live = [(score, phrase) for score, phrase, _ in live], []
        states = state.expand(-1, len(live), -1).contiguous()
        while live:
            tokens = torch.tensor([[c[2]] for c in live], dtype=torch.long)
            next_log_probs, states = self.model.advance(tokens, states)
            if personal is not None:
                next_log_probs = personal.after([phrase for _, phrase, _ in live], next_log_probs)
            keep, extended = [], []
            for i, ((score, phrase, _), step) in enumerate(zip(live, self._next_pieces(next_log_probs, states))):
                piece = self.texts[step[0]].strip() if step is not None else ""
                if step is not None and len(phrase) + len(piece) <= limit:
                    extended.append((score + step[1], phrase + piece, step[0]))
                    keep.append(i)
                else:
                    done.append((score, phrase))
            live = extended
            states = states[:, keep] if keep else states
        merged: dict[str, float] = {}
        for score, phrase in done:
            merged[phrase] = _logaddexp(merged.get(phrase, -math.inf), score)
        ranked = sorted(merged.items(), key=lambda item: -item[1])[:k]
        return [(phrase, math.exp(score)) for phrase, score in ranked]

    def _next_pieces(self, log_probs: Tensor, states: Tensor) -> list[tuple[int, float] | None]:
        """For each phrase just read (a row of ``log_probs``; ``states``, the model's after it): the token it goes
        on with and that token's log-probability, or None where no next character is phrase_threshold probable."""
        best_values, best_index = log_probs[:, self.cjk_ids].max(dim=1)
        tokens = self.cjk_ids[best_index].tolist()
        passing = (best_values.exp() >= self.config.phrase_threshold).tolist()
        return [(t, v) if ok else None for t, v, ok in zip(tokens, best_values.tolist(), passing)]
