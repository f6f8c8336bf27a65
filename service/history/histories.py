"""Personal history: n-gram counts of what each user typed, kept in a database, mixed into their suggestions.

What is stored, per user: n-grams (orders 1 to ``order``) of the units they typed: words in text
with spaces, single characters in Chinese and other text without spaces. Units are surface forms
("Zelda", "LORD"), never a tokenizer's ids, so a history keeps working with another model file,
and words the model's vocabulary lacks are kept too. Raw text is never stored, only the counts.

Recency: each n-gram's count decays with a half-life (``--history-half-life-days``); a row holds
the count as of its ``last_used`` time, and a database upsert adds a new use as

    count = old_count * 2 ** (-(now - old_last_used) / half_life) + added

which is atomic, so concurrent learners (sessions, worker processes, replicas on one PostgreSQL)
lose no counts.

Prediction: an interpolated (Witten-Bell) estimate over the user's n-grams, restricted to the
units that start with what is being typed. Its weight in the mix grows with the evidence for the
context at hand (``E``): the count of the longest context the user has typed before, or of the
units matching the prefix. With share = E / (E + evidence_scale) (``personalize``), over the first
``SERVED_FOR_HISTORY`` served suggestions:

    a word among them:                   (1 - known_weight * share) * P_served + known_weight * share * P_user
    a word the model's vocabulary lacks: min(max_weight, share) * P_user
    any other word (ranked lower):       known_weight * share * P_user

and for a next word (no prefix) both weights times the served model's doubt (1 - its top
probability). docs/history.md has the measurements behind the constants. A user with no
history, or none that applies, gets exactly the unpersonalised answer.

Storage: ``HistoryStore`` over SQLite (the default, one file, WAL) or PostgreSQL
(``postgresql://...``), the same SQL apart from a few dialect fragments. Writes are batched by a
writer thread (at most every ``flush_ms``) and never block a keystroke; each user's cached history
is updated at once for its own calls and re-read when another process has written (checked at
most every ``REFRESH_SECONDS``).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import heapq
import itertools
import json
import logging
import math
import re
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from service.model.tokenizer import UNK, is_cjk

log = logging.getLogger("nextword")
SEPARATOR = "\x1f"  # between the units of a stored n-gram (a control character no one types)
REFRESH_SECONDS = 1.0  # how stale another process's writes may be in this one's cache
CACHED_USERS = 1024
CONTEXT_CHARS = 256  # of the text before the cursor, read for the user's last units
# A conversion the user chose counts faster than a word they typed: an input method moves a chosen
# reading to the front (weight E / (E + 2): one use is a third, three uses 0.6).
CONVERSION_EVIDENCE_SCALE = 2.0
TOTAL_SECONDS = 60.0  # how long a user's decayed unigram total is reused
# The history is mixed with this many of the served suggestions, so that a word the model ranks below
# the few shown keeps its own probability in the mix rather than counting as a word the model lacks.
SERVED_FOR_HISTORY = 50
_UNIT = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*|\d+|[^\s\w]", re.UNICODE)


def units(text: str) -> list[str]:
    """The units of a text: words (letters, with inner apostrophes), numbers, CJK characters one by one.
    Punctuation separates units and is not learned."""
    found = []
    for match in _UNIT.finditer(text):
        unit = match.group()
        if any(is_cjk(ch) for ch in unit):
            found.extend(ch for ch in unit if ch.strip())
        elif unit[0].isalnum():
            found.append(unit)
        else:
            found.append("")  # punctuation: a break between sentences and clauses, not a unit
    return found


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
    order: int = 3  # n-gram orders 1..order
    half_life_days: float = 30.0
    max_entries: int = 20_000  # per user; the least recently used beyond it are pruned
    max_age_days: float = 0.0  # 0: keep; else drop n-grams not used for that long
    flush_ms: float = 200.0
    evidence_scale: float = 10.0  # share = E / (E + evidence_scale), see the module docstring
    max_weight: float = 0.9  # the most a word the served suggestions lack can get from the history
    known_weight: float = 0.1  # the most the history moves the words the model has

    @property
    def half_life(self) -> float:
        return self.half_life_days * 86400.0


def decayed(count: float, since: float, now: float, half_life: float) -> float:
    return count * 2.0 ** (-max(0.0, now - since) / half_life)


# ---------------------------------------------------------------------------------------------- one user


@dataclass
class UserHistory:
    """One user's n-grams in memory, indexed for prediction. Keys are casefolded; ``shown`` keeps the
    surface form last typed."""

    config: HistoryConfig
    counts: dict[tuple[str, ...], list[float]] = field(default_factory=dict)  # n-gram -> [count, last_used]
    version: int = 0  # the store's version of this user when read
    checked: float = 0.0  # when the version was last compared with the store's

    def __post_init__(self) -> None:
        self.followers: dict[tuple[str, ...], dict[str, list[float]]] = {}
        self.shown: dict[str, str] = {}
        self._words: list[str] = []  # the unigrams' keys, sorted: the completions of a prefix are a range
        self._total: tuple[float, float] | None = None  # (when, the decayed count of every unigram) cached
        for gram, (count, last) in list(self.counts.items()):
            self._index(gram, count, last)

    def __len__(self) -> int:
        return len(self.counts)

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

    def forget(self, word: str) -> list[tuple[str, ...]]:
        """Drop every n-gram that contains ``word`` (casefolded); the dropped n-grams."""
        key = word.casefold()
        gone = [gram for gram in self.counts if any(unit.casefold() == key for unit in gram)]
        for gram in gone:
            del self.counts[gram]
        self.followers.clear()
        self.shown.clear()
        self._words.clear()
        self._total = None
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

    def weight(self, evidence: float) -> tuple[float, float]:
        """(the weight of the history for words the served suggestions lack, for those they have)."""
        if not evidence:
            return 0.0, 0.0
        share = evidence / (evidence + self.config.evidence_scale)
        return min(self.config.max_weight, share), self.config.known_weight * share


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


# ---------------------------------------------------------------------------------------------- storage


class Dialect:
    """The SQL that differs between SQLite and PostgreSQL."""

    def __init__(self, placeholder: str, greatest: str, decay: str, offset_all: str) -> None:
        self.p = placeholder
        self.greatest = greatest
        self.decay = decay  # an SQL expression of {delta} (seconds since the row's last use)
        self.offset_all = offset_all  # "LIMIT -1 OFFSET" (SQLite) or "OFFSET" (PostgreSQL)


SCHEMA = (
    "CREATE TABLE IF NOT EXISTS nextword_history (user_id TEXT NOT NULL, ngram TEXT NOT NULL, "
    "count DOUBLE PRECISION NOT NULL, last_used DOUBLE PRECISION NOT NULL, PRIMARY KEY (user_id, ngram))",
    "CREATE INDEX IF NOT EXISTS nextword_history_recent ON nextword_history (user_id, last_used)",
    "CREATE TABLE IF NOT EXISTS nextword_history_users (user_id TEXT PRIMARY KEY, version BIGINT NOT NULL)",
)


class HistoryStore:
    """N-gram counts per user in SQLite or PostgreSQL (see the module docstring). Thread-safe."""

    def __init__(self, location: str, config: HistoryConfig) -> None:
        self.location = location
        self.config = config
        self._lock = threading.Lock()
        if location.startswith(("postgresql://", "postgres://")):
            import psycopg  # only a PostgreSQL store needs it

            self.kind = "postgresql"
            self._connection = psycopg.connect(location, autocommit=False)
            self.dialect = Dialect(
                "%s", "greatest", f"power(2.0, -greatest(0.0, {{delta}}) / {config.half_life})", "OFFSET"
            )
        else:
            self.kind = "sqlite"
            try:
                self._connection = sqlite3.connect(location, check_same_thread=False, timeout=30.0)
                self._connection.execute("PRAGMA journal_mode=WAL")
            except sqlite3.Error as error:
                raise ValueError(f"cannot open --history-db {location}: {error}") from None
            self._connection.execute("PRAGMA synchronous=NORMAL")
            half_life = config.half_life
            self._connection.create_function(
                "nw_decay", 1, lambda delta: 2.0 ** (-max(0.0, delta) / half_life), deterministic=True
            )
            self.dialect = Dialect("?", "max", "nw_decay({delta})", "LIMIT -1 OFFSET")
        with self._transaction() as cursor:
            for statement in SCHEMA:
                cursor.execute(statement)

    # ------------------------------------------------------------------ plumbing

    class _Transaction:
        def __init__(self, store: HistoryStore) -> None:
            self.store = store

        def __enter__(self):
            self.store._lock.acquire()
            self.cursor = self.store._connection.cursor()
            return self.cursor

        def __exit__(self, kind, value, traceback) -> None:
            try:
                if kind is None:
                    self.store._connection.commit()
                else:
                    self.store._connection.rollback()
            finally:
                self.cursor.close()
                self.store._lock.release()

    def _transaction(self) -> HistoryStore._Transaction:
        return HistoryStore._Transaction(self)

    def _sql(self, text: str) -> str:
        return text.replace("?", self.dialect.p)

    # ------------------------------------------------------------------ reading

    def version(self, user: str) -> int:
        with self._transaction() as cursor:
            cursor.execute(self._sql("SELECT version FROM nextword_history_users WHERE user_id = ?"), (user,))
            row = cursor.fetchone()
        return int(row[0]) if row else 0

    def load(self, user: str) -> tuple[dict[tuple[str, ...], list[float]], int]:
        with self._transaction() as cursor:
            cursor.execute(self._sql("SELECT version FROM nextword_history_users WHERE user_id = ?"), (user,))
            row = cursor.fetchone()
            cursor.execute(self._sql("SELECT ngram, count, last_used FROM nextword_history WHERE user_id = ?"), (user,))
            rows = cursor.fetchall()
        return {tuple(gram.split(SEPARATOR)): [count, last] for gram, count, last in rows}, int(row[0]) if row else 0

    # ------------------------------------------------------------------ writing

    def add(self, rows: Iterable[tuple[str, tuple[str, ...], float, float]]) -> dict[str, int]:
        """Add (user, n-gram, count, when) uses in one transaction, prune, and bump each user's version;
        returns the new version of each user written."""
        d = self.dialect
        delta = "excluded.last_used - nextword_history.last_used"
        upsert = self._sql(
            "INSERT INTO nextword_history (user_id, ngram, count, last_used) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (user_id, ngram) DO UPDATE SET count = nextword_history.count * "
            f"{d.decay.format(delta=delta)} + excluded.count * {d.decay.format(delta='-(' + delta + ')')}, "
            f"last_used = {d.greatest}(nextword_history.last_used, excluded.last_used)"
        )
        rows = list(rows)
        users = sorted({user for user, *_ in rows})
        versions = {}
        with self._transaction() as cursor:
            cursor.executemany(upsert, [(u, SEPARATOR.join(g), c, t) for u, g, c, t in rows])
            for user in users:
                self._prune(cursor, user)
                versions[user] = self._bump(cursor, user)
        return versions

    def _prune(self, cursor, user: str) -> None:
        cursor.execute(
            self._sql(
                "DELETE FROM nextword_history WHERE user_id = ? AND ngram IN (SELECT ngram FROM nextword_history "
                f"WHERE user_id = ? ORDER BY last_used DESC {self.dialect.offset_all} ?)"
            ),
            (user, user, self.config.max_entries),
        )
        if self.config.max_age_days > 0:
            oldest = time.time() - self.config.max_age_days * 86400.0
            cursor.execute(
                self._sql("DELETE FROM nextword_history WHERE user_id = ? AND last_used < ?"), (user, oldest)
            )

    def _bump(self, cursor, user: str) -> int:
        cursor.execute(
            self._sql(
                "INSERT INTO nextword_history_users (user_id, version) VALUES (?, 1) ON CONFLICT (user_id) "
                "DO UPDATE SET version = nextword_history_users.version + 1 RETURNING version"
            ),
            (user,),
        )
        return int(cursor.fetchone()[0])

    def remove(self, user: str, grams: Sequence[tuple[str, ...]] | None) -> int:
        """Delete these n-grams of ``user`` (None: all of them); how many rows went."""
        with self._transaction() as cursor:
            if grams is None:
                cursor.execute(self._sql("DELETE FROM nextword_history WHERE user_id = ?"), (user,))
                removed = cursor.rowcount
            else:
                statement = self._sql("DELETE FROM nextword_history WHERE user_id = ? AND ngram = ?")
                cursor.executemany(statement, [(user, SEPARATOR.join(g)) for g in grams])
                removed = len(grams)
            self._bump(cursor, user)
        return removed

    def close(self) -> None:
        with self._lock:
            self._connection.close()


# ---------------------------------------------------------------------------------------------- generation


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
        partial_match = _UNFINISHED.search(text)
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


# ---------------------------------------------------------------------------------------------- typing sessions

_UNFINISHED = re.compile(r"[\w'’]+$")


class SessionLearner:
    """What one Type session learns: a word once a boundary (space, punctuation, newline) follows it, and
    the rest at a commit or when the session ends. Text deleted before it was finished is never learned,
    and deleting and retyping finished text does not learn it twice."""

    def __init__(self, histories: Histories, user: str) -> None:
        self.histories = histories
        self.user = user
        self.learned: list[str] = []  # the units of the session's text learned so far, in order

    def update(self, text: str, final: bool = False) -> None:
        finished = text if final else text[: len(text) - len(m.group())] if (m := _UNFINISHED.search(text)) else text
        sequence = units(finished)
        common = 0
        for a, b in zip(sequence, self.learned):
            if a != b:
                break
            common += 1
        if common == len(sequence):  # nothing new (the same text, or some of it deleted)
            return
        self.histories.learn(self.user, sequence, start=common)
        self.learned = sequence


# ---------------------------------------------------------------------------------------------- the service's view


class Histories:
    """What the servicer uses: cached user histories over a store, learning through a batching writer."""

    def __init__(self, store: HistoryStore, config: HistoryConfig, learning: bool = True) -> None:
        self.store = store
        self.config = config
        self.learning = learning
        self._cache: OrderedDict[str, UserHistory] = OrderedDict()
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, tuple[str, ...]], list[float]] = {}  # (user, n-gram) -> [count, when]
        self._wake = threading.Event()
        self._stopping = False
        self._writer = threading.Thread(target=self._write_loop, name="history-writer", daemon=True)
        self._writer.start()

    # ------------------------------------------------------------------ reading

    def user(self, user: str) -> UserHistory:
        now = time.monotonic()
        with self._lock:
            history = self._cache.get(user)
            if history is not None:
                self._cache.move_to_end(user)
                if now - history.checked < REFRESH_SECONDS:
                    return history
        if history is not None and self.store.version(user) == history.version:
            history.checked = now
            return history
        counts, version = self.store.load(user)
        fresh = UserHistory(self.config, counts, version, now)
        with self._lock:
            for (who, gram), (count, when) in self._pending.items():  # learned here, not written yet
                if who == user:
                    fresh.add(gram, count, when)
            self._cache[user] = fresh
            self._cache.move_to_end(user)
            while len(self._cache) > CACHED_USERS:
                self._cache.popitem(last=False)
        return fresh

    def mix_next_token(self, user: str, tokens: NextTokens, text: str, log_probs):
        """Generate's next-token log-probabilities [V] after ``text``, mixed with the user's predicted words."""
        history = self.user(user)
        if not len(history):
            return log_probs
        partial = _UNFINISHED.search(text)
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

    def suggest(
        self,
        user: str,
        context: str,
        prefix: str,
        served: Sequence[tuple[str, float]],
        k: int,
        lacks: Callable[[str], bool] | None = None,
    ):
        """The first ``k`` of ``served`` (best first; give ``SERVED_FOR_HISTORY`` of them) mixed with ``user``'s
        history for the text ``context`` + ``prefix``; ``lacks``: whether the model's vocabulary lacks a word."""
        history = self.user(user)
        if not len(history):
            return list(served[:k])
        tail = context[-CONTEXT_CHARS:]  # the last few units are all the prediction reads
        predicted, evidence = history.predict(units(tail), prefix, time.time(), limit=k)
        return personalize(served, predicted, history.weight(evidence), k, completing=bool(prefix), lacks=lacks)

    def rerank_conversions(self, user: str, context: str, candidates: Sequence):
        """Pinyin conversions (service/model/pinyin.py Candidates) re-ranked with ``user``'s history: within
        each group that consumes as many letters, a candidate's share is mixed with P_user(its characters |
        context), normalised over the group, with the weight the evidence gives a word the model lacks."""
        history = self.user(user)
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

    # ------------------------------------------------------------------ learning

    def learn(self, user: str, sequence: Sequence[str], start: int = 0) -> int:
        """Learn the n-grams ending at units ``start`` on of ``sequence`` (units, see ``units``); how many."""
        if not self.learning:
            return 0
        now = time.time()
        grams = list(ngrams_ending(sequence, start, self.config.order))
        if not grams:
            return 0
        history = self.user(user)
        with self._lock:
            for gram in grams:
                history.add(gram, 1.0, now)
                entry = self._pending.setdefault((user, gram), [0.0, now])
                entry[0] += 1.0
                entry[1] = now
        return len(grams)

    def forget(self, user: str, word: str) -> int:
        """Remove ``word`` and every n-gram containing it (an empty word: all of the user's history) at once."""
        self.flush()
        with self._lock:
            self._pending = {
                (who, gram): value
                for (who, gram), value in self._pending.items()
                if who != user or (word and not any(u.casefold() == word.casefold() for u in gram))
            }
        if not word:
            removed = self.store.remove(user, None)
            with self._lock:
                self._cache.pop(user, None)
            return removed
        counts, _ = self.store.load(user)
        gone = UserHistory(self.config, counts).forget(word)
        removed = self.store.remove(user, gone) if gone else 0
        with self._lock:
            self._cache.pop(user, None)
        return removed

    def export(self, user: str) -> Iterator[str]:
        """The user's history as JSON lines: {"ngram": [units], "count": c, "last_used": unix seconds}."""
        self.flush()
        counts, _ = self.store.load(user)
        for gram, (count, last) in sorted(counts.items(), key=lambda item: -item[1][1]):
            yield json.dumps({"ngram": list(gram), "count": count, "last_used": last}, ensure_ascii=False)

    def import_lines(self, user: str, lines: Iterable[str]) -> int:
        rows = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                gram = tuple(str(u) for u in entry["ngram"])
                count, last = float(entry["count"]), float(entry["last_used"])
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"line {number} is not a history entry ({type(error).__name__})") from None
            if not 1 <= len(gram) <= self.config.order or not all(gram) or any(SEPARATOR in u for u in gram):
                raise ValueError(f"line {number}: an n-gram has 1 to {self.config.order} non-empty units")
            if not (math.isfinite(count) and count > 0 and math.isfinite(last)):
                raise ValueError(f"line {number}: count must be positive and last_used a time")
            rows.append((user, gram, count, last))
        if rows:
            self.store.add(rows)
        with self._lock:
            self._cache.pop(user, None)
        return len(rows)

    # ------------------------------------------------------------------ the writer

    def flush(self) -> None:
        """Write what is pending now (the writer does it every flush_ms)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        try:
            versions = self.store.add((user, gram, count, when) for (user, gram), (count, when) in pending.items())
        except Exception:
            with self._lock:  # keep them for the next try, added to what was learned meanwhile
                for key, (count, when) in pending.items():
                    entry = self._pending.setdefault(key, [0.0, when])
                    entry[0] += count
                    entry[1] = max(entry[1], when)
            raise
        with self._lock:
            for user, version in versions.items():
                history = self._cache.get(user)
                if history is None:
                    continue
                if version == history.version + 1:  # only this write since it was read: the cache has it
                    history.version = version
                else:
                    history.checked = 0.0  # another process wrote too: re-read at the next call

    def _write_loop(self) -> None:
        interval = max(self.config.flush_ms, 1.0) / 1000.0
        while not self._stopping:
            self._wake.wait(interval)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # keep the writer alive; the counts stay pending (flush)
                log.exception("writing the personal history failed; retrying")

    def close(self) -> None:
        """Flush and stop (a SIGTERM drain calls this)."""
        self._stopping = True
        self._wake.set()
        self._writer.join(5.0)
        self.flush()
        self.store.close()


def open_histories(config) -> Histories | None:
    """The personal histories of a server's ``ServerConfig`` (None when --history-db off)."""
    if config.history_db == "off":
        return None
    if config.history_order < 1 or config.history_max_entries < 1 or config.history_half_life_days <= 0:
        raise ValueError(
            "--history-order and --history-max-entries must be at least 1, --history-half-life-days above 0"
        )
    history = HistoryConfig(
        order=config.history_order,
        half_life_days=config.history_half_life_days,
        max_entries=config.history_max_entries,
        max_age_days=config.history_max_age_days,
        flush_ms=config.history_flush_ms,
    )
    return Histories(HistoryStore(config.history_db, history), history, config.learning)
