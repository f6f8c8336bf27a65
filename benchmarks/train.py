"""Training benchmark: tokens/s of training.train against a plain reference loop, same run.

    python -m benchmarks.train [--steps 150] [--profile]

Both train a 2-layer 200-unit LSTM (embedding 200), bptt 35, batch 20, AdamW, clipping 0.25,
on the committed King James text with the same word vocabulary (10,000 tokens). The
reference is the textbook loop (one nn.LSTM, repackaged hidden state, full softmax), the
way pytorch/examples' word_language_model trains; it runs first and last, and the two
figures are averaged, since this machine is shared and its speed drifts.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
import time

import torch
from torch import nn

from benchmarks.texts import CORPUS
from training.data import batchify, encode_lines, make_stream, windows
from training.train import main as train_main
from training.vocabulary import build_tokenizer

COMMON = [
    "--tokenizer",
    "word",
    "--lowercase",
    "--vocab-size",
    "10000",
    "--num-layers",
    "2",
    "--hidden-size",
    "200",
    "--embedding-size",
    "200",
    "--bptt",
    "35",
    "--batch-size",
    "20",
    "--dropout",
    "0.2",
    "--clip",
    "0.25",
    "--val-fraction",
    "0",
    "--seed",
    "0",
    "--device",
    "cpu",
]


class Reference(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.encoder = nn.Embedding(vocab, 200)
        self.rnn = nn.LSTM(200, 200, 2, dropout=0.2)
        self.drop = nn.Dropout(0.2)
        self.decoder = nn.Linear(200, vocab)

    def forward(self, x, hidden):  # x [T, B]
        out, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
        return self.decoder(self.drop(out)), hidden


# where a reference step's time goes, by operator (torch.profiler's self CPU time)
PARTS = {
    "output layer products": ("aten::mm", "aten::addmm"),
    "LSTM (oneDNN)": ("aten::mkldnn_rnn_layer", "aten::mkldnn_rnn_layer_backward"),
    "softmax and cross-entropy": (
        "aten::_log_softmax",
        "aten::_log_softmax_backward_data",
        "aten::nll_loss_forward",
        "aten::nll_loss_backward",
    ),
}


def reference_tokens_per_s(lines: list[str], steps: int, profile: bool = False) -> float:
    tokenizer = build_tokenizer("word", lines, 10000, lowercase=True)
    rows = batchify(make_stream(encode_lines(tokenizer, lines)), 20)
    torch.manual_seed(0)
    model = Reference(tokenizer.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    hidden = (torch.zeros(2, 20, 200), torch.zeros(2, 20, 200))
    loss_fn = nn.CrossEntropyLoss()
    tokens, started, profiler = 0, None, None
    for index, inputs, targets in windows(rows, 35):
        if index == 10:  # warm-up steps are not timed
            tokens, started = 0, time.perf_counter()
            if profile:
                profiler = torch.profiler.profile()
                profiler.__enter__()
        if index == steps + 10:
            break
        hidden = tuple(h.detach() for h in hidden)
        output, hidden = model(inputs.t(), hidden)
        loss = loss_fn(output.reshape(-1, tokenizer.vocab_size), targets.t().reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()
        tokens += targets.numel()
    elapsed = time.perf_counter() - started
    if profiler is not None:
        profiler.__exit__(None, None, None)
        print_profile(profiler, steps)
    return tokens / elapsed


def print_profile(profiler, steps: int) -> None:
    self_ms = {event.key: event.self_cpu_time_total / 1000 / steps for event in profiler.key_averages()}
    total = sum(self_ms.values())
    print(f"reference step: {total:.1f} ms of operator time")
    rest = total
    for part, names in PARTS.items():
        ms = sum(self_ms.get(name, 0.0) for name in names)
        rest -= ms
        print(f"  {part}: {ms:.1f} ms ({ms / total:.0%})")
    print(f"  everything else (optimizer, clipping, dropout, embedding): {rest:.1f} ms ({rest / total:.0%})")


def nextword_tokens_per_s(corpus: str, steps: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        assert (
            train_main(
                ["--corpus", corpus, "--out", out, "--max-steps", str(steps + 20), "--save-every", "100000", *COMMON]
            )
            == 0
        )
        with open(os.path.join(out, "metrics.jsonl")) as handle:
            records = [r for r in map(json.loads, handle) if r["kind"] == "train" and r["step"] > 20]
    return sum(r["tokens_per_s"] for r in records) / len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description="nextword training benchmark")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument(
        "--profile", action="store_true", help="only profile the reference loop: where its step's time goes"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        corpus = os.path.join(scratch, "kjv.txt")
        with gzip.open(CORPUS, "rt", encoding="utf-8") as src, open(corpus, "w", encoding="utf-8") as dst:
            dst.write(src.read())
        lines = [line.strip() for line in open(corpus, encoding="utf-8") if line.strip()]
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} timed steps each", flush=True
        )
        if args.profile:
            reference_tokens_per_s(lines, args.steps, profile=True)
            return
        first = reference_tokens_per_s(lines, args.steps)
        ours = nextword_tokens_per_s(corpus, args.steps)
        last = reference_tokens_per_s(lines, args.steps)
    reference = (first + last) / 2
    print(f"reference loop: {reference:,.0f} tokens/s (runs: {first:,.0f}, {last:,.0f})")
    print(f"training.train: {ours:,.0f} tokens/s")
    print(f"ratio: {ours / reference:.2f}x")


if __name__ == "__main__":
    main()
