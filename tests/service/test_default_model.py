"""models/default.pt answers the README's examples as the README shows them."""

import os
import re

import pytest

from service.api.config import ServerConfig
from service.model.engine import Engine
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def engine():
    return Engine.load(ServerConfig(model=(os.path.join(ROOT, "models", "default.pt"),), history_db="off"))


def test_the_readme_examples_are_what_the_default_model_answers(engine):
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    shown = re.findall(r'"([^"]+)" → ([\w, ]+?)[;.]', readme.split("## The default model")[1].split("##")[0])
    assert len(shown) == 3
    for text, answers in shown:
        expected = [word.strip() for word in answers.split(",")]
        assert [word for word, _ in engine.suggester.suggest(text, 3).suggestions] == expected, text


def test_light_follows_let_there_be_and_the_memory_is_order_eight_and_small(engine):
    assert "light" in [word for word, _ in engine.suggester.suggest("And God said, Let there be ", 3).suggestions]
    assert engine.artifact.manifest.memory.order == 8
    assert os.path.getsize(engine.path) < 32e6
