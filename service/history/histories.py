"""Personal histories as the server keeps them: each user's history cached over the store
(service/history/store.py), learning through a batching writer.

Writes are batched by a writer thread (at most every ``flush_ms``) and never block a keystroke;
each user's cached history is updated at once for its own calls and re-read when another process
has written (checked at most every ``REFRESH_SECONDS``).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence

from service.history.store import SEPARATOR, HistoryStore
from service.model import personal_mix
from service.model.personal import HistoryConfig, UserHistory, ngrams_ending
from service.model.personal_mix import NextTokens

log = logging.getLogger("nextword")
REFRESH_SECONDS = 1.0  # how stale another process's writes may be in this one's cache
CACHED_USERS = 1024


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
        return personal_mix.mix_next_token(self.user(user), tokens, text, log_probs)

    def suggest(
        self,
        user: str,
        context: str,
        prefix: str,
        served: Sequence[tuple[str, float]],
        k: int,
        lacks: Callable[[str], bool] | None = None,
    ) -> list[tuple[str, float]]:
        """The first ``k`` of ``served`` mixed with ``user``'s history (personal_mix.suggest)."""
        return personal_mix.suggest(self.user(user), context, prefix, served, k, lacks)

    def rerank_conversions(self, user: str, context: str, candidates: Sequence) -> list:
        """Pinyin conversions re-ranked with ``user``'s history (personal_mix.rerank_conversions)."""
        return personal_mix.rerank_conversions(self.user(user), context, candidates)

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
