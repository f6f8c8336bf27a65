"""torchrun with 2 CPU processes (Gloo) against 1 process on the same global batch."""

import json
import os
import subprocess
import sys

import torch

from tests.conftest import ROOT, TINY_EN, TINY_NET
from training.checkpoint import load_checkpoint

ARGS = ["--corpus", TINY_EN, "--tokenizer", "char", *TINY_NET, "--max-steps", "40", "--seed", "3", "--save-every", "20"]


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        return [(r["step"], r["loss"]) for r in map(json.loads, handle) if r["kind"] in ("train", "val")]


def torchrun(out, *extra):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "training.train",
        *ARGS,
        "--out",
        out,
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_processes_follow_the_single_process_loss_curve(tmp_path):
    from training.train import main

    single = str(tmp_path / "one")
    assert main([*ARGS, "--out", single]) == 0
    double = str(tmp_path / "two")
    result = torchrun(double)
    assert "2 processes" in result.stderr
    one, two = losses(single), losses(double)
    assert [s for s, _ in one] == [s for s, _ in two]
    for (_, a), (_, b) in zip(one, two):
        assert abs(a - b) < 1e-4 * max(1.0, abs(a))
    a, b = load_checkpoint(single), load_checkpoint(double)
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, atol=1e-5, rtol=1e-4)
    assert b["state"].shape == a["state"].shape  # rank 0 saved the whole batch's state

    # --resume works across the same world size
    torchrun(double, "--resume", double, "--max-steps", "50")
    assert load_checkpoint(double)["step"] == 50
