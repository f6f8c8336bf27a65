"""Shared fixtures: tiny corpora committed under tests/data, and tiny trained runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

DATA = os.path.join(os.path.dirname(__file__), "data")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_EN = os.path.join(DATA, "tiny_en.txt")
TINY_ZH = os.path.join(DATA, "tiny_zh.txt")
TINY_IME = os.path.join(DATA, "tiny_ime.txt")  # everyday sentences for the pinyin and association tests
# A tiny network that trains in seconds on the tiny corpora.
TINY_NET = [
    "--hidden-size",
    "32",
    "--num-layers",
    "1",
    "--batch-size",
    "8",
    "--bptt",
    "16",
    "--warmup-steps",
    "5",
    "--dropout",
    "0.0",
]


def run_cli(module: str, *args: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` as a user would; returns the finished process."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def train_tiny(out: str, corpus: str = TINY_EN, *extra: str) -> str:
    from training.train import main

    code = main(["--corpus", corpus, "--out", out, *TINY_NET, *extra])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def tiny_word_run(tmp_path_factory) -> str:
    return train_tiny(
        str(tmp_path_factory.mktemp("word")),
        TINY_EN,
        "--tokenizer",
        "word",
        "--lowercase",
        "--max-steps",
        "150",
        "--lr",
        "1e-2",
        "--hidden-size",
        "48",
    )


@pytest.fixture(scope="session")
def tiny_char_run(tmp_path_factory) -> str:
    return train_tiny(
        str(tmp_path_factory.mktemp("char")),
        TINY_EN,
        "--tokenizer",
        "char",
        "--lowercase",
        "--max-steps",
        "250",
        "--lr",
        "1e-2",
        "--hidden-size",
        "64",
        "--bptt",
        "32",
    )


@pytest.fixture(scope="session")
def tiny_zh_run(tmp_path_factory) -> str:
    return train_tiny(
        str(tmp_path_factory.mktemp("zh")),
        TINY_ZH,
        "--tokenizer",
        "char",
        "--max-steps",
        "200",
        "--lr",
        "1e-2",
        "--hidden-size",
        "48",
    )


def tiny_ime(tmp_path_factory, tokenizer: str) -> str:
    """A model of tests/data/tiny_ime.txt (他在西安, 你先走, 你好, 我昨天, 上学迟到, ...)."""
    run = train_tiny(
        str(tmp_path_factory.mktemp("ime")),
        TINY_IME,
        "--tokenizer",
        tokenizer,
        "--max-steps",
        "300",
        "--lr",
        "1e-2",
        "--hidden-size",
        "64",
        "--val-fraction",
        "0.05",
        "--epochs",
        "40",
    )
    return export_run(run, str(tmp_path_factory.mktemp("models") / "zh.pt"))


@pytest.fixture(scope="session")
def tiny_ime_model(tmp_path_factory) -> str:
    return tiny_ime(tmp_path_factory, "char")


@pytest.fixture(scope="session")
def tiny_ime_word_model(tmp_path_factory) -> str:
    return tiny_ime(tmp_path_factory, "jieba")


def export_run(run: str, path: str) -> str:
    """The shared fixtures' files: the linear mix, named, so that each export skips comparing the rules
    (tests/training/test_memory_export.py tests that comparison)."""
    from training.export import export

    export(run, path, mix_rule="linear")
    return path


@pytest.fixture(scope="session")
def tiny_char_model(tiny_char_run, tmp_path_factory) -> str:
    return export_run(tiny_char_run, str(tmp_path_factory.mktemp("models") / "char.pt"))


@pytest.fixture(scope="session")
def tiny_word_model(tiny_word_run, tmp_path_factory) -> str:
    return export_run(tiny_word_run, str(tmp_path_factory.mktemp("models") / "word.pt"))


@pytest.fixture(scope="session")
def tiny_zh_model(tiny_zh_run, tmp_path_factory) -> str:
    return export_run(tiny_zh_run, str(tmp_path_factory.mktemp("models") / "zh.pt"))


# A test is slow when it needs a trained model (the fixtures above train one per session), or lives
# where every test starts a server or processes. Tests that start a command are marked where they
# are written. `pytest -m "not slow"` (make test-fast) leaves them all out.
TRAINED_FIXTURES = {
    "tiny_word_run",
    "tiny_char_run",
    "tiny_zh_run",
    "tiny_word_model",
    "tiny_char_model",
    "tiny_zh_model",
}
SLOW_MODULES = ("tests/e2e/", "tests/training/test_distributed.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = os.path.relpath(str(item.path), ROOT)
        if path.startswith(SLOW_MODULES) or TRAINED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
