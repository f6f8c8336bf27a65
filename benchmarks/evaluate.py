"""Evaluation benchmark: nextword-eval's scoring, one line at a time against lines in groups, same run.

    python -m benchmarks.evaluate [--model models/default.pt] [--text PATH] [--max-lines N]

Without --text it scores the default model's held-out verses: the committed King James text split
90/10 by line with seed 0 (the split of ``make default-model`` and ``scripts/recipes.sh kjv``).
"One line at a time" reads each line token by token, one model call per token, as evaluation did
before lines were grouped; "in groups" reads 64 lines per model call and position
(``training/scoring.py``). Both tallies go through the same suggestion code; the benchmark prints
the time of each, the speed-up, and the largest difference between their figures (batched
arithmetic rounds differently).
"""

from __future__ import annotations

import argparse
import gzip
import time

import torch

from benchmarks.texts import CORPUS
from service.model.artifact import load_artifact
from training.data import split_lines
from training.evaluate import network_scorer
from training.scoring import LINES_AT_ONCE, score
from training.tables import format_table


def held_out_verses() -> list[str]:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as handle:
        lines = [line.rstrip("\n") for line in handle if line.strip()]
    return split_lines(lines, 0.1, 0)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/default.pt", help="model file (default models/default.pt)")
    parser.add_argument("--text", help="held-out text, one line per sequence (default: the default model's)")
    parser.add_argument("--max-lines", type=int, default=None, help="score only the first N lines (default: all)")
    args = parser.parse_args()
    artifact = load_artifact(args.model)
    if args.text:
        with open(args.text, encoding="utf-8") as handle:
            lines = [line.rstrip("\n") for line in handle if line.strip()]
    else:
        lines = held_out_verses()
    lines = lines[: args.max_lines]
    scorer, tokenizer = network_scorer("model", artifact)
    threads = torch.get_num_threads()
    print(f"{args.model} on {len(lines)} lines; torch {torch.__version__}, {threads} threads", flush=True)
    results, seconds = {}, {}
    for name, at_once in (("one line at a time", 1), (f"{LINES_AT_ONCE} lines at once", LINES_AT_ONCE)):
        started = time.perf_counter()
        units, tally = score(scorer, tokenizer, lines, lines_at_once=at_once)
        seconds[name] = time.perf_counter() - started
        results[name] = tally.report(units)
        print(f"{name}: {seconds[name]:.1f} s", flush=True)
    first, second = results
    print(format_table(results))
    worst_percent = max(
        abs(results[first][k] - results[second][k]) * 100
        for k in results[first]
        if k.startswith(("top", "ksr", "completion")) and results[first][k] is not None
    )
    perplexity = abs(results[first]["perplexity"] - results[second]["perplexity"])
    print(
        f"speed-up {seconds[first] / seconds[second]:.2f}x; largest difference: perplexity {perplexity:.4f}, "
        f"percentages {worst_percent:.3f} points"
    )


if __name__ == "__main__":
    main()
