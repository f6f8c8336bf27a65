import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT, TINY_EN, TINY_NET, TINY_ZH, run_cli, train_tiny
from training.checkpoint import BEST, LAST, load_checkpoint


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def test_loss_falls_and_outputs_are_written(tiny_word_run):
    records = metrics(tiny_word_run)
    train = [r for r in records if r["kind"] == "train"]
    assert train[-1]["loss"] < 0.6 * train[0]["loss"]
    assert any(r["kind"] == "val" for r in records)
    assert all(r["tokens_per_s"] > 0 for r in train)
    for name in (LAST, BEST, "config.json", "curves.png"):
        assert os.path.getsize(os.path.join(tiny_word_run, name)) > 0
    config = json.load(open(os.path.join(tiny_word_run, "config.json")))
    assert config["train"]["tokenizer"] == "word" and config["model"]["hidden_size"] == 48


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer", ["char", "word", "sentencepiece"])
@pytest.mark.parametrize("cell,input", [("lstm", "embedding"), ("gru", "onehot"), ("rnn", "embedding")])
def test_every_tokenizer_and_cell_trains(tmp_path, tokenizer, cell, input):
    out = train_tiny(
        str(tmp_path),
        TINY_ZH if tokenizer == "sentencepiece" else TINY_EN,
        "--tokenizer",
        tokenizer,
        "--cell",
        cell,
        "--input",
        input,
        "--max-steps",
        "4",
        "--vocab-size",
        "150",
    )
    checkpoint = load_checkpoint(out)
    assert checkpoint["step"] == 4
    assert checkpoint["model_config"]["cell"] == cell and checkpoint["model_config"]["input"] == input


class StopAfter:
    """Stands in for the Ctrl-C flag: asks the loop to stop after ``steps`` steps."""

    def __init__(self, steps):
        self.steps, self.reads = steps, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    @property
    def signal(self):
        self.reads += 1  # read once before each step
        return signal.SIGINT if self.reads > self.steps else None


@pytest.mark.slow
def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path, monkeypatch):
    import training.train as train_module

    common = ["--tokenizer", "char", "--dropout", "0.3", "--weight-drop", "0.3", "--max-steps", "40"]
    straight = train_tiny(str(tmp_path / "a"), TINY_EN, *common)
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "StopFlag", lambda: StopAfter(23))
        interrupted = str(tmp_path / "b")
        assert train_module.main(["--corpus", TINY_EN, "--out", interrupted, *TINY_NET, *common]) == 130
    assert load_checkpoint(interrupted)["step"] == 23
    assert train_module.main(["--resume", interrupted]) == 0
    a, b = load_checkpoint(straight), load_checkpoint(interrupted)
    assert a["step"] == b["step"] == 40
    assert (a["epoch"], a["window"]) == (b["epoch"], b["window"])
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_dry_run_runs_a_few_steps(tmp_path):
    result = run_cli("training.train", "--corpus", TINY_EN, "--out", str(tmp_path), "--dry-run", *TINY_NET)
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(str(tmp_path))["step"] == 3


def test_auto_dropout_follows_the_text_per_parameter():
    from training.train import auto_dropout

    assert auto_dropout(231_996, 7_091_199) == 0.5  # zh-fortunes' characters for the 2x512 Chinese network
    assert auto_dropout(790_620, 2_337_672) == 0.1  # KJV's words for the 2x256 word network
    assert auto_dropout(630_000, 6_500_000) == 0.3  # a 0.7 M-character corpus for the 2x512 network
    ratios = [auto_dropout(tokens, 1_000_000) for tokens in (1_000, 30_000, 60_000, 120_000, 300_000, 10**8)]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] == 0.5 and ratios[-1] == 0.1


def test_dropout_auto_is_chosen_from_the_data_and_saved(tmp_path):
    import re

    from training.train import auto_dropout

    chosen = {}
    for hidden in ("16", "256"):  # the same text for a small and a large network
        args = [*TINY_NET[TINY_NET.index("--num-layers") :], "--hidden-size", hidden, "--dropout", "auto"]
        out = tmp_path / hidden
        result = run_cli("training.train", "--corpus", TINY_EN, "--out", str(out), "--dry-run", *args)
        assert result.returncode == 0, result.stderr
        found = re.search(
            r"dropout ([0-9.]+) \(auto: ([0-9,]+) training tokens for ([0-9,]+) parameters\)", result.stderr
        )
        dropout, tokens, parameters = float(found[1]), int(found[2].replace(",", "")), int(found[3].replace(",", ""))
        assert dropout == auto_dropout(tokens, parameters)
        with open(out / "config.json") as handle:
            assert json.load(handle)["train"]["dropout"] == dropout  # saved as a number: export and resume read it
        chosen[hidden] = dropout
    assert chosen["16"] < chosen["256"]  # less text per parameter: more dropout
    bad = run_cli("training.train", "--corpus", TINY_EN, "--out", str(tmp_path / "b"), "--dropout", "lots")
    assert bad.returncode != 0 and "'lots' is not a valid float" in error_line(bad)


def error_line(result):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one clear line, no traceback
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "make_corpus,expected",
    [
        (lambda d: os.path.join(d, "missing.txt"), "corpus file not found: .*missing.txt"),
        (lambda d: write(d, "empty.txt", b"\n  \n"), "corpus file is empty .*empty.txt"),
        (
            lambda d: write(d, "bad.txt", b"good line\nbad \xff line\n"),
            r"bad.txt: line 2 is not valid UTF-8 .*--encoding-errors replace",
        ),
        (lambda d: write(d, "one.txt", "a" * 50 + "\n"), "vocabulary too small to train"),
    ],
)
def test_bad_corpus_gives_one_line_and_nonzero_exit(tmp_path, make_corpus, expected):
    result = run_cli(
        "training.train",
        "--corpus",
        make_corpus(str(tmp_path)),
        "--out",
        str(tmp_path / "o"),
        "--tokenizer",
        "char",
        "--val-fraction",
        "0",
        *TINY_NET,
    )
    assert result.returncode != 0
    import re

    assert re.search(expected, error_line(result)), result.stderr


def write(directory, name, content):
    path = os.path.join(directory, name)
    with open(path, "wb") as handle:
        handle.write(content.encode() if isinstance(content, str) else content)
    return path


@pytest.mark.slow
def test_encoding_errors_replace_goes_on(tmp_path):
    text = open(TINY_EN, "rb").read() + b"bad \xff line\n"
    path = write(str(tmp_path), "mixed.txt", text)
    result = run_cli(
        "training.train",
        "--corpus",
        path,
        "--out",
        str(tmp_path / "o"),
        "--max-steps",
        "2",
        "--encoding-errors",
        "replace",
        "--tokenizer",
        "char",
        *TINY_NET,
    )
    assert result.returncode == 0, result.stderr
    provenance = load_checkpoint(str(tmp_path / "o"))["provenance"]
    assert provenance["train_lines"] + provenance["val_lines"] == 221  # the 220 lines and the repaired one


@pytest.mark.slow
@pytest.mark.parametrize(
    "flag,value,expected",
    [
        ("--hidden-size", "0", "argument --hidden-size: 0 is out of range: must be >= 1"),
        ("--dropout", "1.5", "argument --dropout: 1.5 is out of range: must be <= 0.95"),
        ("--weight-drop", "1", "argument --weight-drop: 1.0 is out of range: must be <= 0.95"),
        ("--lr", "nan", "argument --lr: 'nan' must be a finite number"),
        ("--batch-size", "many", "argument --batch-size: 'many' is not a valid int"),
        ("--tokenizer", "bytes", "argument --tokenizer: invalid choice"),
    ],
)
def test_flag_out_of_range_gives_one_line(tmp_path, flag, value, expected):
    result = run_cli("training.train", "--corpus", TINY_EN, "--out", str(tmp_path), flag, value)
    assert result.returncode == 2
    assert expected in error_line(result)


@pytest.mark.slow
def test_batch_too_large_for_the_text(tmp_path):
    path = write(str(tmp_path), "small.txt", "ab ba\nba ab\n")
    result = run_cli(
        "training.train",
        "--corpus",
        path,
        "--out",
        str(tmp_path / "o"),
        "--tokenizer",
        "char",
        "--val-fraction",
        "0",
        "--batch-size",
        "64",
    )
    assert result.returncode == 1
    assert "needs at least 128" in error_line(result)


def test_infinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    import types

    import torch.nn.functional as F

    import training.train as train_module

    calls = {"n": 0}

    def poisoned(logits, targets, **kw):  # the 6th training loss is NaN
        calls["n"] += 1
        loss = F.cross_entropy(logits, targets, **kw)
        return loss * float("nan") if calls["n"] == 6 and logits.requires_grad else loss

    monkeypatch.setattr(train_module, "F", types.SimpleNamespace(cross_entropy=poisoned))
    out = str(tmp_path)
    code = train_module.main(
        [
            "--corpus",
            TINY_EN,
            "--out",
            out,
            "--tokenizer",
            "char",
            "--max-steps",
            "50",
            "--save-every",
            "3",
            "--val-fraction",
            "0",
            *TINY_NET,
        ]
    )
    assert code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("nextword-train: error: the loss became nan at step 6")
    assert f"last good checkpoint is {os.path.join(out, LAST)}" in line
    kept = load_checkpoint(out)
    assert kept["step"] == 3  # the NaN step and the ones before it since the last save were not written
    assert all(torch.isfinite(t).all() for t in kept["model"].values())


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_cleanly_and_the_run_resumes(tmp_path):
    out = str(tmp_path / "run")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "training.train",
            "--corpus",
            TINY_EN,
            "--out",
            out,
            "--tokenizer",
            "char",
            "--epochs",
            "1000",
            *TINY_NET,
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(out, "metrics.jsonl")) and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and f"continue with --resume {out}" in stderr
    step = load_checkpoint(out)["step"]
    assert step > 0
    from training.train import main

    assert main(["--resume", out, "--max-steps", str(step + 2)]) == 0
    assert load_checkpoint(out)["step"] == step + 2


@pytest.mark.slow
def test_damaged_checkpoint_gives_one_line(tmp_path):
    out = train_tiny(str(tmp_path), TINY_EN, "--tokenizer", "char", "--max-steps", "1")
    path = os.path.join(out, LAST)
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
    result = run_cli("training.train", "--resume", out)
    assert result.returncode == 1
    assert "checkpoint is damaged or not a nextword checkpoint" in error_line(result)


KILL_WHILE_SAVING = """
import io, sys, time, torch
real_save = torch.save
saves = []
def save(obj, handle, *args, **kwargs):
    saves.append(1)
    if len(saves) == 3:  # the third checkpoint: half of it reaches the disk, then the process is killed
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        handle.flush()
        open(sys.argv[1], "w").close()
        time.sleep(600)
    return real_save(obj, handle, *args, **kwargs)
torch.save = save
from training.train import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_resumes_from_the_last_good_one(tmp_path):
    out, marker = str(tmp_path / "run"), str(tmp_path / "writing")
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILL_WHILE_SAVING,
            marker,
            "--corpus",
            TINY_EN,
            "--out",
            out,
            "--tokenizer",
            "char",
            "--max-steps",
            "50",
            "--save-every",
            "2",
            "--val-fraction",
            "0",
            *TINY_NET,
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not os.path.exists(marker) and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert os.path.exists(marker), process.stderr.read() if process.poll() is not None else "no third save"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
        process.stderr.close()
    leftovers = [name for name in os.listdir(out) if ".tmp-" in name]
    assert leftovers, "the half-written checkpoint should be a temporary file"
    good = load_checkpoint(out)  # the last complete checkpoint, untouched by the killed write
    assert good["step"] == 4
    result = run_cli("training.train", "--resume", out, "--max-steps", "8")
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(out)["step"] == 8
    assert not [name for name in os.listdir(out) if ".tmp-" in name]
