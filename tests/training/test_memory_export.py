"""The n-gram memory and written forms in exported files, served and scored as the mix."""

import json
import re

import pytest

from service.client import NextWordClient
from service.model.artifact import ArtifactError, load_artifact
from tests.conftest import run_cli
from tests.e2e.test_server import start
from tests.training.test_export import rewrite
from training.export import export, written_forms
from training.vocabulary import build_tokenizer

pytestmark = pytest.mark.slow


def test_export_stores_the_memory_and_fits_weights_on_validation(tiny_word_run, tmp_path):
    manifest = export(tiny_word_run, str(tmp_path / "m.pt"))
    spec = manifest.memory
    assert spec.order == 5 and spec.entries > 0 and len(spec.weights) == 5
    assert all(0.0 <= w <= 1.0 for w in spec.weights) and "validation lines" in spec.fitted_on
    artifact = load_artifact(str(tmp_path / "m.pt"))
    assert artifact.memory.entries() == spec.entries and artifact.memory.order == 5
    assert spec.rule in ("linear", "log-linear") and spec.fitted_on.endswith(f"served: {spec.rule}")
    assert "at random" in spec.fitted_on and "points, 95 %" in spec.fitted_on  # the sample and its confidence


def test_the_rule_is_chosen_on_a_bounded_sample_of_the_validation_lines():
    from training.mix_fit import rule_sample

    lines = [f"line {i} has five words" for i in range(10_000)]
    sample = rule_sample(lines, 3000)
    assert len(sample) == 600 and len(set(sample)) == 600  # 3,000 words' worth, each line once
    assert sample == rule_sample(lines, 3000)  # the same every time (seed 0)
    assert sample[:5] != lines[:5]  # at random, not the first lines
    assert len(rule_sample(["我们去西安" * 2] * 50, 100)) == 10  # text without spaces: characters
    assert len(rule_sample(lines[:3], 3000)) == 3  # fewer lines than that: all of them


def test_export_shows_each_stage_when_its_output_is_a_log(tiny_word_run, tmp_path):
    done = run_cli("training.export", tiny_word_run, "--out", str(tmp_path / "m.pt"))
    assert done.returncode == 0, done.stderr
    stages = (
        "memory (n-grams of the training lines)",
        "EM fit of the mixing weights",
        "rule choice (each rule served)",
    )
    for stage in stages:
        assert f"{stage}: " in done.stderr and re.search(re.escape(stage) + r": done in \d+ s", done.stderr)
    quiet = run_cli("training.export", tiny_word_run, "--out", str(tmp_path / "q.pt"), "--quiet")
    assert quiet.returncode == 0 and "done in" not in quiet.stderr


def test_export_keeps_the_rule_that_ranks_the_validation_lines_better(tiny_word_run, monkeypatch, tmp_path):
    from training import export as export_module
    from training.mix_fit import RuleScore

    for better in ("linear", "log-linear"):
        scores = {"linear": RuleScore(20.0, 0.30, 0.5), "log-linear": RuleScore(19.0, 0.30, 0.5)}
        scores[better] = RuleScore(25.0, 0.31, 0.4)  # its first suggestion is right more often
        monkeypatch.setattr(export_module, "score_rules", lambda *args, scores=scores, **kwargs: scores)
        manifest = export(tiny_word_run, str(tmp_path / f"{better}.pt"))
        assert manifest.memory.rule == better
        assert load_artifact(str(tmp_path / f"{better}.pt")).manifest.memory.rule == better
    tie = {"linear": RuleScore(20.0, 0.3, 0.5), "log-linear": RuleScore(19.0, 0.3, 0.6)}
    monkeypatch.setattr(export_module, "score_rules", lambda *args, **kwargs: tie)
    assert export(tiny_word_run, str(tmp_path / "tie.pt")).memory.rule == "linear"


def test_a_named_mixing_rule_is_exported_without_scoring_both(tiny_word_run, monkeypatch, tmp_path):
    from training import export as export_module

    monkeypatch.setattr(export_module, "score_rules", lambda *args, **kwargs: pytest.fail("scored the rules"))
    for rule in ("linear", "log-linear"):
        spec = export(tiny_word_run, str(tmp_path / f"{rule}.pt"), mix_rule=rule).memory
        assert spec.rule == rule and spec.fitted_on.endswith(f"served: {rule}")


def test_a_damaged_memory_is_refused_with_one_line(tiny_word_run, tmp_path):
    export(tiny_word_run, str(tmp_path / "m.pt"))

    def flip_memory(name, data):
        return data[:-40] + bytes([data[-40] ^ 0xFF]) + data[-39:] if name.endswith("extra/memory.npz") else data

    rewrite(str(tmp_path / "m.pt"), tmp_path / "bad.pt", flip_memory)
    with pytest.raises(ArtifactError, match="damaged model file: .*the n-gram memory's checksum does not match"):
        load_artifact(str(tmp_path / "bad.pt"))
    result = run_cli("service", "--model", str(tmp_path / "bad.pt"), "--port", "0")
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(
        "nextword-serve: error: damaged model file:"
    )


def test_served_with_the_mix_and_without_and_info_says_which(tiny_word_run, tmp_path):
    path = str(tmp_path / "m.pt")
    export(tiny_word_run, path)
    answers = {}
    for ngram in (True, False):
        server, port, engine = start(path, ngram=ngram)
        try:
            with NextWordClient(f"127.0.0.1:{port}") as client:
                info = client.info()
                answers[ngram] = [(s.text, s.probability) for s in client.suggest("the old ", 5).suggestions]
                expected = engine.suggester.suggest("the old ", 5).suggestions
                assert [text for text, _ in answers[ngram]] == [text for text, _ in expected]
        finally:
            server.stop(0)
        assert list(info.components) == (["network", "ngram-memory"] if ngram else ["network"])
        assert (len(info.ngram_weights), info.ngram_order) == ((5, 5) if ngram else (0, 0))
        assert info.ngram_mix == (load_artifact(path).manifest.memory.rule if ngram else "")
    assert answers[True] != answers[False]


def test_a_file_from_before_the_memory_serves_as_the_network_alone(tiny_word_run, tmp_path):
    export(tiny_word_run, str(tmp_path / "plain.pt"), ngram_order=0)

    def as_before(name, data):  # the manifest and tokenizer of files exported before memories and written forms
        if name.endswith("extra/manifest.json"):
            manifest = json.loads(data)
            manifest["provenance"]["validation_perplexity"] = manifest["provenance"].pop("stream_validation_perplexity")
            return json.dumps(manifest).encode()
        return data

    rewrite(str(tmp_path / "plain.pt"), tmp_path / "old.pt", as_before)
    artifact = load_artifact(str(tmp_path / "old.pt"))
    assert artifact.memory is None and artifact.manifest.memory is None
    assert artifact.manifest.provenance.stream_validation_perplexity > 1
    server, port, engine = start(str(tmp_path / "old.pt"))
    try:
        assert not engine.mixed
        with NextWordClient(f"127.0.0.1:{port}") as client:
            assert list(client.info().components) == ["network"] and client.suggest("the old ").suggestions
    finally:
        server.stop(0)


def test_words_are_shown_as_written_and_completed_regardless_of_case():
    lines = ["Moses went up", "and Moses said", "the LORD spake unto Moses", "the lord of the mountain"]
    tokenizer = build_tokenizer("word", lines, lowercase=True)
    written = written_forms(tokenizer, lines)
    tokenizer.written = written
    assert written[tokenizer.index["moses"]] == "Moses" and written[tokenizer.index["lord"]] in ("LORD", "lord")
    from service.model.suggest import Suggester
    from tests.service.fakes import FakeModel

    moses = tokenizer.index["moses"]
    suggester = Suggester(FakeModel(tokenizer.vocab_size, lambda history: {moses: 0.9}), tokenizer)
    for typed in ("unto mo", "unto Mo", "unto MO"):
        assert suggester.suggest(typed, 1).suggestions[0][0] == "Moses"
    assert suggester.suggest("unto ", 1).suggestions[0][0] == "Moses"


def test_the_evaluation_scores_the_mix_and_the_network_alone(tiny_word_run, tmp_path):
    from tests.conftest import TINY_EN

    path = str(tmp_path / "m.pt")
    export(tiny_word_run, path)
    mixed = run_cli("training.evaluate", path, "--text", TINY_EN, "--max-lines", "30", "--json", "-")
    alone = run_cli("training.evaluate", path, "--text", TINY_EN, "--max-lines", "30", "--json", "-", "--no-ngram")
    assert mixed.returncode == 0 and alone.returncode == 0, mixed.stderr + alone.stderr

    def perplexity(result):
        return json.loads(result.stdout[result.stdout.index("{") :])["results"]["model"]["perplexity"]

    assert perplexity(mixed) != perplexity(alone)


def test_a_file_whose_mixing_rule_this_nextword_lacks_is_refused_with_one_line(tiny_word_run, tmp_path):
    export(tiny_word_run, str(tmp_path / "m.pt"))

    def other_rule(name, data):
        if name.endswith("extra/manifest.json"):
            manifest = json.loads(data)
            manifest["memory"]["rule"] = "geometric"
            return json.dumps(manifest).encode()
        return data

    rewrite(str(tmp_path / "m.pt"), tmp_path / "other.pt", other_rule)
    with pytest.raises(ArtifactError, match=r"by the rule 'geometric', which this nextword does not serve"):
        load_artifact(str(tmp_path / "other.pt"))
