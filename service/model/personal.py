"""A user's personal history as a model: n-gram counts of what they typed (the store that keeps them is
service/history/; their mix with the served distribution, personal_tokens.py and personal_mix.py).

What is stored, per user: n-grams (orders 1 to ``order``) of the units they typed: words in text
with spaces, single characters in Chinese and other text without spaces. Units are surface forms
("Zelda", "LORD"), never a tokenizer's ids, so a history keeps working with another model file,
and words the model's vocabulary lacks are kept too. Raw text is never stored, only the counts.

Recency: each n-gram's count decays with a half-life (``--history-half-life-days``); a row holds
the count as of its ``last_used`` time, and a database upsert adds a new use as

    count = old_count * 2 ** (-(now - old_last_used) / half_life) + added

which is atomic, so concurrent learners (sessions, worker processes, replicas on one PostgreSQL)
lose no counts.

Prediction: an interpolated (Witten-Bell) estimate over the user's n-grams. As a distribution over a
model's next tokens it is part of the served distribution, mixed with weights fitted on typed text
(service/model/personal_tokens.py and personal_mix.py); ``predict`` gives the units that start with
what is being typed, for pinyin conversions and within a word. A user with no history gets exactly the
unpersonalised answer.

The store and its writer are service/history/; this module is the model alone, in memory, so that
evaluation (training/scoring.py) scores what the server would answer.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import re
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from service.model.personal_tokens import LearnedWeights, OnlineWeights
from service.model.tokenizer import is_cjk

SEPARATOR = "\x1f"  # between the units of a stored n-gram (a control character no one types)
TOTAL_SECONDS = 60.0  # how long a user's decayed unigram total is reused
_UNIT = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*|\d+|[^\s\w]", re.UNICODE)


def units(text: str) -> list[str]:
    """The units of a text: words (letters, with inner apostrophes), numbers, CJK characters one by one.
    Punctuation separates units and is not learned."""
    return [unit for unit, _ in unit_spans(text)]


def unit_spans(text: str) -> list[tuple[str, int]]:
    """``units`` with where each begins in ``text`` (a break, "", where its punctuation does)."""
    found: list[tuple[str, int]] = []
    for match in _UNIT.finditer(text):
        unit = match.group()
        if any(is_cjk(ch) for ch in unit):
            found.extend((ch, match.start() + i) for i, ch in enumerate(unit) if ch.strip())
        elif unit[0].isalnum():
            found.append((unit, match.start()))
        else:
            found.append(("", match.start()))  # punctuation: a break between sentences and clauses, not a unit
    return found


def holds(gram: Sequence[str], word: Sequence[str]) -> bool:
    """Whether the units ``word`` stand in a row in ``gram`` (casefolded); an empty word is in none."""
    key = [unit.casefold() for unit in word if unit]
    if not key or len(key) > len(gram):
        return False
    folded = [unit.casefold() for unit in gram]
    return any(folded[i : i + len(key)] == key for i in range(len(folded) - len(key) + 1))


def word_digest(word: Sequence[str]) -> str:
    """A forgotten word as the store remembers it for a while (service/history/store.py): a digest of its
    casefolded units, never the word itself; "*" for everything."""
    key = SEPARATOR.join(unit.casefold() for unit in word if unit)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def digests_held(gram: Sequence[str]) -> set[str]:
    """The digests of every word (run of units) that ``gram`` holds."""
    return {word_digest(gram[i:j]) for i in range(len(gram)) for j in range(i + 1, len(gram) + 1)}


def ngrams_ending(sequence: Sequence[str], start: int, order: int) -> Iterator[tuple[str, ...]]:
    """The n-grams (1..order) that end at each unit from ``start`` on, not crossing a break ("")."""
    for end in range(start, len(sequence)):
        if not sequence[end]:
            continue
        for n in range(1, order + 1):
            begin = end - n + 1
            if begin < 0 or not all(sequence[begin : end + 1]):
                break
            yield tuple(sequence[begin : end + 1])


@dataclass(frozen=True)
class HistoryConfig:
    order: int = 4  # n-gram orders 1..order
    half_life_days: float = 30.0
    max_entries: int = 20_000  # per user; the least recently used beyond it are pruned
    max_age_days: float = 0.0  # 0: keep; else drop n-grams not used for that long
    flush_ms: float = 200.0

    @property
    def half_life(self) -> float:
        return self.half_life_days * 86400.0


def decayed(count: float, since: float, now: float, half_life: float) -> float:
    return count * 2.0 ** (-max(0.0, now - since) / half_life)


@dataclass
class UserHistory:
    """One user's n-grams in memory, indexed for prediction. Keys are casefolded; ``shown`` keeps the
    surface form last typed."""

    config: HistoryConfig
    counts: dict[tuple[str, ...], list[float]] = field(default_factory=dict)  # n-gram -> [count, last_used]
    version: int = 0  # the store's version of this user when read
    checked: float = 0.0  # when the version was last compared with the store's
    # the history's weights fitted to the user as they type, by model: bucket -> [summed share, tokens]
    fitted: dict[str, dict[int, list[float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._online: dict[str, OnlineWeights] = {}
        self.followers: dict[tuple[str, ...], dict[str, list[float]]] = {}
        self.shown: dict[str, str] = {}
        self._words: list[str] = []  # the unigrams' keys, sorted: the completions of a prefix are a range
        self._total: tuple[float, float] | None = None  # (when, the decayed count of every unigram) cached
        # by tokenizer: the history seen through a model's tokens (service/model/personal_tokens.py)
        self.views: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        for gram, (count, last) in list(self.counts.items()):
            self._index(gram, count, last)

    def __len__(self) -> int:
        return len(self.counts)

    def online(self, model: str, start: LearnedWeights) -> OnlineWeights:
        """The history's weights in ``model``'s distributions, fitted to this user as they typed on it (from
        ``start``, the served ones)."""
        found = self._online.get(model)
        if found is None:
            found = self._online[model] = OnlineWeights(start)
            shares, tokens = np.zeros(found.start.size), np.zeros(found.start.size)
            for bucket, (share, count) in self.fitted.get(model, {}).items():
                if 0 <= bucket < found.start.size:
                    shares[bucket], tokens[bucket] = share, count
            found.add(shares, tokens)
        return found

    def add_fitted(self, model: str, shares: np.ndarray, tokens: np.ndarray) -> None:
        """Add summed shares and tokens per bucket (``OnlineWeights.shares_of``) to the user's fit on ``model``."""
        stats = self.fitted.setdefault(model, {})
        for bucket in np.flatnonzero(tokens):
            slot = stats.setdefault(int(bucket), [0.0, 0.0])
            slot[0] += float(shares[bucket])
            slot[1] += float(tokens[bucket])
        self._online.pop(model, None)  # made again from the sums at its next use

    def add(self, gram: tuple[str, ...], count: float, now: float) -> None:
        entry = self.counts.get(gram)
        if entry is None:
            entry = self.counts[gram] = [0.0, now]
        entry[0] = decayed(entry[0], entry[1], now, self.config.half_life) + count
        entry[1] = max(entry[1], now)
        self._index(gram, count, now)

    def _index(self, gram: tuple[str, ...], count: float, last: float) -> None:
        key = tuple(unit.casefold() for unit in gram)
        self.shown[key[-1]] = gram[-1]
        followers = self.followers.setdefault(key[:-1], {})
        slot = followers.get(key[-1])
        if slot is None:
            slot = followers[key[-1]] = [0.0, last]
            if len(key) == 1:
                bisect.insort(self._words, key[0])
        slot[0] = decayed(slot[0], slot[1], last, self.config.half_life) + count
        slot[1] = max(slot[1], last)
        if len(key) == 1:
            self._total = None
            for view in self.views.values():
                view.add(key[0], gram[-1], count, last)

    def forget(self, word: str) -> list[tuple[str, ...]]:
        """Drop every n-gram that holds ``word`` (casefolded; a word of several units, "Zhang Wei" or 你好,
        where its units stand in a row); the dropped n-grams."""
        gone = [gram for gram in self.counts if holds(gram, units(word))]
        for gram in gone:
            del self.counts[gram]
        self.followers.clear()
        self.shown.clear()
        self._words.clear()
        self._total = None
        self.views.clear()
        for gram, (count, last) in self.counts.items():
            self._index(gram, count, last)
        return gone

    def _unigram_total(self, now: float) -> float:
        if self._total is None or now - self._total[0] > TOTAL_SECONDS:
            half = self.config.half_life
            total = sum(decayed(c, t, now, half) for c, t in self.followers.get((), {}).values())
            self._total = (now, total)
        return self._total[1]

    def unigram(self, unit: str, now: float) -> tuple[float, float]:
        """(P_user(unit) regardless of context, its decayed count)."""
        slot = self.followers.get((), {}).get(unit.casefold())
        total = self._unigram_total(now)
        if slot is None or total <= 0:
            return 0.0, 0.0
        count = decayed(slot[0], slot[1], now, self.config.half_life)
        return count / total, count

    def predict(
        self, context: Sequence[str], prefix: str, now: float, limit: int | None = None
    ) -> tuple[list[tuple[str, float]], float]:
        """(units with P_user(unit | context, prefix), best first; the evidence E) for what follows
        ``context`` (units) and starts with ``prefix``. With a prefix the candidates are the units that
        start with it; without one, those that followed the contexts seen (with none seen, the user's
        history says nothing about this place: no prediction)."""
        start = prefix.casefold()
        recent = [unit.casefold() for unit in context[-(self.config.order - 1) :] if unit] if context else []
        seen_contexts = []
        for n in range(1, len(recent) + 1):
            followers = self.followers.get(tuple(recent[-n:]))
            if not followers:
                break  # a longer context contains this one: not seen either
            seen_contexts.append(followers)
        unigrams = self.followers.get((), {})
        if start:
            low = bisect.bisect_left(self._words, start)
            high = bisect.bisect_left(self._words, start + "\U0010ffff")
            candidates = self._words[low:high]
        elif seen_contexts:
            candidates = list({w for followers in seen_contexts for w in followers})
        else:
            return [], 0.0
        rate = 1.0 / self.config.half_life  # decayed(c, t) = c * 2 ** ((t - now) * rate), inlined for speed
        base = {w: unigrams[w][0] * 2.0 ** (min(0.0, unigrams[w][1] - now) * rate) for w in candidates if w in unigrams}
        total = sum(base.values()) if start else self._unigram_total(now)
        if total <= 0 or not base:
            return [], 0.0
        probabilities = {w: c / total for w, c in base.items()}
        typed = sum(base.values()) if start else 0.0  # without a prefix, word frequency is weak evidence
        seen_count = 0.0
        for followers in seen_contexts:
            seen = {
                w: followers[w][0] * 2.0 ** (min(0.0, followers[w][1] - now) * rate)
                for w in probabilities
                if w in followers
            }
            count = sum(seen.values())
            if count <= 0:
                break
            types = len(seen)
            probabilities = {w: (seen.get(w, 0.0) + types * p) / (count + types) for w, p in probabilities.items()}
            seen_count = count  # the longest context seen
        evidence = max(typed, seen_count)  # with a prefix, the larger: a name typed often in new contexts still counts
        if limit is None:
            ranked = sorted(probabilities.items(), key=lambda item: -item[1])
        else:
            ranked = heapq.nlargest(limit, probabilities.items(), key=lambda item: item[1])
        return [(self.shown.get(w, w), p) for w, p in ranked], evidence
