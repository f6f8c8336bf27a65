"""The history store under faults, against real SQLite and a real PostgreSQL: a slow or stopped database never
holds up an answer, one user's bad rows never stop another's learning, and a forgotten word stays forgotten
in every process."""

from __future__ import annotations

import json
import threading
import time

import psycopg
import pytest
import torch

from service.history import histories as histories_module
from service.history.histories import Histories
from service.history.store import HistoryStore, StoreDown
from service.model.personal import HistoryConfig, units
from tests.postgres import postgres_control, required
from tests.service.fakes import word_tokenizer

TOKENIZER = word_tokenizer(["I", "met", "Zero"])
SERVED = torch.full((TOKENIZER.vocab_size,), 1.0 / TOKENIZER.vocab_size).log()


def events() -> tuple[dict[str, int], callable]:
    counted: dict[str, int] = {}

    def on_event(event: str, count: int) -> None:
        counted[event] = counted.get(event, 0) + count

    return counted, on_event


def opened(location: str, **options) -> tuple[Histories, dict[str, int]]:
    config = HistoryConfig(**{"flush_ms": 20.0, **options})
    counted, on_event = events()
    return Histories(HistoryStore(location, config), config, read_timeout_ms=200.0, on_event=on_event), counted


@pytest.fixture(scope="module")
def postgres():
    required()
    with postgres_control() as server:
        yield server


def wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_a_failing_cursor_releases_the_lock_and_close_does_not_hang(tmp_path):
    store = HistoryStore(str(tmp_path / "h.sqlite"), HistoryConfig())

    class Broken:
        def cursor(self):
            raise __import__("sqlite3").OperationalError("disk I/O error")

        def close(self):
            pass

    store.writer._connection = Broken()
    with pytest.raises(StoreDown):
        store.add([("ann", ("hello",), 1.0, time.time())])
    assert store.up is False
    done = threading.Event()
    threading.Thread(target=lambda: (store.close(), done.set()), daemon=True).start()
    assert done.wait(5), "close() hung: a lock was left held"


def test_a_slow_store_never_holds_up_an_answer(tmp_path):
    histories, counted = opened(str(tmp_path / "h.sqlite"))
    histories.read_timeout = 0.05
    release = threading.Event()
    original = histories.store.load

    def slow_load(user):
        release.wait(10)
        return original(user)

    histories.store.load = slow_load
    try:
        started = time.monotonic()
        history = histories.user("ann")
        assert time.monotonic() - started < 0.5
        assert len(history) == 0  # answered without
        assert counted.get("answered_without") == 1
    finally:
        release.set()
        histories.close()


def test_one_users_refused_rows_are_set_aside_and_everyone_elses_are_written(postgres):
    histories, counted = opened(postgres.url)
    with psycopg.connect(postgres.url, autocommit=True) as admin:
        admin.execute("ALTER TABLE nextword_history ADD CONSTRAINT no_mallory CHECK (user_id <> 'mallory') NOT VALID")
    try:
        histories.learn("mallory", units("a row the database refuses"))
        histories.learn("ann", units("we met Zelda today"))
        histories.flush()
        assert counted.get("rows_set_aside", 0) > 0
        assert ("Zelda",) in HistoryStore(postgres.url, histories.config).load("ann")[0]
        histories.learn("ann", units("and Zelda again"))  # learning goes on after the refusal
        histories.flush()
        assert HistoryStore(postgres.url, histories.config).load("ann")[0][("Zelda",)][0] > 1.5
    finally:
        histories.close()
        with psycopg.connect(postgres.url, autocommit=True) as admin:
            admin.execute("ALTER TABLE nextword_history DROP CONSTRAINT no_mallory")


def test_an_ancient_row_does_not_underflow_the_decay(postgres):
    """A row last used 1e12 s ago (before import checked last_used) once made every later write fail."""
    histories, _ = opened(postgres.url, half_life_days=1.0)
    with psycopg.connect(postgres.url, autocommit=True) as admin:
        admin.execute("INSERT INTO nextword_history VALUES ('olga', 'ancient', 1e-200, -1e12) ON CONFLICT DO NOTHING")
    try:
        histories.learn("olga", ["ancient"])
        histories.learn("bert", units("good morning"))
        histories.flush()
        counts = HistoryStore(postgres.url, histories.config).load("olga").counts
        assert counts[("ancient",)][0] == pytest.approx(1.0)
        assert ("morning",) in HistoryStore(postgres.url, histories.config).load("bert")[0]
    finally:
        histories.close()


def test_a_database_restart_under_load_answers_throughout_and_learning_resumes(postgres):
    histories, counted = opened(postgres.url)
    stop = threading.Event()
    slowest = [0.0]

    def keystrokes() -> None:  # a steady load of reads, as typing sessions make
        while not stop.is_set():
            started = time.monotonic()
            histories.personal("carl", "default", TOKENIZER).mix("I met", SERVED)
            slowest[0] = max(slowest[0], time.monotonic() - started)
            time.sleep(0.01)

    reader = threading.Thread(target=keystrokes, daemon=True)
    reader.start()
    try:
        histories.learn("carl", units("I met Zelda"))
        histories.flush()
        postgres.stop()
        histories.learn("carl", units("and Zora too"))  # learned while it is down: kept pending
        assert wait_for(lambda: not histories.store.up, 10), "the store did not notice the database went down"
        time.sleep(1.0)  # reads and writes go on meanwhile
        postgres.start()
        assert wait_for(lambda: histories.store.up, 15), "the store did not reconnect"
        assert wait_for(lambda: ("Zora",) in HistoryStore(postgres.url, histories.config).load("carl")[0], 15)
    finally:
        stop.set()
        reader.join(5)
        histories.close()
    assert slowest[0] < 1.0, f"a read waited {slowest[0]:.2f} s on the stopped database"


def test_a_word_forgotten_in_one_process_is_not_written_back_by_another(tmp_path):
    location = str(tmp_path / "shared.sqlite")
    first, _ = opened(location, flush_ms=60_000.0)  # its counts stay pending
    second, _ = opened(location)
    try:
        first.learn("dora", units("I met Zelda"))
        time.sleep(0.01)
        second.forget("dora", "Zelda")
        first.flush()  # written after the forget: the word must not come back
        counts = HistoryStore(location, first.config).load("dora").counts
        assert not any("Zelda" in gram for gram in counts)
        assert ("met",) in counts  # the rest of what was learned is kept
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize(
    ("word", "gone", "kept"), [("Zhang Wei", ("Zhang", "Wei"), ("Zhang",)), ("你好", ("你", "好"), ("你",))]
)
def test_forget_removes_a_word_of_several_units(tmp_path, word, gone, kept):
    histories, _ = opened(str(tmp_path / "h.sqlite"))
    try:
        histories.learn("eve", units(f"call {word} now"))
        histories.learn("eve", units(kept[0]))
        assert histories.forget("eve", word) > 0
        counts = histories.user("eve").counts
        assert not any(gram[i : i + 2] == gone for gram in counts for i in range(len(gram)))
        assert kept in counts  # a unit of the word on its own is another word
    finally:
        histories.close()


def test_pending_counts_are_bounded_and_what_is_dropped_is_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(histories_module, "MAX_PENDING", 5)
    histories, counted = opened(str(tmp_path / "h.sqlite"), flush_ms=60_000.0)
    try:
        histories.learn("fay", [f"w{i}" for i in range(10)])  # ten unigrams and bigrams...
        assert len(histories._pending) == 5
        assert counted["counts_dropped"] > 0
    finally:
        histories.close()


def test_close_finishes_within_its_timeout_when_the_store_hangs(tmp_path):
    histories, _ = opened(str(tmp_path / "h.sqlite"), flush_ms=60_000.0)
    histories.learn("gus", units("hello there"))
    histories.store.add = lambda rows: time.sleep(30)
    started = time.monotonic()
    histories.close(timeout=1.0)
    assert time.monotonic() - started < 2.0


def test_import_checks_every_field(tmp_path):
    histories, _ = opened(str(tmp_path / "h.sqlite"))
    now = time.time()

    def line(**entry) -> str:
        return json.dumps({"ngram": ["ok"], "count": 1.0, "last_used": now - 10, **entry})

    try:
        for bad, says in [
            (line(last_used=-1e12), "last_used"),
            (line(last_used=now + 86400), "last_used"),
            (line(count=1e300), "count"),
            (line(count=0), "count"),
            (line(ngram=["x" * 1_000_000]), "64 bytes"),
            (line(ngram=[1]), "non-empty string"),
            (line(ngram=["a", "b", "c", "d", "e"]), "1 to 4 units"),
        ]:
            with pytest.raises(ValueError, match=says):
                histories.import_lines("hal", [line(), bad])
        assert histories.import_lines("hal", [line()]) == 1
    finally:
        histories.close()
