"""The personal-history store: n-gram counts per user in SQLite (the default, one file, WAL) or
PostgreSQL (``postgresql://...``), the same SQL apart from a few dialect fragments.

Recency: each n-gram's count decays with a half-life (``--history-half-life-days``); a row holds
the count as of its ``last_used`` time, and a database upsert adds a new use as

    count = old_count * 2 ** (-(now - old_last_used) / half_life) + added

which is atomic, so concurrent learners (sessions, worker processes, replicas on one PostgreSQL)
lose no counts.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from service.model.personal import HistoryConfig

SEPARATOR = "\x1f"  # between the units of a stored n-gram (a control character no one types)


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
        self._connection: Any  # a sqlite3 or psycopg connection (the same DB-API calls)
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
