"""Personal histories as the server keeps them: each user's history cached over the store
(service/history/store.py), learning through a batching writer.

Writes are batched by a writer thread (at most every ``flush_ms``) and never block a keystroke;
each user's cached history is updated at once for its own calls and re-read when another process
has written (checked at most every ``REFRESH_SECONDS``).

The store never holds up an answer: a user's history is read on a reader thread, and a call waits
for it at most ``read_timeout_ms``; past that, or while the store is down, the call is answered
without the history (or with the copy cached before), and ``on_event("answered_without")`` counts
it. One user's rows that the database refuses are set aside (``rows_set_aside``), the others are
written; counts learned while the store is down wait, up to ``MAX_PENDING`` n-grams, and what
comes beyond is dropped (``counts_dropped``).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from service.history.store import FITTED_ROW, ROW, HistoryStore, RowsRefused, StoreDown
from service.model.personal import SEPARATOR, HistoryConfig, UserHistory, holds, ngrams_ending, units
from service.model.personal_mix import NextTokens, PersonalMix
from service.model.personal_tokens import SERVED_WEIGHTS, LearnedWeights, OnlineWeights

log = logging.getLogger("nextword")
REFRESH_SECONDS = 1.0  # how stale another process's writes may be in this one's cache
CACHED_USERS = 1024
MAX_PENDING = 200_000  # learned n-grams waiting for the writer; beyond, new counts are dropped
MAX_READS = 64  # users whose history is being read at once; beyond, calls are answered without
READER_THREADS = 2
MAX_UNIT_BYTES = 64  # longer units (a run of letters pasted in) are not learned nor imported
MAX_COUNT = 1e6  # the most one imported n-gram may count


class Histories:
    """What the servicer uses: cached user histories over a store, learning through a batching writer."""

    def __init__(
        self,
        store: HistoryStore,
        config: HistoryConfig,
        learning: bool = True,
        read_timeout_ms: float = 50.0,
        on_event: Callable[[str, int], None] | None = None,
        weights: LearnedWeights = SERVED_WEIGHTS,
    ) -> None:
        self.store = store
        self.weights = weights  # the history's weight in the served distribution (personal_tokens.py)
        self.config = config
        self.learning = learning
        self.read_timeout = read_timeout_ms / 1000.0
        self.on_event = on_event or (lambda event, count: None)  # counted by the server's metrics
        self._cache: OrderedDict[str, UserHistory] = OrderedDict()
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, tuple[str, ...]], list[float]] = {}  # (user, n-gram) -> [count, when]
        self._pending_fitted: dict[tuple[str, str], list] = {}  # (user, model) -> [shares, tokens, when]
        self._buckets = sum(len(row) for row in weights.weights)
        self._reads: dict[str, concurrent.futures.Future] = {}  # by user: the read in flight
        self._readers = concurrent.futures.ThreadPoolExecutor(READER_THREADS, thread_name_prefix="history-reader")
        self._wake = threading.Event()
        self._stopping = False
        self._writer = threading.Thread(target=self._write_loop, name="history-writer", daemon=True)
        self._writer.start()

    # ------------------------------------------------------------------ reading

    def user(self, user: str) -> UserHistory:
        """The user's history, at most ``read_timeout`` away: else the copy cached before, or an empty one."""
        now = time.monotonic()
        with self._lock:
            history = self._cache.get(user)
            if history is not None:
                self._cache.move_to_end(user)
                if now - history.checked < REFRESH_SECONDS:
                    return history
            read = self._reads.get(user)
            if read is None and len(self._reads) < MAX_READS and not self._stopping:
                read = self._reads[user] = self._readers.submit(self._read, user)
        if read is not None:
            try:
                return read.result(timeout=self.read_timeout)
            except (concurrent.futures.TimeoutError, StoreDown, RowsRefused, RuntimeError):
                pass
        self.on_event("answered_without", 1)
        return history if history is not None else UserHistory(self.config)

    def _read(self, user: str) -> UserHistory:
        """On a reader thread: the user's history from the store (unless the cached copy is current), cached."""
        try:
            now = time.monotonic()
            with self._lock:
                history = self._cache.get(user)
            if history is not None and self.store.version(user) == history.version:
                history.checked = now
                return history
            counts, version, fitted = self.store.load(user)
            fresh = UserHistory(self.config, counts, version, now, fitted)
            with self._lock:
                for (who, gram), (count, when) in self._pending.items():  # learned here, not written yet
                    if who == user:
                        fresh.add(gram, count, when)
                for (who, model), (shares, tokens, _) in self._pending_fitted.items():
                    if who == user:
                        fresh.add_fitted(model, shares, tokens)
                self._cache[user] = fresh
                self._cache.move_to_end(user)
                while len(self._cache) > CACHED_USERS:
                    self._cache.popitem(last=False)
            return fresh
        finally:
            with self._lock:
                self._reads.pop(user, None)

    def personal(self, user: str, model: str, tokenizer, next_tokens: NextTokens | None = None) -> PersonalMix:
        """``user``'s history mixed into the distributions of ``model``, which reads with ``tokenizer``, with
        the weights fitted to them as they typed on it."""
        history = self.user(user)
        weights = history.online(model, self.weights).current
        return PersonalMix(history, tokenizer, weights, next_tokens=next_tokens)

    # ------------------------------------------------------------------ learning

    def learn(self, user: str, sequence: Sequence[str], start: int = 0) -> int:
        """Learn the n-grams ending at units ``start`` on of ``sequence`` (units, see ``units``); how many. A
        unit longer than ``MAX_UNIT_BYTES`` is not learned (it breaks the n-grams around it)."""
        if not self.learning:
            return 0
        now = time.time()
        sequence = [u if len(u.encode("utf-8")) <= MAX_UNIT_BYTES else "" for u in sequence]
        grams = list(ngrams_ending(sequence, start, self.config.order))
        if not grams:
            return 0
        dropped = 0
        with self._lock:
            history = self._cache.get(user)
            for gram in grams:
                if history is not None:
                    history.add(gram, 1.0, now)
                dropped += not self._pend(user, gram, 1.0, now)
        if dropped:
            self.on_event("counts_dropped", dropped)
        return len(grams)

    def fit(self, user: str, model: str, served: np.ndarray, mine: np.ndarray, buckets: np.ndarray) -> None:
        """Move the user's weights on ``model`` by the tokens they typed: each one's probability under the
        served model and under their history before it was learned, and its bucket (PersonalMix.observed)."""
        if not self.learning or not len(buckets):
            return
        now = time.time()
        with self._lock:
            history = self._cache.get(user)
            online = history.online(model, self.weights) if history is not None else OnlineWeights(self.weights)
            shares, tokens = online.shares_of(served, mine, buckets)
            if not tokens.any():
                return
            if history is not None:
                history.add_fitted(model, shares, tokens)
            self._pend_fitted(user, model, shares, tokens, now)

    def forget(self, user: str, word: str | None) -> int:
        """Remove every n-gram that holds ``word`` (None: all of the user's history), here and in the store, at
        once; counts of it that another process has learned and not written yet are not written back."""
        self.flush()  # what this process learned is written, then removed with the rest
        with self._lock:
            self._pending = {
                (who, gram): value
                for (who, gram), value in self._pending.items()
                if who != user or (word is not None and not holds(gram, units(word)))
            }
            if word is None:  # the fitted weights hold no word: they go with everything
                self._pending_fitted = {key: value for key, value in self._pending_fitted.items() if key[0] != user}
        try:
            return self.store.forget(user, word)
        finally:
            with self._lock:
                self._cache.pop(user, None)

    def export(self, user: str) -> Iterator[str]:
        """The user's history as JSON lines: {"ngram": [units], "count": c, "last_used": unix seconds}."""
        self.flush()
        counts = self.store.load(user).counts
        for gram, (count, last) in sorted(counts.items(), key=lambda item: -item[1][1]):
            yield json.dumps({"ngram": list(gram), "count": count, "last_used": last}, ensure_ascii=False)

    def import_lines(self, user: str, lines: Iterable[str]) -> int:
        """Add exported history lines to the user's history; ValueError naming the first line out of bounds."""
        now = time.time()
        rows = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            rows.append((user, *self._entry(number, line, now)))
        if rows:
            self.store.add(rows)
        with self._lock:
            self._cache.pop(user, None)
        return len(rows)

    def _entry(self, number: int, line: str, now: float) -> tuple[tuple[str, ...], float, float]:
        try:
            entry = json.loads(line)
            gram = tuple(entry["ngram"])
            count, last = float(entry["count"]), float(entry["last_used"])
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"line {number} is not a history entry ({type(error).__name__})") from None
        order = self.config.order
        if not 1 <= len(gram) <= order or not all(isinstance(u, str) and u for u in gram):
            raise ValueError(f"line {number}: an n-gram has 1 to {order} units, each a non-empty string")
        if any(len(u.encode("utf-8")) > MAX_UNIT_BYTES or SEPARATOR in u for u in gram):
            raise ValueError(f"line {number}: a unit has at most {MAX_UNIT_BYTES} bytes of UTF-8")
        if not (math.isfinite(count) and 0 < count <= MAX_COUNT):
            raise ValueError(f"line {number}: count must be above 0 and at most {MAX_COUNT:g}")
        if not (math.isfinite(last) and 0 <= last <= now + 1.0):
            raise ValueError(f"line {number}: last_used must be a time between 0 and now, in Unix seconds")
        return gram, count, last

    # ------------------------------------------------------------------ the writer

    def flush(self) -> None:
        """Write what is pending now (the writer does it every flush_ms). StoreDown when the store is down: the
        counts wait for the next try. Rows the database refuses are set aside, one user's at a time."""
        with self._lock:
            pending, self._pending = self._pending, {}
            pending_fitted, self._pending_fitted = self._pending_fitted, {}
        if not pending and not pending_fitted:
            return
        rows = [(user, gram, count, when) for (user, gram), (count, when) in pending.items()]
        fitted = [
            (user, model, int(bucket), float(shares[bucket]), float(tokens[bucket]), when)
            for (user, model), (shares, tokens, when) in pending_fitted.items()
            for bucket in np.flatnonzero(tokens)
        ]
        try:
            versions = self.store.add(rows, fitted)
        except StoreDown:
            self._keep(rows, fitted)
            raise
        except RowsRefused:
            versions = self._add_each_user(rows, fitted)
        self._written(versions)

    def _add_each_user(self, rows: list[ROW], fitted: list[FITTED_ROW]) -> dict[str, int]:
        """A batch the database refused, written a user at a time: a user whose rows it refuses again loses
        them (counted, logged without the user), the others are written."""
        by_user: dict[str, tuple[list[ROW], list[FITTED_ROW]]] = {}
        for row in rows:
            by_user.setdefault(row[0], ([], []))[0].append(row)
        for sums in fitted:
            by_user.setdefault(sums[0], ([], []))[1].append(sums)
        versions: dict[str, int] = {}
        set_aside = 0
        groups = list(by_user.values())
        for index, (user_rows, user_fitted) in enumerate(groups):
            try:
                versions.update(self.store.add(user_rows, user_fitted))
            except RowsRefused as error:
                set_aside += len(user_rows) + len(user_fitted)
                log.error("the history database refused one user's learned counts (%s): set aside", error)
            except StoreDown:
                left = groups[index:]
                self._keep([row for r, _ in left for row in r], [sums for _, f in left for sums in f])
                break
        if set_aside:
            self.on_event("rows_set_aside", set_aside)
        return versions

    def _keep(self, rows: list[ROW], fitted: list[FITTED_ROW]) -> None:
        """Rows not written: back to the pending counts, added to what was learned meanwhile, up to MAX_PENDING."""
        dropped = 0
        with self._lock:
            for user, gram, count, when in rows:
                dropped += not self._pend(user, gram, count, when)
            for user, model, bucket, share, tokens, when in fitted:
                shares, counts = np.zeros(self._buckets), np.zeros(self._buckets)
                shares[bucket], counts[bucket] = share, tokens
                self._pend_fitted(user, model, shares, counts, when)
        if dropped:
            self.on_event("counts_dropped", dropped)

    def _pend(self, user: str, gram: tuple[str, ...], count: float, when: float) -> bool:
        """Add a count to what waits for the writer (the lock held); False when the bound drops it."""
        entry = self._pending.get((user, gram))
        if entry is None:
            if len(self._pending) >= MAX_PENDING:
                return False
            entry = self._pending[(user, gram)] = [0.0, when]
        entry[0] += count
        entry[1] = max(entry[1], when)
        return True

    def _pend_fitted(self, user: str, model: str, shares: np.ndarray, tokens: np.ndarray, when: float) -> None:
        """Add sums of a user's fitted weights (flat, by bucket) to what waits for the writer (the lock held)."""
        entry = self._pending_fitted.get((user, model))
        if entry is None:
            self._pending_fitted[(user, model)] = [shares, tokens, when]
        else:
            entry[0], entry[1], entry[2] = entry[0] + shares, entry[1] + tokens, max(entry[2], when)

    def _written(self, versions: dict[str, int]) -> None:
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
            except StoreDown:  # the store logs when it goes down and comes back; the counts wait
                pass
            except Exception:  # keep the writer alive: a fault here must not end everyone's learning
                log.exception("writing the personal history failed")

    def close(self, timeout: float = 5.0) -> None:
        """Write what is pending and stop, within ``timeout`` seconds whatever the store does (a SIGTERM drain
        calls this with the grace period); what the store does not take by then is lost, and said."""
        deadline = time.monotonic() + timeout
        self._stopping = True
        self._wake.set()
        self._writer.join(max(0.0, deadline - time.monotonic()))
        final = threading.Thread(target=self._final_flush, name="history-final-flush", daemon=True)
        final.start()
        final.join(max(0.0, deadline - time.monotonic()))
        self._readers.shutdown(wait=False, cancel_futures=True)
        if final.is_alive() or self._writer.is_alive():
            log.error("the history database did not take the last learned counts in time; they are lost")
            return
        self.store.close()

    def _final_flush(self) -> None:
        try:
            self.flush()
        except StoreDown:
            with self._lock:
                lost = len(self._pending)
            if lost:
                log.error("the history database is down: %d learned n-gram counts were not written", lost)


def open_histories(config, on_event: Callable[[str, int], None] | None = None) -> Histories | None:
    """The personal histories of a server's ``ServerConfig`` (None when --history-db off); ``on_event`` counts
    what the store's faults cost (see the module docstring)."""
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
    return Histories(
        HistoryStore(config.history_db, history), history, config.learning, config.history_read_timeout_ms, on_event
    )
