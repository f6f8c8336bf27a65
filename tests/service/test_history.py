"""Personal history (service/history/histories.py) against a real SQLite file: learning, prediction, the mix,
forgetting, limits, recency, and concurrent learners in separate processes."""

import json
import multiprocessing
import time
import uuid

import numpy as np
import pytest

from service.api.config import ServerConfig
from service.history.for_user import PersonalEngine, SessionLearner
from service.history.histories import Histories
from service.history.store import HistoryStore
from service.model.engine import Engine
from service.model.personal import HistoryConfig, UserHistory, units
from service.model.personal_tokens import EVIDENCE_BINS, ONLINE_PRIOR, SERVED_WEIGHTS
from service.model.suggest import Suggester
from service.model.typing_session import TypingSession
from tests.postgres import postgres_server, required
from tests.service.fakes import FakeModel, word_tokenizer
from training.vocabulary import build_tokenizer


def open_store(path, **options) -> Histories:
    config = HistoryConfig(**{"flush_ms": 20.0, **options})
    # these tests are about what is learned, not how long a read may take (test_history_faults.py): no timeout
    return Histories(HistoryStore(str(path), config), config, read_timeout_ms=60_000.0)


@pytest.fixture(scope="module")
def postgres():
    required()
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path):
    """Where a store lives: a fresh SQLite file, or a fresh database on the test's PostgreSQL server."""
    if request.param == "sqlite":
        yield str(tmp_path / "history.sqlite")
        return
    import psycopg

    url = request.getfixturevalue("postgres")
    name = f"t{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield url.replace("/postgres?", f"/{name}?")


@pytest.fixture
def histories(location):
    store = open_store(location)
    yield store
    store.close()


def test_units_are_words_numbers_and_cjk_characters_with_punctuation_as_breaks():
    assert units("I met Zelda, at 3 o'clock") == ["I", "met", "Zelda", "", "at", "3", "o'clock"]
    assert units("我昨天上学。") == ["我", "昨", "天", "上", "学", ""]


VOCAB = ["I", "saw", "met", "and", "Zebedee", "Zeal", "Zerah", "Zenas", "Zeeb", "see", "you", "thank", "all", "in"]


def suggest(histories: Histories, user: str, text: str, served: dict[str, float], k: int = 3) -> list:
    """What Suggest answers ``user`` after ``text`` from a model whose next words are ``served`` wherever it is,
    with the user's history mixed into its distribution as the server mixes it."""
    tokenizer = word_tokenizer(VOCAB)
    table = {tokenizer.encode(word)[0]: p for word, p in served.items()}
    personal = histories.personal(user, "default", tokenizer)
    found = Suggester(FakeModel(tokenizer.vocab_size, lambda history: table), tokenizer).suggest(
        text, k, personal if personal else None
    )
    return [(word, round(p, 3)) for word, p in found.suggestions]


def test_a_name_typed_three_times_is_completed_and_beats_the_served_completions(histories):
    for text in ("I met Zelda today", "then Zelda left", "and Zelda came back"):
        histories.learn("ann", units(text))
    # as a real model does: most of the next word's probability on common words, a little on the Ze- words
    served = {"all": 0.9, "in": 0.09, "Zebedee": 0.007, "Zeal": 0.003}
    mixed = suggest(histories, "ann", "I saw Ze", served)
    assert [w for w, _ in mixed] == ["Zelda", "Zebedee", "Zeal"]  # first, beside the model's own completions
    assert suggest(histories, "ann", "and Ze", served)[0][0] == "Zelda"  # a context seen once: still 3 uses
    assert suggest(histories, "bob", "I saw Ze", served, 2) == [("Zebedee", 0.7), ("Zeal", 0.3)]  # unpersonalised
    sure = {"all": 0.5, "Zebedee": 0.49, "Zeal": 0.01}  # where the model is sure of its own, it stays first
    assert suggest(histories, "ann", "I saw Ze", sure)[0][0] == "Zebedee"


def test_a_user_with_no_history_that_applies_gets_exactly_the_served_answer(histories):
    served = {"all": 0.5, "in": 0.2}
    plain = suggest(histories, "new", "In the ", served, 2)
    assert [w for w, _ in plain] == ["all", "in"]
    histories.learn("ann", units("green apples"))
    assert suggest(histories, "ann", "completely unrelated xq", served, 2) == []  # nothing starts with xq


def test_the_context_decides_the_next_word(histories):
    for _ in range(3):
        histories.learn("ann", units("see you tomorrow. thank you kindly"))
    served = {"all": 0.6, "and": 0.4}
    after_see = [w for w, _ in suggest(histories, "ann", "see you ", served, 3)]
    after_thank = [w for w, _ in suggest(histories, "ann", "thank you ", served, 3)]
    assert "tomorrow" in after_see and "kindly" not in after_see
    assert "kindly" in after_thank and "tomorrow" not in after_thank
    unsure = dict.fromkeys(["all", "and", "in", "saw", "met", "Zeal"], 0.1)  # where the model is unsure
    assert suggest(histories, "ann", "see you ", unsure, 3)[0][0] == "tomorrow"  # the history leads


def test_learned_counts_reach_the_database_and_another_store_reads_them(location):
    path = location
    first = open_store(path)
    first.learn("ann", units("hello brave world"))
    first.close()  # close flushes
    second = open_store(path)
    assert len(second.user("ann")) == 6  # 3 unigrams, 2 bigrams, 1 trigram
    second.close()


def test_forget_removes_the_word_and_every_ngram_with_it_at_once(histories):
    histories.learn("ann", units("meet Zelda soon"))
    histories.learn("ann", units("meet Zelda soon"))
    assert "Zelda" in [w for w, _ in suggest(histories, "ann", "meet Ze", {"all": 0.99, "Zeal": 0.01})]
    removed = histories.forget("ann", "zelda")
    assert removed == 4  # Zelda, meet Zelda, Zelda soon, meet Zelda soon
    assert all("Zelda" not in gram for gram in histories.user("ann").counts)
    assert "Zelda" not in [w for w, _ in suggest(histories, "ann", "meet Ze", {"all": 0.99, "Zeal": 0.01})]
    assert histories.forget("ann", "") == 0  # a blank word holds nothing (the server refuses it)
    assert histories.forget("ann", None) == 2  # everything: what was left, meet and soon
    assert len(histories.user("ann")) == 0


def fitted_weight(histories: Histories, user: str, model: str = "default") -> float:
    """The history's weight in bucket (1 unit of context typed, seen under 3 times) of ``user`` on ``model``."""
    return histories.personal(user, model, word_tokenizer(VOCAB)).weights.weights[1][0]


def test_a_users_weights_follow_their_typing_persist_across_processes_and_stay_their_own(location):
    first, second = open_store(location), open_store(location)  # two server processes on one store
    for who in ("ann", "bob"):
        first.learn(who, units("I met Zelda"))
    start = fitted_weight(first, "ann")
    assert start == SERVED_WEIGHTS.weights[1][0]  # nothing typed since: the served weight
    # ann typed 100 tokens after one unit of context where her history gave each 0.5 and the model 0.01:
    # each token's share of her history is w * 0.5 / (w * 0.5 + (1 - w) * 0.01) at the weight w of now
    n, bucket = 100, len(EVIDENCE_BINS) + 1
    first.fit("ann", "default", np.full(n, 0.01), np.full(n, 0.5), np.full(n, bucket))
    share = start * 0.5 / (start * 0.5 + (1 - start) * 0.01)
    expected = (ONLINE_PRIOR * start + n * share) / (ONLINE_PRIOR + n)
    assert fitted_weight(first, "ann") == pytest.approx(expected, abs=1e-4)  # at once in this process
    assert fitted_weight(first, "bob") == start and fitted_weight(first, "ann", "other") == start  # hers alone
    first.flush()
    second._cache.clear()  # as REFRESH_SECONDS would: the other process reads the store
    assert fitted_weight(second, "ann") == pytest.approx(expected, abs=1e-4)
    assert fitted_weight(second, "bob") == start
    second.fit("ann", "default", np.full(n, 0.01), np.full(n, 0.5), np.full(n, bucket))
    second.flush()  # the sums add up in the store, whichever process wrote them
    first._cache.clear()
    assert fitted_weight(first, "ann") > expected
    first.forget("ann", "zelda")  # a word: the weights hold no words and stay
    assert fitted_weight(first, "ann") > expected
    first.forget("ann", None)  # everything: the weights go back to the served ones, in the store too
    assert fitted_weight(first, "ann") == start
    second._cache.clear()
    assert fitted_weight(second, "ann") == start and fitted_weight(second, "bob") == start
    first.close()
    second.close()


def test_a_users_fitted_weights_learned_before_forgetting_everything_elsewhere_are_not_written(location):
    first, second = open_store(location, flush_ms=60_000.0), open_store(location)
    first.learn("ann", units("I met Zelda"))
    first.fit("ann", "default", np.full(10, 0.01), np.full(10, 0.5), np.full(10, 5))  # pending in this process
    time.sleep(0.01)
    second.forget("ann", None)  # another process forgets everything first
    first.flush()
    store = HistoryStore(location, first.config)
    assert store.load("ann").fitted == {} and store.load("ann").counts == {}
    store.close()
    first.close()
    second.close()


def test_the_cap_keeps_the_most_recently_used(location):
    histories = open_store(location, max_entries=5, order=1)
    for word in ["one", "two", "three", "four", "five", "six", "seven"]:
        histories.learn("ann", [word])
        time.sleep(0.002)
    histories.flush()
    histories.close()
    reopened = open_store(location, max_entries=5, order=1)
    assert {g[0] for g in reopened.user("ann").counts} == {"three", "four", "five", "six", "seven"}
    reopened.close()


def test_recent_use_counts_more():
    history = UserHistory(HistoryConfig(half_life_days=1.0, order=1))
    now = time.time()
    history.add(("noble",), 4.0, now - 3 * 86400)  # 4 uses three half-lives ago: worth 0.5 now
    history.add(("nova",), 1.0, now)
    predicted, evidence = history.predict([], "no", now)
    assert [w for w, _ in predicted] == ["nova", "noble"]
    assert dict(predicted)["nova"] == pytest.approx(1 / 1.5) and evidence == pytest.approx(1.5)
    assert history.predict([], "", now) == ([], 0.0)  # no prefix and no context seen: nothing to say


def test_a_session_learns_finished_words_only_and_not_twice(histories):
    learner = SessionLearner(histories, "ann")
    learner.update("hello wor")
    assert {g for g in histories.user("ann").counts} == {("hello",)}
    learner.update("hello w")  # deleted before it was finished: nothing
    learner.update("hello world ")
    learner.update("hello world")  # the space deleted and typed again: not learned twice
    learner.update("hello world ")
    counts = histories.user("ann").counts
    assert counts[("world",)][0] == pytest.approx(1.0, rel=1e-3)
    learner.update("hello world and mor", final=True)  # the end of the session: the rest too
    assert ("world", "and", "mor") in histories.user("ann").counts


def test_a_session_fits_the_users_weights_by_each_finished_word_without_reading_more(tiny_word_model, tmp_path):
    """Each finished word moves the user's weights by its probability after the text before it, which the session
    read as the word began: a look back at kept states, not one more step of the model."""
    histories = open_store(tmp_path / "h.sqlite")
    engine = PersonalEngine(Engine.load(ServerConfig(model=tiny_word_model, batching=False)), histories, "ann")
    histories.learn("ann", units("I like the cat. I like the dog."))
    for learn_first in (True, False):  # as the servicer (learn, then answer), and the other way round
        steps = {}
        for fit in (False, True):
            session = TypingSession(engine.engine.suggester, max_chars=1000)
            learner = engine.learner(False, session.next_log_probs if fit else None)
            assert learner is not None
            for ch in "I like the cat and I like the dog. ":
                session.append(ch)
                if learn_first:
                    learner.update(session.text)
                engine.suggest(session.suggest, session.text, 3)
                if not learn_first:
                    learner.update(session.text)
            steps[fit] = session.context.steps
        assert steps[True] == steps[False]
    fitted = histories.user("ann").fitted[engine.engine.name]
    assert sum(tokens for _, tokens in fitted.values()) == 2 * 9  # the 9 words of each session that fitted
    histories.close()


def test_export_and_import_round_trip(tmp_path, histories):
    histories.learn("ann", units("a tale of two cities"))
    lines = list(histories.export("ann"))
    assert all(set(json.loads(line)) == {"ngram", "count", "last_used"} for line in lines)
    other = open_store(tmp_path / "other.sqlite")
    assert other.import_lines("ann", lines) == len(lines)
    assert other.user("ann").counts.keys() == histories.user("ann").counts.keys()
    with pytest.raises(ValueError, match="line 1"):
        other.import_lines("ann", ["not json"])
    other.close()


def _learn_many(path: str, word: str, rounds: int, together, spans) -> None:
    """Learn ``word`` 10 times a round, writing after each; the two processes start each round together."""
    store = open_store(path, flush_ms=60_000.0)
    written = []
    for _ in range(rounds):
        together.wait(60)
        for _ in range(10):
            store.learn("ann", [word])
            started = time.time()
            store.flush()
            written.append((started, time.time()))
    spans.put(written)
    store.close()


def test_two_processes_learning_for_one_user_lose_no_counts(location):
    path = location
    open_store(path).close()  # the schema, once
    spawn = multiprocessing.get_context("spawn")
    together, spans = spawn.Barrier(2), spawn.Queue()
    workers = [spawn.Process(target=_learn_many, args=(path, "shared", 20, together, spans)) for _ in range(2)]
    for worker in workers:
        worker.start()
    first, second = spans.get(timeout=120), spans.get(timeout=120)
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    # the writes overlapped: each process wrote while the other was between its first and last write
    assert any(first[0][0] < start < first[-1][1] for start, _ in second)
    assert any(second[0][0] < start < second[-1][1] for start, _ in first)
    reader = open_store(path)
    assert reader.user("ann").counts[("shared",)][0] == pytest.approx(400.0, rel=1e-3)
    reader.close()


def test_ngrams_unused_for_longer_than_the_age_limit_are_dropped(location):
    histories = open_store(location, max_age_days=1.0)
    now = time.time()
    old = json.dumps({"ngram": ["ancient"], "count": 5.0, "last_used": now - 3 * 86400})
    fresh = json.dumps({"ngram": ["recent"], "count": 1.0, "last_used": now})
    histories.import_lines("ann", [old, fresh])
    assert set(histories.user("ann").counts) == {("recent",)}
    histories.close()


@pytest.mark.parametrize("kind", ["word", "char"])
def test_predicted_words_become_next_token_probabilities(kind):
    from service.model.personal_mix import NextTokens

    tokenizer = build_tokenizer(kind, ["we like zelda and zeal", "we like rice"] * 3, lowercase=True)
    tokens = NextTokens(tokenizer)
    found = tokens.distribution("we like ", [("Zelda", 0.75), ("rice", 0.25)])
    assert found.sum() == pytest.approx(1.0)
    assert tokenizer.token_text(int(found.argmax())).strip() == ("zelda" if kind == "word" else "z")
    if kind == "char":  # inside a word: the next letter of the predicted word; after a word: a space first
        assert tokenizer.token_text(int(tokens.distribution("we like zel", [("zelda", 1.0)]).argmax())) == "d"
        assert tokenizer.token_text(int(tokens.distribution("we like,", [("zelda", 1.0)]).argmax())) == " "
    else:  # a word the vocabulary lacks maps to no token
        assert tokens.distribution("we like ", [("Quentin", 1.0)]) is None
