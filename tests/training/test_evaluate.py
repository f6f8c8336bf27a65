"""Each evaluation metric and the n-gram baseline on tiny hand-made examples with known answers."""

from __future__ import annotations

import json
import math

import pytest

from service.model.personal_tokens import SERVED_WEIGHTS
from tests.conftest import TINY_EN, TINY_IME, run_cli
from tests.service.fakes import FakeModel, char_tokenizer, close, word_tokenizer
from training.ngram import NgramCounts, NgramStepModel
from training.scoring import Scorer, metrics, score
from training.tables import by_context, format_by_context, format_table, seen_context_length

A, B, C = 4, 5, 6  # ids of "a", "b", "c" after the four special tokens


def ngram_scorer(lines, tokenizer, order=3) -> Scorer:
    counts = NgramCounts.from_text(lines, tokenizer, order)
    return Scorer("ngram", NgramStepModel(counts, "kneser-ney"), NgramStepModel(counts, "backoff"))


# ---------------------------------------------------------------------------- the n-gram model


def test_kneser_ney_matches_a_hand_computed_bigram():
    counts = NgramCounts([[A, B], [A, B], [A, C]], order=2, vocab_size=7)
    # Bigram counts: <s>->a 3, a->b 2, a->c 1, b->EOS 2, c->EOS 1: n1 = 2, n2 = 2, so D2 = 2 / (2 + 4) = 1/3.
    # Continuation counts: a 1 (<s>), b 1 (a), c 1 (a), EOS 2 (b, c): total 5, n1 = 3, n2 = 1, D1 = 3/5.
    # Unigram: p1(b) = (1 - 0.6)/5 + 0.6 * 4/5 * 1/5 (uniform over the 5 tokens that can follow).
    p1_b = 0.4 / 5 + 0.6 * 4 / 5 / 5
    expected = (2 - 1 / 3) / 3 + (1 / 3) * 2 / 3 * p1_b
    assert close(counts.kneser_ney([A])[B], expected)
    assert close(counts.discounts[1], 1 / 3) and close(counts.discounts[0], 0.6)


@pytest.mark.parametrize("history", [[], [1], [1, A], [A, B], [C, C], [B, A, C]])
def test_kneser_ney_is_a_distribution_that_never_predicts_pad_or_bos(history):
    counts = NgramCounts([[A, B, C, A], [A, B], [C, A, B, B]], order=4, vocab_size=8)
    p = counts.kneser_ney(history)
    assert close(float(p.sum()), 1.0)
    assert p[0] == 0 and p[1] == 0 and (p[2:] > 0).all()


def test_backoff_ranks_by_the_longest_context_seen():
    counts = NgramCounts([[A, B], [A, B], [A, C], [C, C]], order=3, vocab_size=7)
    after_a = counts.backoff([A])
    assert after_a[B] > after_a[C] > after_a[A]  # seen after "a" beats backed-off
    assert close(after_a[B], 2 / 3 * 0.4)  # bigram relative frequency, one back-off from order 3
    assert close(counts.backoff([1, A])[B], 2 / 3)  # the trigram "<s> a b" was seen


def test_ngram_step_model_state_keeps_the_last_tokens():
    counts = NgramCounts([[A, B, C]], order=3, vocab_size=7)
    model = NgramStepModel(counts)
    import torch

    log_probs, state = model.advance(torch.tensor([[1, A]]), model.init_state(1))
    assert state[0, 0].tolist() == [1.0, float(A)]
    assert torch.allclose(log_probs[0].exp(), torch.tensor(counts.kneser_ney([1, A]), dtype=torch.float32))
    _, state = model.advance(torch.tensor([[B]]), state)
    assert state[0, 0].tolist() == [float(A), float(B)]


# ---------------------------------------------------------------------------- the metrics


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    tokenizer = word_tokenizer(["the", "cat", "sat"])
    model = FakeModel(tokenizer.vocab_size, lambda history: {t: 1.0 for t in range(tokenizer.vocab_size)})
    result = metrics(Scorer("uniform", model, model), tokenizer, ["the cat sat", "the cat"])
    assert close(result["perplexity"], tokenizer.vocab_size)
    tokens, characters = 4 + 3, 12 + 8  # </s> ends each line; a line break counts as a character
    assert close(result["bits_per_character"], tokens * math.log2(tokenizer.vocab_size) / characters)


def test_memorised_text_scores_every_word_and_saves_the_keys_it_should():
    tokenizer = word_tokenizer(["the", "cat", "sat"])
    result = metrics(ngram_scorer(["the cat sat"] * 3, tokenizer), tokenizer, ["the cat sat"])
    assert result["units"] == "words" and result["targets"] == 3
    assert result["top1"] == result["top3"] == result["top5"] == 1.0
    # Each word is taken before its first letter for one key: "the " and "cat " save 3 keys each
    # (three letters and the space, for one key), "sat" at the end of the line saves 2: 8 of 11.
    assert close(result["ksr"], 8 / 11)
    assert result["completion1_hit1"] == result["completion2_hit3"] == 1.0


def test_a_word_missing_from_the_vocabulary_is_never_suggested():
    tokenizer = word_tokenizer(["the", "cat", "sat"])
    scorer = ngram_scorer(["the cat sat"] * 3 + ["sat"], tokenizer)
    result = metrics(scorer, tokenizer, ["the dog sat"])
    assert close(result["top1"], 2 / 3) and close(result["top5"], 2 / 3)  # "dog" is <unk>
    assert close(result["unknown_token_rate"], 1 / 3)
    assert close(result["completion1_hit3"], 2 / 3)  # nor completed from "d"
    # "the " is taken before its first letter (3 keys saved); "dog " is typed (4 keys); after the
    # unseen "<unk>" the baseline backs off to the unigram, where "sat" is first: 2 keys saved.
    assert close(result["ksr"], 5 / 11)


def test_completion_hits_and_ksr_depend_on_the_letters_typed_and_the_suggestions_shown():
    # After "the", the model prefers "cat" (0.6), then "car" (0.3), then "cow" (0.1).
    tokenizer = word_tokenizer(["the", "cat", "car", "cow"])
    the, cat, car, cow = 4, 5, 6, 7

    def table(history):
        return {cat: 0.6, car: 0.3, cow: 0.1} if history[-1:] == (the,) else {the: 1.0}

    model = FakeModel(tokenizer.vocab_size, table)
    result = metrics(Scorer("fake", model, model), tokenizer, ["the car"], ksr_suggestions=3)
    assert result["targets"] == 2
    assert result["top1"] == 0.5 and result["top3"] == 1.0  # "car" is second after "the"
    assert result["completion1_hit1"] == 0.5  # "c" -> cat, car, cow
    assert result["completion2_hit1"] == 0.5 and result["completion2_hit3"] == 1.0
    assert result["completion3_hit1"] is None  # no word is longer than 3 letters
    assert close(result["ksr"], 5 / 7)  # "the " saves 3, "car" 2
    one = metrics(Scorer("fake", model, model), tokenizer, ["the car"], ksr_suggestions=1)
    assert close(one["ksr"], 3 / 7)  # with one suggestion "car" is never shown


def test_text_without_spaces_is_scored_by_character_and_phrase():
    tokenizer = char_tokenizer("我昨天去了")
    result = metrics(ngram_scorer(["我昨天去了"] * 3, tokenizer), tokenizer, ["我昨天去了"])
    assert result["units"] == "characters" and result["targets"] == 5
    assert result["top1"] == 1.0
    assert result["completion1_hit1"] is None
    # The phrase 我昨天去 (four characters, the longest) is taken for one key, then 了: 2 keys for 5.
    assert close(result["ksr"], 1 - 2 / 5)
    counts = NgramCounts.from_text(["我昨天去了"], tokenizer, 3)
    _, tally = score(ngram_scorer(["我昨天去了"] * 3, tokenizer), tokenizer, ["他", "我昨天去了"])
    assert tally.context_ends == [(0, 0), (1, 0), (1, 1), (1, 2), (1, 3), (1, 4)]  # before each character
    rows = by_context(["他", "我昨天去了"], tally.context_ends, {"ngram": tally.first_hits}, tokenizer, counts)
    assert [(r["context_tokens"], r["targets"]) for r in rows] == [(1, 2), (2, 4)]  # <s>; then two tokens


def test_top1_by_the_context_seen_in_training():
    tokenizer = word_tokenizer(["the", "cat", "sat", "dog", "ran"])
    counts = NgramCounts.from_text(["the cat sat"], tokenizer, 4)
    # Tokens before the target, <s> included, that end a run the training line contains (at most 3).
    assert seen_context_length("", tokenizer, counts) == 1  # <s>
    assert seen_context_length("the", tokenizer, counts) == 2  # <s> the
    assert seen_context_length("the cat", tokenizer, counts) == 3  # <s> the cat
    assert seen_context_length("dog the cat", tokenizer, counts) == 2  # the cat, not dog the cat
    assert seen_context_length("the dog", tokenizer, counts) == 0  # "dog" never came before anything
    # Per target, for the text "the cat ran": an n-gram that recalls "cat" after "the" and nothing
    # after "the cat", and a model that is right only on "ran".
    ngram = ngram_scorer(["the cat sat"], tokenizer, order=4)
    units, tally = score(ngram, tokenizer, ["the cat ran"])
    assert tally.context_ends == [(0, 0), (0, 3), (0, 7)] and tally.first_hits == [True, True, False]
    rows = by_context(
        ["the cat ran"],
        tally.context_ends,
        {"model": [False, False, True], "ngram": tally.first_hits},
        tokenizer,
        counts,
    )
    assert [(r["context_tokens"], r["targets"]) for r in rows] == [(1, 1), (2, 1), (3, 1)]
    assert [r["model"] for r in rows] == [0.0, 0.0, 1.0] and [r["ngram"] for r in rows] == [1.0, 1.0, 0.0]
    assert [r["either"] for r in rows] == [1.0, 1.0, 1.0] and close(sum(r["share"] for r in rows), 1.0)
    table = format_by_context(rows, ["model", "ngram"], 4).splitlines()
    assert table[-2].startswith("3 tokens (all)")
    assert table[-1].split() == ["all", "100.0", "%", "33.3", "%", "66.7", "%", "100.0", "%"]


def test_format_table_shows_ratios_and_differences():
    table = format_table({"model": {"perplexity": 40.0, "top1": 0.36}, "ngram-4": {"perplexity": 50.0, "top1": 0.3}})
    lines = table.splitlines()
    assert "0.80x" in next(line for line in lines if line.startswith("perplexity"))
    assert "+6.0 pts" in next(line for line in lines if line.startswith("top-1"))
    three = format_table({"model": {"top1": 0.36}, "ngram-4": {"top1": 0.3}, "network": {"top1": 0.33}})
    assert "model / ngram-4" in three.splitlines()[0]
    assert "1.20x" in next(line for line in three.splitlines() if line.startswith("top-1"))


# ---------------------------------------------------------------------------- the command


@pytest.mark.slow
def test_command_reports_model_and_baseline_as_table_and_json(tiny_word_model, tmp_path):
    out = tmp_path / "eval.json"
    result = run_cli(
        "training.evaluate",
        tiny_word_model,
        "--text",
        TINY_EN,
        "--max-lines",
        "20",
        "--baseline",
        "ngram",
        "--train",
        TINY_EN,
        "--order",
        "3",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "top-1 accuracy" in result.stdout and "ngram-3" in result.stdout
    document = json.loads(out.read_text())
    assert document["lines"] == 20
    assert set(document["results"]) == {"model", "ngram-3", "network"}  # the mix, the baseline, the network alone
    for name in ("model", "ngram-3", "network"):
        metrics = document["results"][name]
        assert metrics["perplexity"] > 1 and 0 <= metrics["top1"] <= metrics["top3"] <= metrics["top5"] <= 1
        assert 0 <= metrics["ksr"] < 1
    assert "top-1 by the longest context" in result.stdout and "either top-1" in result.stdout
    rows = document["by_context"]
    assert sum(r["targets"] for r in rows) == document["results"]["model"]["targets"]
    overall = sum(r["ngram-3"] * r["targets"] for r in rows) / sum(r["targets"] for r in rows)
    assert close(overall, document["results"]["ngram-3"]["top1"])
    assert all(max(r["model"], r["ngram-3"]) <= r["either"] <= r["model"] + r["ngram-3"] for r in rows)


def test_learning_helps_a_user_who_repeats_a_name_the_model_never_saw(tiny_word_model, tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("".join(f"I like Zelda {when}.\n" for when in ("today", "at night", "after work") * 4))
    out = tmp_path / "eval.json"
    result = run_cli("training.evaluate", tiny_word_model, "--text", str(text), "--learn", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "learning each line after it is typed" in result.stdout
    document = json.loads(out.read_text())
    learned, without = document["learning"], document["results"]["model"]
    assert learned["perplexity"] < without["perplexity"]  # the history is part of the distribution
    assert learned["top1"] > without["top1"] and learned["ksr"] > without["ksr"]
    assert learned["history_weights"] == str(SERVED_WEIGHTS)


def test_the_ngram_baseline_ranks_by_its_own_kneser_ney_unless_told_otherwise(tiny_word_model):
    from service.model.artifact import load_artifact
    from training.evaluate import Inputs, parse_args, scorers
    from training.ngram import NgramCounts

    artifact = load_artifact(tiny_word_model)
    counts = NgramCounts.from_text(["he cook coffee"], artifact.tokenizer, 3)
    inputs = Inputs(artifact, None, ["he cook"], ["he cook coffee"], [])
    for flags, ranking in (([], "kneser-ney"), (["--ranking", "backoff"], "backoff")):
        config = parse_args([tiny_word_model, "--text", TINY_EN, "--baseline", "ngram", "--train", TINY_EN, *flags])
        baseline = next(scorer for scorer, _ in scorers(config, inputs, counts) if scorer.name.startswith("ngram"))
        assert baseline.probabilities.scoring == "kneser-ney" and baseline.ranking.scoring == ranking


def test_fitting_on_the_first_lines_scores_the_rest_and_every_nth(tiny_word_model, tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("".join(f"I like Zelda {when}.\n" for when in ("today", "at night", "after work") * 40))
    out = tmp_path / "eval.json"
    flags = ["--text", str(text), "--learn", "--fit-lines", "108", "--score-every", "3", "--json", str(out)]
    result = run_cli("training.evaluate", tiny_word_model, *flags)
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    assert document["lines"] == 12 and document["scored_lines"] == 4
    assert "fitted on the first 108 lines typed" in result.stdout
    assert document["learning"]["history_weights"] != str(SERVED_WEIGHTS)
    online = run_cli("training.evaluate", tiny_word_model, *flags, "--learn-rule", "online")
    assert online.returncode == 0, online.stderr
    document = json.loads(out.read_text())
    fitted, own = document["learning"], document["learning_online"]
    assert "learning, online weights" in online.stdout
    assert own["history_weights"] != fitted["history_weights"]  # the user's typing moved them from the fitted ones
    assert own["perplexity"] <= fitted["perplexity"] * 1.01  # a user who repeats themselves: more weight, not less
    unigrams = run_cli("training.evaluate", tiny_word_model, *flags, "--history-order", "1")
    assert unigrams.returncode == 0, unigrams.stderr
    alone = json.loads(out.read_text())["learning"]  # how often each word was typed, not after what
    assert alone["perplexity"] > fitted["perplexity"]
    refused = run_cli("training.evaluate", tiny_word_model, "--text", str(text), "--fit-lines", "6")
    assert refused.returncode == 2 and "go with --learn" in refused.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--text", "/nonexistent.txt"], "corpus file not found: /nonexistent.txt"),
        (["--text", TINY_EN, "--baseline", "ngram"], "--baseline ngram needs --train"),
        (["--text", TINY_EN, "--order", "7"], "7 is out of range"),
        (["--text", TINY_EN, "--learn", "--history-weights", "0.5"], "rows of 5 weights"),
    ],
)
def test_command_bad_input_is_one_line(tiny_word_model, args, message):
    result = run_cli("training.evaluate", tiny_word_model, *args)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_command_damaged_model_is_one_line(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    result = run_cli("training.evaluate", str(bad), "--text", TINY_EN)
    assert result.returncode == 2 and "not a nextword model file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_command_against_another_model_scores_both_by_the_same_code(tiny_word_model, tmp_path):
    out = tmp_path / "eval.json"
    result = run_cli(
        "training.evaluate",
        tiny_word_model,
        "--text",
        TINY_EN,
        "--max-lines",
        "10",
        "--against",
        tiny_word_model,
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())["results"]
    for key in ("perplexity", "top1", "top3", "ksr", "completion1_hit1"):
        assert results["model"][key] == results["against"][key]
    assert "1.00x" in next(line for line in result.stdout.splitlines() if line.startswith("perplexity"))


@pytest.mark.slow
def test_command_baseline_and_against_are_exclusive(tiny_word_model):
    result = run_cli(
        "training.evaluate",
        tiny_word_model,
        "--text",
        TINY_EN,
        "--against",
        tiny_word_model,
        "--baseline",
        "ngram",
        "--train",
        TINY_EN,
    )
    assert result.returncode == 2 and "exclusive" in result.stderr


def test_typing_pinyin_counts_letters_and_a_key_per_candidate_taken():
    from service.model.pinyin import Candidate
    from training.pinyin_eval import edit_distance, typed_keys

    def convert(context, pinyin, count):  # knows 你好 once "nih" is typed, and 世界 only in full
        if context.endswith("你好") and pinyin == "shijie":
            return [Candidate("世界", 6, ("shi", "jie"), 1.0)]
        if pinyin.startswith("nih") and not context:
            return [Candidate("你好世界" if pinyin == "nihaoshijie" else "你好", len(pinyin), (), 1.0)]
        return []

    # 你好: 3 letters and a selection; then 世界: all 6 letters and a selection
    assert typed_keys(convert, "", "你好", ["ni", "hao"]) == 4
    assert typed_keys(lambda c, p, n: [], "", "你好", ["ni", "hao"]) == 5 + 2  # never offered: typed in full
    assert edit_distance("西安", "先") == 2 and edit_distance("你好", "你好") == 0


def test_command_pinyin_compares_the_four_rankers(tiny_ime_model, tmp_path):
    out = tmp_path / "pinyin.json"
    result = run_cli(
        "training.evaluate",
        tiny_ime_model,
        "--text",
        TINY_IME,
        "--pinyin",
        "--baseline",
        "ngram",
        "--train",
        TINY_IME,
        "--max-lines",
        "30",
        "--typing-clauses",
        "3",
        "--initials-words",
        "10",
        "--association-words",
        "10",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "character accuracy" in result.stdout and "initials top-5" in result.stdout
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["prior", "ngram", "network", "mix"]
    assert results["mix"]["character_accuracy"] > results["prior"]["character_accuracy"]  # it learned the text
    assert results["prior"]["next_word_top1"] is None and results["mix"]["next_word_top1"] is not None


def test_pinyin_with_learning_types_with_fixed_and_with_online_weights(tiny_ime_model, tmp_path):
    out = tmp_path / "pinyin.json"
    flags = ["--text", TINY_IME, "--pinyin", "--learn", "--learn-rule", "online", "--fit-lines", "10"]
    flags += ["--max-lines", "40", "--typing-clauses", "2", "--initials-words", "5", "--association-words", "5"]
    result = run_cli("training.evaluate", tiny_ime_model, *flags, "--rankers", "mix", "--json", str(out))
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["mix", "mix, learning", "mix, learning online"]
    fixed, online = results["mix, learning"], results["mix, learning online"]
    assert online["history_weights"] != fixed["history_weights"]  # each typed line moved the user's weights


def test_command_pinyin_refuses_an_english_model(tiny_word_model):
    result = run_cli("training.evaluate", tiny_word_model, "--text", TINY_EN, "--pinyin")
    assert result.returncode == 2 and "does not read Chinese" in result.stderr
