"""Scoring a model on held-out text: every line read on its own from ``<s>``, as the service reads a
request, and typed through the serving code (service/model/suggest.py), so what is counted is what a user
would see. ``training/evaluate.py`` turns the counts into metrics and tables; the metrics are
described there.

Lines are read in groups: one model call per token position feeds every line of the group
(``walk_batch``), and the outputs after each prefix are kept (``PrefixStates``) for the
suggestions at every word of the line.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from service.model.personal import HistoryConfig, UserHistory, ngrams_ending, units
from service.model.personal_mix import PersonalMix
from service.model.personal_tokens import (
    SERVED_WEIGHTS,
    LearnedWeights,
    OnlineWeights,
    bucket_of,
    fit,
    token_probability,
)
from service.model.steps import PrefixStates, StepModel, walk_batch
from service.model.suggest import SUGGESTED_WORD, SplitText, SuggestConfig, Suggester
from service.model.tokenizer import BOS, EOS, UNK, Tokenizer, WordTokenizer, is_cjk
from training import rerank_rule

TOP_K = (1, 3, 5)
PREFIXES = (1, 2, 3)
LINES_AT_ONCE = 64  # lines whose tokens share one model call per position


@dataclass
class Scorer:
    """A model to judge: ``probabilities`` for perplexity, ``ranking`` for suggestions (often the same)."""

    name: str
    probabilities: StepModel
    ranking: StepModel


@dataclass
class Tally:
    nats: float = 0.0
    tokens: int = 0
    text_tokens: int = 0
    unknown: int = 0
    characters: int = 0
    targets: int = 0
    top: dict[int, int] = field(default_factory=lambda: {k: 0 for k in TOP_K})
    completion_targets: dict[int, int] = field(default_factory=lambda: {n: 0 for n in PREFIXES})
    completion_hits: dict[tuple[int, int], int] = field(default_factory=dict)
    keys_without: int = 0
    keys_with: int = 0
    lines: int = 0
    first_hits: list[bool] = field(default_factory=list)  # per target: ranked first?
    # per target: (line number, length of the text the model read before it)
    context_ends: list[tuple[int, int]] = field(default_factory=list)

    def report(self, units: str) -> dict:
        out = {
            "perplexity": math.exp(self.nats / self.tokens) if self.tokens else None,
            "bits_per_character": self.nats / math.log(2) / self.characters if self.characters else None,
            "tokens": self.tokens,
            "unknown_token_rate": self.unknown / self.text_tokens if self.text_tokens else 0.0,
            "targets": self.targets,
        }
        for k in TOP_K:
            out[f"top{k}"] = self.top[k] / self.targets if self.targets else None
        out["ksr"] = 1 - self.keys_with / self.keys_without if self.keys_without else None
        for n in PREFIXES:
            for k in (1, 3):
                count = self.completion_targets[n]
                hits = self.completion_hits.get((n, k), 0)
                out[f"completion{n}_hit{k}"] = hits / count if count and units == "words" else None
        return out


class _LineReader:
    """The ranking model's output after any prefix of one line, from the outputs after its tokens."""

    def __init__(self, tokenizer: Tokenizer, prefixes: PrefixStates) -> None:
        self.tokenizer, self.prefixes = tokenizer, prefixes
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def after(self, context: str) -> tuple[torch.Tensor, torch.Tensor]:
        found = self.cache.get(context)
        if found is None:  # a tokenizer that segments a prefix differently (SentencePiece) reads the rest
            ids = self.tokenizer.encode(context) if context else []
            found = self.cache[context] = self.prefixes.read([BOS, *ids], keep=False)
        return found


def text_without_spaces(lines: Sequence[str]) -> bool:
    """Mostly CJK characters and few spaces: scored character by character."""
    sample = "".join(lines[:2000])
    cjk = sum(1 for ch in sample if is_cjk(ch))
    return cjk > 0.3 * max(1, len(sample)) and sample.count(" ") < 0.05 * len(sample)


def _matches(suggestion: str, target: str, tokenizer: Tokenizer) -> bool:
    return tokenizer.normalize(suggestion) == tokenizer.normalize(target)


class Learning:
    """A simulated user (``nextword-eval --learn``): the text is typed in order by one user whose personal
    history (service/model/personal.py, kept in memory as the server's cache keeps it) learns each line
    after it is typed, and is part of the distribution that suggestions and perplexity are taken from, as
    the server mixes it for a call that names a user (service/model/personal_mix.py).

    ``fit_weights``: the first lines typed fit the history's weights before the rest is scored. ``rule``
    "rerank": the rule served before, for comparison (training/rerank_rule.py): suggestions re-ranked, the
    probabilities the model's."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        weights: LearnedWeights = SERVED_WEIGHTS,
        rule: str = "mix",
        online: float | None = None,
        scorer: Scorer | None = None,
        order: int = HistoryConfig.order,
    ) -> None:
        self.history = UserHistory(HistoryConfig(order=order))
        self.tokenizer = tokenizer
        self.weights = weights
        self.rule = rule
        # online (the prior, in tokens): the weights also fitted to this user as they type (OnlineWeights), from
        # ``weights`` or those fitted by ``fit_weights``; each scored line's tokens move them once it is typed
        self.online = OnlineWeights(weights, online) if online is not None else None
        self.scorer = scorer  # what reads a typed line for the online weights (``typed``), where lines are not scored
        self.now = time.time()
        self.lacks = rerank_rule.vocabulary_lacks(tokenizer)

    def personal(self) -> PersonalMix:
        return PersonalMix(self.history, self.tokenizer, self.weights, now=self.now)

    def typed(self, line: str) -> None:
        """The user typed ``line``: their online weights follow its tokens (read by ``scorer``), then it is learned."""
        if self.online is not None and self.scorer is not None:
            ids = self.tokenizer.encode(line)
            self.token_log_loss(line, ids, walk_batch(self.scorer.probabilities, [[BOS, *ids]])[0])
        self.learn(line)

    def learn(self, line: str) -> None:
        for gram in ngrams_ending(units(line), 0, self.history.config.order):
            self.history.add(gram, 1.0, self.now)

    def token_log_loss(self, line: str, ids: list[int], walk: list[tuple[torch.Tensor, torch.Tensor]], into=None):
        """Nats of each token of the line and ``</s>`` under the served model mixed with the history; ``into``:
        lists (served, user, bucket) that each token's probabilities are added to, for fitting."""
        personal, vocab = self.personal(), self.tokenizer.vocab_size
        rows = len(self.weights.weights)
        nats = 0.0
        observe = self.online is not None and into is None  # a scored line, typed: the user's weights follow it
        if observe:
            into = ([], [], [])
        for context, (log_probs, _), target in zip(token_contexts(self.tokenizer, line, ids), walk, [*ids, EOS]):
            served = math.exp(float(log_probs[target]))
            user = personal.user(context) if len(self.history) else None
            mine = token_probability(user, target, vocab) if target != EOS else 0.0
            weight = self.weights.weight(user.seen, user.evidence) if user is not None else 0.0
            nats -= math.log(max((1 - weight) * served + weight * mine, 1e-300))
            if into is not None:
                into[0].append(served)
                into[1].append(mine)
                into[2].append(bucket_of(user, rows))
        if observe and self.online is not None and into is not None:
            served_p, user_p, buckets = (np.asarray(column) for column in into)
            self.weights = self.online.observe(served_p, user_p, buckets.astype(np.int64))
        return nats

    def fit_weights(self, scorer: Scorer, lines: Sequence[str], lines_at_once: int = LINES_AT_ONCE) -> LearnedWeights:
        """Type ``lines`` in order, learning each, and fit the history's weights on their tokens (EM, as the
        memory's are fitted at export): the weights used from then on."""
        records: tuple[list, list, list] = ([], [], [])
        for first in range(0, len(lines), lines_at_once):
            group = lines[first : first + lines_at_once]
            sequences = [[BOS, *self.tokenizer.encode(line)] for line in group]
            for line, tokens, walk in zip(group, sequences, walk_batch(scorer.probabilities, sequences)):
                self.token_log_loss(line, tokens[1:], walk, into=records)
                self.learn(line)
        served, user, buckets = (np.asarray(column) for column in records)
        known = buckets >= 0
        shape = (len(self.weights.weights), len(self.weights.weights[0]))
        self.weights = fit(served[known], user[known], buckets[known], shape, prior=self.weights)
        if self.online is not None:
            self.online = OnlineWeights(self.weights, self.online.prior)
        return self.weights


def token_contexts(tokenizer: Tokenizer, line: str, ids: list[int]) -> list[str]:
    """The text before each token of ``line`` and before ``</s>``, as the user typed it (words the
    vocabulary lacks included, where the tokenizer tells where each token lies)."""
    if isinstance(tokenizer, WordTokenizer):
        words = tokenizer.split(tokenizer.normalize(line))
        if len(words) == len(ids):
            return [" ".join(words[:i]) for i in range(len(ids) + 1)]
    elif tokenizer.kind == "char":
        text = tokenizer.normalize(line)
        if len(text) == len(ids):
            return [text[:i] for i in range(len(ids) + 1)]
    return [tokenizer.decode(ids[:i]) for i in range(len(ids) + 1)]


def _shown(suggester: Suggester, split: SplitText, log_probs, state, k: int, learning: Learning | None) -> list[str]:
    if learning is not None and learning.rule == "rerank":
        found = suggester.suggest_from(split, log_probs, state, max(k, rerank_rule.SERVED_FOR_HISTORY)).suggestions
        ranked = rerank_rule.rerank(learning.history, split.context, split.prefix, found, k, learning.lacks)
        return [text for text, _ in ranked]
    personal = learning.personal() if learning is not None else None
    return [text for text, _ in suggester.suggest_from(split, log_probs, state, k, personal).suggestions]


class _WordSuggestions:
    """What is shown while one word is typed, by the number of its letters typed (each asked once)."""

    def __init__(
        self, suggester: Suggester, reader: _LineReader, before: str, word: str, shown: int, learning: Learning | None
    ) -> None:
        self.suggester, self.reader, self.before, self.word, self.shown = suggester, reader, before, word, shown
        self.learning = learning
        self.ranked: dict[int, list[str]] = {}

    def __call__(self, typed: int) -> list[str]:
        if typed not in self.ranked:
            split = self.suggester.split(self.before + self.word[:typed])
            log_probs, state = self.reader.after(split.context)
            self.ranked[typed] = _shown(self.suggester, split, log_probs, state, self.shown, self.learning)
        return self.ranked[typed]


def score_words(
    line: str,
    suggester: Suggester,
    reader: _LineReader,
    tally: Tally,
    ksr_suggestions: int,
    learning: Learning | None = None,
) -> None:
    tokenizer = suggester.tokenizer
    shown = max(max(TOP_K), ksr_suggestions)
    saved = 0
    for match in SUGGESTED_WORD.finditer(line):
        word, start = match.group(), match.start()
        suggestions = _WordSuggestions(suggester, reader, line[:start], word, shown, learning)
        tally.targets += 1
        first = suggestions(0)
        for k in TOP_K:
            tally.top[k] += any(_matches(s, word, tokenizer) for s in first[:k])
        tally.first_hits.append(any(_matches(s, word, tokenizer) for s in first[:1]))
        tally.context_ends.append((tally.lines, len(suggester.split(line[:start]).context)))
        for n in PREFIXES:
            if len(word) > n:
                tally.completion_targets[n] += 1
                found = suggestions(n)
                for k in (1, 3):
                    if any(_matches(s, word, tokenizer) for s in found[:k]):
                        tally.completion_hits[(n, k)] = tally.completion_hits.get((n, k), 0) + 1
        for typed in range(len(word)):
            if any(_matches(s, word, tokenizer) for s in suggestions(typed)[:ksr_suggestions]):
                space = 1 if line[match.end() : match.end() + 1] == " " else 0
                saved += len(word) - typed + space - 1
                break
    tally.keys_without += len(line)
    tally.keys_with += len(line) - saved


def score_characters(
    line: str,
    suggester: Suggester,
    reader: _LineReader,
    tally: Tally,
    ksr_suggestions: int,
    learning: Learning | None = None,
) -> None:
    shown = max(max(TOP_K), ksr_suggestions)
    ranked: dict[int, list[str]] = {}

    def suggestions(position: int) -> list[str]:
        if position not in ranked:
            context = line[:position]
            log_probs, state = reader.after(context)
            split = SplitText(context=context, typed="", prefix="", phrases=True)
            ranked[position] = _shown(suggester, split, log_probs, state, shown, learning)
        return ranked[position]

    for position, ch in enumerate(line):
        if is_cjk(ch):
            tally.targets += 1
            found = suggestions(position)
            for k in TOP_K:
                tally.top[k] += any(line.startswith(s, position) for s in found[:k])
            tally.first_hits.append(any(line.startswith(s, position) for s in found[:1]))
            tally.context_ends.append((tally.lines, position))
    position = keys = 0
    while position < len(line):
        step = 1
        if is_cjk(line[position]):
            taken = [s for s in suggestions(position)[:ksr_suggestions] if line.startswith(s, position)]
            step = max((len(s) for s in taken), default=1)
        position += step
        keys += 1
    tally.keys_without += len(line)
    tally.keys_with += keys


def metrics(
    scorer: Scorer,
    tokenizer: Tokenizer,
    lines: Sequence[str],
    ksr_suggestions: int = 3,
    config: SuggestConfig = SuggestConfig(),
) -> dict:
    """All metrics of one model on ``lines`` (described in training/evaluate.py)."""
    units, tally = score(scorer, tokenizer, lines, ksr_suggestions, config)
    return {"units": units, **tally.report(units)}


def score(
    scorer: Scorer,
    tokenizer: Tokenizer,
    lines: Sequence[str],
    ksr_suggestions: int = 3,
    config: SuggestConfig = SuggestConfig(),
    progress: Callable[[int], None] | None = None,
    lines_at_once: int = LINES_AT_ONCE,
    learning: Learning | None = None,
    row: type[Suggester] = Suggester,
    every: int = 1,
) -> tuple[str, Tally]:
    """The units scored ("words" or "characters") and the tally of every metric, per target included.
    ``progress(n)`` is told each time n more lines are read. ``learning``: a simulated user's suggestions and
    perplexity, who learns each line once it is typed. ``row``: what fills the suggestions (the served
    Suggester, or another way to compare with it). ``every``: score every n-th line only (the first, the
    n+1-th, ...); the user still types, and learns, every line."""
    units = "characters" if text_without_spaces(lines) else "words"
    suggester = row(scorer.ranking, tokenizer, config)
    tally = Tally()
    for first in range(0, len(lines), lines_at_once):
        group = lines[first : first + lines_at_once]
        chosen = [line for i, line in enumerate(group, first) if i % every == 0]
        sequences = [[BOS, *tokenizer.encode(line)] for line in chosen]
        walks = walk_batch(scorer.probabilities, sequences)
        ranked = walks if scorer.ranking is scorer.probabilities else walk_batch(scorer.ranking, sequences)
        scored = iter(zip(sequences, walks, ranked))
        for index, line in enumerate(group, first):
            if index % every == 0:
                tokens, walk, ranking = next(scored)
                _count_log_loss(tally, line, tokens[1:], walk, learning)
                reader = _LineReader(tokenizer, PrefixStates.from_walk(scorer.ranking, tokens, ranking))
                if units == "words":
                    score_words(line, suggester, reader, tally, ksr_suggestions, learning)
                else:
                    score_characters(line, suggester, reader, tally, ksr_suggestions, learning)
                tally.lines += 1
            if learning is not None:
                learning.learn(line)
        if progress is not None:
            progress(len(group))
    return units, tally


def _count_log_loss(
    tally: Tally, line: str, ids: list[int], walk: list[tuple[torch.Tensor, torch.Tensor]], learning=None
) -> None:
    """Add the line's log-loss: each token and ``</s>``, given the output before it (and, ``learning``, the
    user's history before the line)."""
    targets = [*ids, EOS]
    if learning is not None and learning.rule == "mix":
        tally.nats += learning.token_log_loss(line, ids, walk)
    else:
        for (log_probs, _), target in zip(walk, targets):
            tally.nats -= float(log_probs[target])
    tally.tokens += len(targets)
    tally.text_tokens += len(ids)
    tally.unknown += sum(1 for t in ids if t == UNK)
    tally.characters += len(line) + 1
