"""Personal history through a real server: who may name which user, learning from Type and Learn,
incognito, forgetting, export and import, two models on one history, and the database surviving
SIGTERM and SIGKILL."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import grpc
import pytest

from service.client import NextWordClient
from service.pb.nextword.v1 import nextword_pb2 as pb
from service.pb.nextword.v1 import nextword_pb2_grpc as pb_grpc
from tests.conftest import ROOT
from tests.e2e.test_server import serve_process, start
from tests.e2e.test_workers import wait_for

ALICE_TOKEN = "token-for-alice-0123456789"
BACKEND_TOKEN = "token-for-backend-0123456789"


def words(response: pb.SuggestResponse) -> list[str]:
    return [s.text for s in response.suggestions]


@pytest.fixture
def served(tiny_word_model, tmp_path):
    server, port, _ = start(tiny_word_model, history_db=str(tmp_path / "history.sqlite"), history_flush_ms=20)
    yield port, server, tmp_path / "history.sqlite"
    server.stop(0)


def typed(client: NextWordClient, text: str, incognito: bool = False) -> list[pb.TypeResponse]:
    edits = [pb.TypeRequest(append=ch, incognito=incognito and i == 0) for i, ch in enumerate(text)]
    return list(client.type(edits, timeout=60))


def test_a_name_typed_three_times_is_suggested_to_its_user_only(served):
    port = served[0]
    with NextWordClient(f"127.0.0.1:{port}", user="alice") as alice, NextWordClient(f"127.0.0.1:{port}") as nobody:
        before = words(alice.suggest("I like Ze"))
        assert "Zelda" not in before  # the vocabulary has no such word
        for _ in range(3):
            typed(alice, "I like Zelda. ")
        assert words(alice.suggest("I like Ze"))[0] == "Zelda"  # completed
        assert "Zelda" in words(alice.suggest("I like "))  # and suggested as the next word
        assert words(nobody.suggest("I like Ze")) == before  # a call without a user: as before
        with NextWordClient(f"127.0.0.1:{port}", user="bob") as bob:
            assert words(bob.suggest("I like Ze")) == before  # another user: as before


def generated(client: NextWordClient, prompt: str) -> str:
    return "".join(m.text for m in client.generate(prompt, temperature=0, max_tokens=6))


def test_generate_continues_with_the_users_own_words(tiny_char_model, tmp_path):
    server, port, _ = start(tiny_char_model, history_db=str(tmp_path / "h.sqlite"))
    try:
        with NextWordClient(f"127.0.0.1:{port}", user="kim") as kim, NextWordClient(f"127.0.0.1:{port}") as nobody:
            plain = generated(nobody, "we love z")
            kim.learn(" ".join(["we love zelda."] * 12))  # often: the weight grows with the evidence
            assert generated(kim, "we love z").startswith("elda")
            assert not plain.startswith("elda") and generated(nobody, "we love z") == plain
    finally:
        server.stop(0)


def test_an_incognito_session_learns_nothing_and_unfinished_words_are_not_learned(served):
    port = served[0]
    with NextWordClient(f"127.0.0.1:{port}", user="carol") as carol:
        for _ in range(3):
            typed(carol, "I like Zelda. ", incognito=True)
        edits = [pb.TypeRequest(append="I like Quint"), pb.TypeRequest(delete=5), pb.TypeRequest(append="rice ")]
        list(carol.type(edits, timeout=60))
        assert "Zelda" not in words(carol.suggest("I like Ze"))
        assert "Quint" not in words(carol.suggest("I like Qu"))


def fitted_rows(path, user: str) -> list[tuple]:
    """The sums of ``user``'s weights fitted as they type, as the store holds them: (model, bucket, share, tokens)."""
    with sqlite3.connect(path) as db:
        query = "SELECT model, bucket, share, tokens FROM nextword_history_weights WHERE user_id = ? ORDER BY bucket"
        return db.execute(query, (user,)).fetchall()


def test_typing_fits_the_users_weights_but_not_incognito_and_forget_clears_them(served):
    port, _, path = served
    with (
        NextWordClient(f"127.0.0.1:{port}", user="gina") as gina,
        NextWordClient(f"127.0.0.1:{port}", user="hugo") as hugo,
    ):
        for _ in range(3):
            typed(gina, "I like Zelda. ")
            typed(hugo, "I like Zelda. ", incognito=True)
        # every word typed once she had a history moved her weights: all but the first "I" (written within a
        # flush interval or two: the writer may have taken some of them before the last)
        wait_for(lambda: sum(row[3] for row in fitted_rows(path, "gina")) >= 8, 10)
        rows = fitted_rows(path, "gina")
        assert len({row[0] for row in rows}) == 1  # the one model served (by its name)
        assert sum(row[3] for row in rows) == 8
        assert all(0 < share <= tokens for _, _, share, tokens in rows)
        assert fitted_rows(path, "hugo") == []  # incognito: nothing learned, no weights fitted
        gina.learn("I like Zelda.")  # Learn adds words; the weights follow what is typed
        time.sleep(0.2)
        assert sum(row[3] for row in fitted_rows(path, "gina")) == 8
        gina.forget("zelda")  # a word: the weights hold none and stay
        assert sum(row[3] for row in fitted_rows(path, "gina")) == 8
        gina.forget(everything=True)
        assert fitted_rows(path, "gina") == []


def test_learn_and_forget_at_once(served):
    port = served[0]
    with NextWordClient(f"127.0.0.1:{port}", user="dave") as dave:
        assert dave.learn("We met Orlando. Orlando cooks. Orlando sings.").ngrams > 0
        assert words(dave.suggest("I like Or"))[0] == "Orlando"
        assert dave.forget("orlando").removed > 0
        assert "Orlando" not in words(dave.suggest("I like Or"))  # the very next call
        with pytest.raises(grpc.RpcError) as caught:
            NextWordClient(f"127.0.0.1:{port}").learn("no user named")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "x-nextword-user" in caught.value.details()


def test_export_then_import_gives_another_user_the_same_suggestions(served):
    port = served[0]
    with (
        NextWordClient(f"127.0.0.1:{port}", user="erin") as erin,
        NextWordClient(f"127.0.0.1:{port}", user="frank") as frank,
    ):
        erin.learn("I like Zelda. I like Zelda. I like Zelda.")
        lines = list(erin.export_history())
        assert lines and all(line.startswith('{"ngram": [') for line in lines)
        assert frank.import_history(lines).ngrams == len(lines)
        assert words(frank.suggest("I like Ze")) == words(erin.suggest("I like Ze"))
        with pytest.raises(grpc.RpcError) as caught:
            frank.import_history(["not a history line"])
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "line 1" in caught.value.details()


def test_model_info_reports_the_history_and_learning_can_be_off(tiny_word_model, tmp_path):
    server, port, _ = start(tiny_word_model, history_db=str(tmp_path / "h.sqlite"), learning=False)
    try:
        with NextWordClient(f"127.0.0.1:{port}", user="gina") as gina:
            info = gina.info()
            assert (info.history_store, info.learning, info.history_max_entries) == ("sqlite", False, 20_000)
            with pytest.raises(grpc.RpcError) as caught:
                gina.learn("anything")
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "--no-learning" in caught.value.details()
            typed(gina, "I like Zelda. ")
            assert gina.export_history() is not None and list(gina.export_history()) == []
    finally:
        server.stop(0)


def test_tokens_may_name_only_their_users(tiny_word_model, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{ALICE_TOKEN} alice\n{BACKEND_TOKEN} *\n")
    server, port, _ = start(tiny_word_model, auth_token_file=str(tokens), history_db=str(tmp_path / "h.sqlite"))
    target = f"127.0.0.1:{port}"
    try:
        with NextWordClient(target, token=ALICE_TOKEN, user="alice") as client:
            assert client.learn("I like Zelda.").ngrams > 0
        for token, user in ((ALICE_TOKEN, "bob"), (ALICE_TOKEN, "alice2")):
            with NextWordClient(target, token=token, user=user) as client, pytest.raises(grpc.RpcError) as caught:
                client.suggest("I like ")
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with NextWordClient(target, token=BACKEND_TOKEN, user="bob") as client:
            assert client.suggest("I like ").suggestions
        with (
            NextWordClient(target, token=ALICE_TOKEN, user="not a user!") as client,
            pytest.raises(grpc.RpcError) as caught,
        ):
            client.suggest("I like ")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop(0)


def test_one_history_serves_two_different_models(tiny_word_model, tiny_char_model, tmp_path):
    path = str(tmp_path / "h.sqlite")
    server, port, _ = start(tiny_word_model, history_db=path)
    with NextWordClient(f"127.0.0.1:{port}", user="hana") as hana:
        hana.learn("We love Zelda. We love Zelda. We love Zelda.")
    server.stop(0)  # writes what is pending
    server, port, _ = start(tiny_char_model, history_db=path)
    try:
        with NextWordClient(f"127.0.0.1:{port}", user="hana") as hana:
            assert words(hana.suggest("We love Ze"))[0] == "Zelda"
    finally:
        server.stop(0)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_learned_counts_survive_the_process_ending(tiny_word_model, tmp_path, how):
    path = tmp_path / "h.sqlite"
    process, port = serve_process(tiny_word_model, "--history-db", str(path), "--history-flush-ms", "100")
    try:
        with NextWordClient(f"127.0.0.1:{port}", user="ivan") as ivan:
            ivan.learn("I like Zelda.")
        if how == signal.SIGKILL:
            time.sleep(0.5)  # a flush interval passes: at most that much may be lost
        os.kill(process.pid, how)
        process.wait(timeout=30)
    finally:
        process.kill()
        process.stdout.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        stored = db.execute("SELECT ngram FROM nextword_history WHERE user_id = 'ivan'").fetchall()
    assert ("Zelda",) in stored and len(stored) == 6  # I, like, Zelda, I like, like Zelda, I like Zelda


@pytest.mark.slow
def test_the_serving_line_names_the_history_file(tiny_word_model, tmp_path):
    path = tmp_path / "h.sqlite"
    command = [sys.executable, "-m", "service", "--model", tiny_word_model, "--port", "0", "--host", "127.0.0.1"]
    command += ["--no-metrics", "--workers", "1", "--history-db", str(path)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = process.stdout.readline()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.stdout.close()
    assert f"personal history in {path}" in line


def test_two_replicas_on_one_postgresql_share_a_users_history(tiny_word_model):
    from tests.postgres import postgres_server, required

    required()
    with postgres_server() as url:
        first, first_port, _ = start(tiny_word_model, history_db=url, history_flush_ms=20)
        second, second_port, _ = start(tiny_word_model, history_db=url, history_flush_ms=20)
        try:
            with NextWordClient(f"127.0.0.1:{second_port}", user="jo") as on_second:
                assert "Zelda" not in words(on_second.suggest("I like Ze"))  # read (and cached) before
                with NextWordClient(f"127.0.0.1:{first_port}", user="jo") as on_first:
                    on_first.learn("I like Zelda. I like Zelda. I like Zelda.")
                deadline = time.monotonic() + 10
                while "Zelda" not in words(on_second.suggest("I like Ze")):
                    assert time.monotonic() < deadline, "the other replica never saw the history"
                    time.sleep(0.2)
        finally:
            first.stop(0)
            second.stop(0)


def test_forget_takes_names_and_chinese_words_and_refuses_a_blank_word(served):
    port = served[0]
    with NextWordClient(f"127.0.0.1:{port}", user="kim") as kim:
        kim.learn("I met Zhang Wei. Zhang Wei cooks. 你好 你好")
        assert kim.forget("Zhang Wei").removed > 0
        assert kim.forget("你好").removed > 0
        lines = [json.loads(line)["ngram"] for line in kim.export_history()]
        assert not any(" ".join(g).find("Zhang Wei") >= 0 or "".join(g).find("你好") >= 0 for g in lines)
        assert ["met"] in lines  # the rest stays
        for blank in (" ", "", "...", "\t"):
            with pytest.raises(grpc.RpcError) as caught:
                kim.forget(blank)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "everything" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            kim.forget("word", everything=True)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert kim.forget(everything=True).removed > 0
        assert list(kim.export_history()) == []


def test_incognito_once_set_stays_set(served):
    port = served[0]
    with NextWordClient(f"127.0.0.1:{port}", user="lena") as lena:
        edits = [pb.TypeRequest(append="I like Quill. "), pb.TypeRequest(append="x", incognito=True)]
        edits += [pb.TypeRequest(delete=1), pb.TypeRequest(append="I like Zelda. ")]  # incognito not repeated
        list(lena.type(edits, timeout=60))
        learned = {unit for line in lena.export_history() for unit in json.loads(line)["ngram"]}
        assert "Quill" in learned  # before incognito
        assert "Zelda" not in learned  # after it, although the later edits did not say it again


def test_hostile_imports_get_precise_statuses_and_memory_stays_flat(tiny_word_model, tmp_path):
    server, port, _ = start(
        tiny_word_model, history_db=str(tmp_path / "h.sqlite"), import_idle_timeout=0.5, max_message_bytes=4 << 20
    )
    stub = NextWordClient(f"127.0.0.1:{port}", user="mia").stub
    metadata = (("x-nextword-user", "mia"),)

    def status(messages) -> grpc.StatusCode:
        try:
            stub.ImportHistory(iter(messages), timeout=60, metadata=metadata)
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    def rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    try:
        line = '{"ngram": ["%s"], "count": %s, "last_used": %s}\n'
        assert status([pb.HistoryChunk(lines=line % ("x" * 1_000_000, 1, 1))]) == grpc.StatusCode.INVALID_ARGUMENT
        assert status([pb.HistoryChunk(lines=line % ("ok", 1e300, 1))]) == grpc.StatusCode.INVALID_ARGUMENT
        assert status([pb.HistoryChunk(lines=line % ("ok", 1, 1e15))]) == grpc.StatusCode.INVALID_ARGUMENT
        before = rss()
        big = pb.HistoryChunk(lines=(line % ("o" * 60, 1, 1)) * 38_000)  # about 4 MB a message, 38,000 lines
        for _ in range(3):
            assert status([big] * 5) == grpc.StatusCode.RESOURCE_EXHAUSTED  # past 16 MiB in all
        assert rss() - before < 200 << 20, "memory grew with each refused import"

        def idle():
            yield pb.HistoryChunk(lines=line % ("ok", 1, 1))
            time.sleep(3)

        started = time.monotonic()
        assert status(idle()) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 2.5
        assert status([pb.HistoryChunk(lines=line % ("fine", 2, 1))]) == grpc.StatusCode.OK
    finally:
        server.stop(0)


def test_sigkill_during_continuous_learning_loses_at_most_one_flush_interval(tiny_word_model, tmp_path):
    """Learning goes on without pause until the kill; the database holds everything learned up to one flush
    interval (plus a write's own time) before it. Measured here: 0.19 s lost with --history-flush-ms 200."""
    path = tmp_path / "h.sqlite"
    flush_ms = 200
    process, port = serve_process(tiny_word_model, "--history-db", str(path), "--history-flush-ms", str(flush_ms))
    sent: list[tuple[float, str]] = []
    try:
        with NextWordClient(f"127.0.0.1:{port}", user="nina") as nina:
            started = time.monotonic()
            index = 0
            while time.monotonic() - started < 2.0:
                word = "q" + "".join(chr(97 + (index // 26**k) % 26) for k in range(4))  # letters: one unit
                nina.learn(word)
                sent.append((time.monotonic(), word))
                index += 1
            os.kill(process.pid, signal.SIGKILL)
            killed = time.monotonic()
        process.wait(timeout=30)
    finally:
        process.kill()
        process.stdout.close()
    with sqlite3.connect(path) as db:
        stored = {row[0] for row in db.execute("SELECT ngram FROM nextword_history WHERE user_id = 'nina'")}
    lost = [when for when, word in sent if word not in stored]
    assert len(sent) > 50
    window = (killed - min(lost)) if lost else 0.0
    bound = flush_ms / 1000 + 0.15  # one flush interval, and the time a write itself takes
    assert window <= bound, f"lost {len(lost)} of {len(sent)}: the last {window:.2f} s"
    assert all(word in stored for when, word in sent if when < killed - bound)


def test_an_ancient_import_is_refused_and_another_users_learning_persists_across_a_restart(tiny_word_model, tmp_path):
    path = str(tmp_path / "h.sqlite")
    server, port, _ = start(tiny_word_model, history_db=path, history_flush_ms=20)
    try:
        with NextWordClient(f"127.0.0.1:{port}", user="oleg") as oleg:
            with pytest.raises(grpc.RpcError) as caught:
                oleg.import_history(['{"ngram": ["ancient"], "count": 1, "last_used": -1e12}'])
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "last_used" in caught.value.details()
        with NextWordClient(f"127.0.0.1:{port}", user="pia") as pia:
            pia.learn("I met Zelda today")
    finally:
        server.stop(5)
    server, port, _ = start(tiny_word_model, history_db=path)
    try:
        with NextWordClient(f"127.0.0.1:{port}", user="pia") as pia:
            assert any('"Zelda"' in line for line in pia.export_history())
    finally:
        server.stop(0)


def test_a_postgresql_restart_under_load_keeps_every_call_answering(tiny_word_model):
    """Calls that name a user go on answering while the database is down (without the history, within a
    second each), and learning resumes once it is back."""
    from tests.postgres import postgres_control, required

    required()
    with postgres_control() as database:
        server, port, _ = start(tiny_word_model, history_db=database.url, history_flush_ms=50)
        stop, slowest, failures = threading.Event(), [0.0], []

        def load() -> None:
            with NextWordClient(f"127.0.0.1:{port}", user="quinn", timeout=10) as client:
                while not stop.is_set():
                    started = time.monotonic()
                    try:
                        client.suggest("I met Ze")
                        list(client.type([pb.TypeRequest(append="we met Zora. ")], timeout=10))
                    except grpc.RpcError as error:
                        failures.append(error.code())
                    slowest[0] = max(slowest[0], time.monotonic() - started)

        threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
        try:
            with NextWordClient(f"127.0.0.1:{port}", user="quinn") as quinn:
                quinn.learn("I met Zelda. I met Zelda.")
                for thread in threads:
                    thread.start()
                time.sleep(1.0)
                database.stop()
                time.sleep(3.0)  # the load goes on against a stopped database
                with pytest.raises(grpc.RpcError) as caught:
                    quinn.forget("Zelda")
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                database.start()
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    try:
                        if any('"Zora"' in line for line in quinn.export_history()):
                            break
                    except grpc.RpcError:
                        pass
                    time.sleep(0.2)
                assert any('"Zora"' in line for line in quinn.export_history()), "learning did not resume"
        finally:
            stop.set()
            for thread in threads:
                thread.join(15)
            server.stop(0)
        assert not failures, f"calls failed while the database was down: {failures[:5]}"
        assert slowest[0] < 2.0, f"a call took {slowest[0]:.2f} s"


def test_two_users_histories_never_mix_across_worker_processes(tiny_word_model, tmp_path):
    """With --workers 2, each call may land on either process, and each process keeps its own copy of the
    users it served: alice's words reach alice from both, and never bob."""
    from tests.e2e.test_server import serve_process
    from tests.e2e.test_workers import fresh_call

    process, port = serve_process(
        tiny_word_model, "--workers", "2", "--history-db", str(tmp_path / "h.sqlite"), "--history-flush-ms", "20"
    )
    try:
        plain = words(fresh_call(port, "I like Ze"))
        with NextWordClient(f"127.0.0.1:{port}", user="alice") as alice:
            alice.learn("I like Zelda. I like Zelda. I like Zelda.")
        options = [("grpc.use_local_subchannel_pool", 1)]  # a connection per call: both workers answer

        def suggest(user: str) -> list[str]:
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
                stub = pb_grpc.NextWordStub(channel)
                return words(stub.Suggest(pb.SuggestRequest(text="I like Ze"), metadata=[("x-nextword-user", user)]))

        # The worker that did not learn reads alice from the store: within REFRESH_SECONDS of the write, and a
        # first read slower than the read timeout answers without her history (both by design). Once both
        # workers hold her history (8 answers in a row), every answer must have it.
        deadline, in_a_row = time.monotonic() + 20, 0
        while in_a_row < 8 and time.monotonic() < deadline:
            in_a_row = in_a_row + 1 if suggest("alice")[:1] == ["Zelda"] else 0
            time.sleep(0.05 if in_a_row else 0.3)
        for _ in range(12):
            for user, expected in (("alice", "Zelda"), ("bob", None)):
                found = suggest(user)
                if expected is None:
                    assert found == plain
                else:
                    assert found[0] == expected
    finally:
        process.terminate()
        process.wait(30)
