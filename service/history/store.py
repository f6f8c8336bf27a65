"""The personal-history store: n-gram counts per user in SQLite (the default, one file, WAL) or
PostgreSQL (``postgresql://...``), the same SQL apart from a few dialect fragments.

Recency: each n-gram's count decays with a half-life (``--history-half-life-days``); a row holds
the count as of its ``last_used`` time, and a database upsert adds a new use as

    count = old_count * 2 ** (-(now - old_last_used) / half_life) + added

which is atomic, so concurrent learners (sessions, worker processes, replicas on one PostgreSQL)
lose no counts. PostgreSQL computes the decay in log space and takes what falls below e**-700 as
zero, so no row, however old, makes the upsert fail with an underflow.

Readers and the writer have a connection each (SQLite in WAL mode reads beside a write), each
behind its own lock, released on every path. A connection that fails (the database restarted,
the network dropped, a statement timed out) is closed, ``StoreDown`` is raised, and the next use
connects again, at most once a second; ``up`` says whether the last use reached the database. Any
other database error is the rows' own (``RowsRefused``): the caller sets those rows aside.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, TypeVar

from service.model.personal import SEPARATOR, HistoryConfig, UserHistory, digests_held, units, word_digest

log = logging.getLogger("nextword")
RECONNECT_SECONDS = 1.0  # the least time between two tries to connect
CONNECT_TIMEOUT = 3  # seconds (PostgreSQL)
STATEMENT_TIMEOUT_MS = 5000  # PostgreSQL: a statement running longer is cancelled (StoreDown)
SQLITE_BUSY_SECONDS = 5.0  # how long an SQLite write waits for another process's write
LOG_SPACE_FLOOR = -700.0  # exp(-700) ~ 1e-304: decayed below it is zero (float8 cannot underflow)
T = TypeVar("T")

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS nextword_history (user_id TEXT NOT NULL, ngram TEXT NOT NULL, "
    "count DOUBLE PRECISION NOT NULL, last_used DOUBLE PRECISION NOT NULL, PRIMARY KEY (user_id, ngram))",
    "CREATE INDEX IF NOT EXISTS nextword_history_recent ON nextword_history (user_id, last_used)",
    "CREATE TABLE IF NOT EXISTS nextword_history_users (user_id TEXT PRIMARY KEY, version BIGINT NOT NULL)",
    # words forgotten lately, as digests: another process's counts learned before are not written back
    "CREATE TABLE IF NOT EXISTS nextword_history_forgotten (user_id TEXT NOT NULL, digest TEXT NOT NULL, "
    "at DOUBLE PRECISION NOT NULL)",
    "CREATE INDEX IF NOT EXISTS nextword_history_forgotten_user ON nextword_history_forgotten (user_id, at)",
    # the history's weights fitted to each user as they type (personal_tokens.OnlineWeights), per model:
    # the summed share of the history and the tokens typed, by bucket; numbers only, no text
    "CREATE TABLE IF NOT EXISTS nextword_history_weights (user_id TEXT NOT NULL, model TEXT NOT NULL, "
    "bucket INTEGER NOT NULL, share DOUBLE PRECISION NOT NULL, tokens DOUBLE PRECISION NOT NULL, "
    "PRIMARY KEY (user_id, model, bucket))",
)
EVERYTHING = "*"  # the digest of forgetting everything
FORGOTTEN_SECONDS = 600.0  # how long a forgotten word's digest is kept (pending counts are written in far less)


ROW = tuple[str, tuple[str, ...], float, float]  # (user, n-gram, count, when)
FITTED_ROW = tuple[str, str, int, float, float, float]  # (user, model, bucket, summed share, tokens, when)


class Loaded(NamedTuple):
    """One user as stored: n-gram -> [count, last_used], the version, and model -> bucket -> [share, tokens]."""

    counts: dict[tuple[str, ...], list[float]]
    version: int
    fitted: dict[str, dict[int, list[float]]]


class StoreDown(Exception):
    """The database could not be reached, or did not answer in time: try again later."""


class RowsRefused(Exception):
    """The database refused these rows (a value out of its range, say): they will not go in as they are."""


class Dialect:
    """The SQL that differs between SQLite and PostgreSQL."""

    def __init__(self, placeholder: str, greatest: str, decayed: str, offset_all: str) -> None:
        self.p = placeholder
        self.greatest = greatest
        self.decayed = decayed  # an SQL expression of {count} and {delta} (seconds since its last use)
        self.offset_all = offset_all  # "LIMIT -1 OFFSET" (SQLite) or "OFFSET" (PostgreSQL)


def _postgres_decayed(half_life: float) -> str:
    """count * 2 ** (-max(0, delta) / half_life), in log space, zero below e**LOG_SPACE_FLOOR."""
    exponent = f"(ln(greatest({{count}}, 1e-300)) - greatest(0.0, {{delta}}) * {math.log(2.0) / half_life!r})"
    return f"(CASE WHEN {exponent} < {LOG_SPACE_FLOOR} THEN 0.0 ELSE exp({exponent}) END)"


class _Connection:
    """One database connection behind a lock, opened on first use and again after it failed."""

    def __init__(
        self,
        connect: Callable[[], Any],
        transient: tuple[type[Exception], ...],
        refused: type[Exception],
        up: Callable[[bool], None],
        begin: str = "",
    ) -> None:
        self._connect = connect
        self._transient = transient  # the connection failed: down
        self._refused = refused  # any other database error: the rows' own
        self._begin = begin  # how a transaction starts, where it is said (SQLite's writer: BEGIN IMMEDIATE)
        self._report = up
        self._lock = threading.Lock()
        self._connection: Any = None
        self._failed_at = -math.inf

    def run(self, work: Callable[[Any], T]) -> T:
        """``work(cursor)`` in one transaction; StoreDown when the database is out of reach, RowsRefused when
        it refuses the rows."""
        with self._lock:
            connection = self._open()
            try:
                cursor = connection.cursor()
                try:
                    if self._begin:
                        cursor.execute(self._begin)
                    result = work(cursor)
                finally:
                    cursor.close()
                connection.commit()
            except self._transient as error:
                self._drop()
                raise StoreDown(f"the history database failed: {type(error).__name__}") from None
            except self._refused as error:
                self._rollback()
                raise RowsRefused(f"the history database refused the rows: {type(error).__name__}") from None
            except BaseException:
                self._rollback()
                raise
            self._report(True)
            return result

    def _open(self) -> Any:
        if self._connection is not None:
            return self._connection
        if time.monotonic() - self._failed_at < RECONNECT_SECONDS:
            raise StoreDown("the history database is down (trying again shortly)")
        try:
            self._connection = self._connect()
        except Exception as error:  # noqa: BLE001 - any failure to connect: down, retried later
            self._failed_at = time.monotonic()
            self._report(False)
            raise StoreDown(f"cannot connect to the history database: {type(error).__name__}") from None
        return self._connection

    def _rollback(self) -> None:
        try:
            self._connection.rollback()
        except Exception:  # noqa: BLE001 - a connection that cannot roll back is dropped
            self._drop()

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        self._failed_at = time.monotonic()
        self._report(False)
        try:
            connection.close()
        except Exception:  # noqa: BLE001 - it is gone either way
            pass

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None


def _with_schema(connection: Any) -> Any:
    """``connection``, its tables created if they were not (each time the writer connects)."""
    cursor = connection.cursor()
    try:
        for statement in SCHEMA:
            cursor.execute(statement)
    finally:
        cursor.close()
    connection.commit()
    return connection


class HistoryStore:
    """N-gram counts per user in SQLite or PostgreSQL (see the module docstring). Thread-safe."""

    def __init__(self, location: str, config: HistoryConfig) -> None:
        self.location = location
        self.config = config
        self.up = True  # the last use of the database reached it
        if location.startswith(("postgresql://", "postgres://")):
            self.kind = "postgresql"
            self.dialect = Dialect("%s", "greatest", _postgres_decayed(config.half_life), "OFFSET")
            self.writer = self._postgres(schema=True)
            self.reader = self._postgres(schema=False)
        else:
            self.kind = "sqlite"
            self.dialect = Dialect("?", "max", "nw_decayed({count}, {delta})", "LIMIT -1 OFFSET")
            try:  # the file is created, or found wanting, now: a bad path fails the start in one line
                sqlite3.connect(location).close()
            except sqlite3.Error as error:
                raise ValueError(f"cannot open --history-db {location}: {error}") from None
            self.writer = self._sqlite(SQLITE_BUSY_SECONDS, schema=True)
            # one in-memory database is one connection's: readers share the writer's
            self.reader = self.writer if location == ":memory:" else self._sqlite(1.0, schema=False)
        try:  # connect now: a store that is down at start is served without until it is up
            self.writer.run(lambda cursor: None)
        except StoreDown:
            if self.kind == "sqlite":
                raise ValueError(f"cannot open --history-db {location}") from None
            log.warning("the history database is down at start: serving without personal history until it is up")

    def _postgres(self, schema: bool) -> _Connection:
        import psycopg  # only a PostgreSQL store needs it

        def connect():
            connection = psycopg.connect(
                self.location,
                autocommit=False,
                connect_timeout=CONNECT_TIMEOUT,
                options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
            )
            return _with_schema(connection) if schema else connection

        return _Connection(connect, (psycopg.OperationalError, psycopg.InterfaceError), psycopg.Error, self._up)

    def _sqlite(self, busy_seconds: float, schema: bool) -> _Connection:
        """A connection to the file; the writer's transactions take the write lock at their start (BEGIN
        IMMEDIATE), so what they read (forgotten words) still holds when they write."""
        half_life = self.config.half_life

        def decayed(count: float, delta: float) -> float:
            return count * 2.0 ** (-max(0.0, delta) / half_life)

        def connect():
            connection = sqlite3.connect(
                self.location, check_same_thread=False, timeout=busy_seconds, isolation_level=None if schema else ""
            )
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.create_function("nw_decayed", 2, decayed, deterministic=True)
            return _with_schema(connection) if schema else connection

        begin = "BEGIN IMMEDIATE" if schema else ""
        return _Connection(connect, (sqlite3.OperationalError, sqlite3.InterfaceError), sqlite3.Error, self._up, begin)

    def _up(self, up: bool) -> None:
        if up != self.up:
            if up:
                log.warning("the history database is up again: personal history is back")
            else:
                log.error("the history database is down: serving without personal history until it is up")
        self.up = up

    def _sql(self, text: str) -> str:
        return text.replace("?", self.dialect.p)

    # ------------------------------------------------------------------ reading

    def version(self, user: str) -> int:
        def read(cursor) -> int:
            cursor.execute(self._sql("SELECT version FROM nextword_history_users WHERE user_id = ?"), (user,))
            row = cursor.fetchone()
            return int(row[0]) if row else 0

        return self.reader.run(read)

    def load(self, user: str) -> Loaded:
        def read(cursor) -> Loaded:
            cursor.execute(self._sql("SELECT version FROM nextword_history_users WHERE user_id = ?"), (user,))
            row = cursor.fetchone()
            version = int(row[0]) if row else 0
            counts = self._counts(cursor, user)
            cursor.execute(
                self._sql("SELECT model, bucket, share, tokens FROM nextword_history_weights WHERE user_id = ?"),
                (user,),
            )
            fitted: dict[str, dict[int, list[float]]] = {}
            for model, bucket, share, tokens in cursor.fetchall():
                fitted.setdefault(model, {})[int(bucket)] = [float(share), float(tokens)]
            return Loaded(counts, version, fitted)

        return self.reader.run(read)

    def _counts(self, cursor, user: str) -> dict[tuple[str, ...], list[float]]:
        cursor.execute(self._sql("SELECT ngram, count, last_used FROM nextword_history WHERE user_id = ?"), (user,))
        return {tuple(gram.split(SEPARATOR)): [count, last] for gram, count, last in cursor.fetchall()}

    # ------------------------------------------------------------------ writing

    def add(self, rows: Iterable[ROW], fitted: Iterable[FITTED_ROW] = ()) -> dict[str, int]:
        """Add (user, n-gram, count, when) uses and (user, model, bucket, share, tokens, when) sums of the fitted
        weights in one transaction, prune, and bump each user's version; returns the new version of each user
        written."""
        d = self.dialect
        delta = "excluded.last_used - nextword_history.last_used"
        upsert = self._sql(
            "INSERT INTO nextword_history (user_id, ngram, count, last_used) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (user_id, ngram) DO UPDATE SET count = "
            f"{d.decayed.format(count='nextword_history.count', delta=delta)} + "
            f"{d.decayed.format(count='excluded.count', delta='-(' + delta + ')')}, "
            f"last_used = {d.greatest}(nextword_history.last_used, excluded.last_used)"
        )
        add_fitted = self._sql(
            "INSERT INTO nextword_history_weights (user_id, model, bucket, share, tokens) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (user_id, model, bucket) DO UPDATE SET share = nextword_history_weights.share + "
            "excluded.share, tokens = nextword_history_weights.tokens + excluded.tokens"
        )
        rows, fitted = list(rows), list(fitted)
        users = sorted({user for user, *_ in rows} | {user for user, *_ in fitted})

        def write(cursor) -> dict[str, int]:
            self._lock_users(cursor, users)
            kept = self._not_forgotten(cursor, [(u, g, t) for u, g, _, t in rows])
            cursor.executemany(upsert, [(u, SEPARATOR.join(g), c, t) for (u, g, c, t), k in zip(rows, kept) if k])
            # the sums hold no word: only forgetting everything drops them
            kept = self._not_forgotten(cursor, [(u, (), w) for u, *_, w in fitted])
            cursor.executemany(add_fitted, [row[:5] for row, k in zip(fitted, kept) if k])
            versions = {}
            for user in users:
                self._prune(cursor, user)
                versions[user] = self._bump(cursor, user)
            return versions

        return self.writer.run(write)

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

    def _lock_users(self, cursor, users: Sequence[str]) -> None:
        """PostgreSQL: hold these users' rows (made if missing) until the transaction ends, before any of their
        n-grams, so that a forget and a write of the same user's counts happen one after the other, and two
        writes never wait on each other in a circle (SQLite's writer holds the whole file)."""
        if self.kind == "postgresql" and users:
            ordered = sorted(users)  # every transaction locks users in one order: no deadlock between two
            cursor.executemany(
                "INSERT INTO nextword_history_users (user_id, version) VALUES (%s, 0) ON CONFLICT DO NOTHING",
                [(user,) for user in ordered],
            )
            cursor.execute(
                "SELECT user_id FROM nextword_history_users WHERE user_id = ANY(%s) ORDER BY user_id FOR UPDATE",
                (ordered,),
            )

    def _not_forgotten(self, cursor, uses: list[tuple[str, tuple[str, ...], float]]) -> list[bool]:
        """For each (user, n-gram, when): whether to write it, not learned before its user forgot a word it holds
        (or everything) in any process."""
        if not uses:
            return []
        oldest = min(when for *_, when in uses)
        cursor.execute(self._sql("SELECT user_id, digest, at FROM nextword_history_forgotten WHERE at >= ?"), (oldest,))
        marks: dict[str, list[tuple[str, float]]] = {}
        for user, digest, at in cursor.fetchall():
            marks.setdefault(user, []).append((digest, at))
        kept = []
        for user, gram, when in uses:
            forgotten = [digest for digest, at in marks.get(user, ()) if at >= when]
            kept.append(not forgotten or (EVERYTHING not in forgotten and digests_held(gram).isdisjoint(forgotten)))
        return kept

    def forget(self, user: str, word: str | None) -> int:
        """Delete every n-gram of ``user`` that holds ``word`` (None: all of them), and remember the word (as a
        digest) for a while, so that counts learned before in another process are not written back; how many
        n-grams went."""
        now = time.time()

        def write(cursor) -> int:
            self._lock_users(cursor, [user])
            if word is None:
                cursor.execute(self._sql("DELETE FROM nextword_history WHERE user_id = ?"), (user,))
                removed, digest = cursor.rowcount, EVERYTHING
                cursor.execute(self._sql("DELETE FROM nextword_history_weights WHERE user_id = ?"), (user,))
            else:
                gone = UserHistory(self.config, self._counts(cursor, user)).forget(word)
                statement = self._sql("DELETE FROM nextword_history WHERE user_id = ? AND ngram = ?")
                cursor.executemany(statement, [(user, SEPARATOR.join(g)) for g in gone])
                removed, digest = len(gone), word_digest(units(word))
            cursor.execute(
                self._sql("INSERT INTO nextword_history_forgotten (user_id, digest, at) VALUES (?, ?, ?)"),
                (user, digest, now),
            )
            cursor.execute(self._sql("DELETE FROM nextword_history_forgotten WHERE at < ?"), (now - FORGOTTEN_SECONDS,))
            self._bump(cursor, user)
            return removed

        return self.writer.run(write)

    def close(self) -> None:
        self.writer.close()
        if self.reader is not self.writer:
            self.reader.close()
