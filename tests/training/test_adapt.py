"""The adaptation benchmark (scripts/recipes.sh adapt) end to end on the tiny corpora: models trained on one
part, the other typed by a learning user, tables against the rule served before and the n-gram."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import DATA, ROOT, TINY_NET

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    corpora = root / "corpora"
    (corpora / "kjv").mkdir(parents=True)
    (corpora / "zh-fortunes").mkdir()
    english = open(os.path.join(DATA, "tiny_en.txt"), encoding="utf-8").read()
    (corpora / "kjv" / "kjv.txt").write_text(english, encoding="utf-8")
    rest = open(os.path.join(DATA, "tiny_zh.txt"), encoding="utf-8").read().splitlines()
    sayings = open(os.path.join(DATA, "tiny_ime.txt"), encoding="utf-8").read().splitlines()
    lines = rest[:100] + [line + "《谚语》" for line in sayings] + rest[100:]  # the typed part amid the rest
    (corpora / "zh-fortunes" / "zh-fortunes.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    env = {
        **os.environ,
        "VENV": os.path.dirname(os.path.dirname(sys.executable)),  # the environment running the tests
        "ADAPT_OUT": str(root / "out"),
        "ADAPT_KJV_AT": "161",  # the last 60 lines are typed
        "ADAPT_TRAIN": " ".join([*TINY_NET, "--epochs", "3", "--max-steps", "60", "--eval-every", "30"]),
        "ADAPT_EVAL": "--quiet --score-every 1 --typing-clauses 5 --initials-words 10 --association-words 20",
    }
    done = subprocess.run(
        ["bash", "scripts/recipes.sh", "adapt", str(corpora)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "out"


def test_the_typed_part_is_scored_with_and_without_learning_beside_the_old_rule_and_the_ngram(adapted):
    table = (adapted / "kjv-nt.txt").read_text(encoding="utf-8")
    assert "learning, re-ranked" in table and "learning, online weights" in table and "ngram-5" in table
    assert "fitted on the first 6 lines typed" in table  # 10 % of the 60 typed lines
    document = json.loads((adapted / "kjv-nt.json").read_text(encoding="utf-8"))
    assert document["lines"] == 54  # scored: the typed lines after those the weights were fitted on
    learned, without = document["learning"], document["results"]["model"]
    # the typed lines repeat what the user typed before them: learning pays, and perplexity shows it
    assert learned["top1"] > without["top1"]
    assert learned["perplexity"] < without["perplexity"]
    assert document["learning_reranked"]["perplexity"] == pytest.approx(without["perplexity"])
    assert document["learning_online"]["top1"] > without["top1"]  # the weights as served: fitted as the user types
    same = json.loads((adapted / "kjv-ot.json").read_text(encoding="utf-8"))
    assert same["learning"]["history_weights"] == learned["history_weights"]  # the weights fitted on the typed part


def test_chinese_types_the_proverbs_without_their_tag_and_converts_them(adapted):
    typed = (adapted / "zh-split" / "test.txt").read_text(encoding="utf-8").splitlines()
    assert len(typed) == 73 and not any("《谚语》" in line for line in typed)
    assert "《谚语》" not in (adapted / "zh-rest" / "train.txt").read_text(encoding="utf-8")
    pinyin = json.loads((adapted / "zh-proverbs-pinyin.json").read_text(encoding="utf-8"))
    assert {"prior", "ngram", "network", "mix", "mix, learning"} <= set(pinyin["results"])
    learned, without = pinyin["results"]["mix, learning"], pinyin["results"]["mix"]
    assert learned["character_accuracy"] >= without["character_accuracy"]
    assert (adapted / "zh-proverbs.txt").read_text(encoding="utf-8").count("learning") >= 2
