"""The prior of the history's weights fitted to each user as they type (ONLINE_PRIOR), chosen on validation text.

    python -m benchmarks.online_prior --model build/adapt/kjv.pt --typed build/adapt/kjv-split/test.txt \
        --fit-lines 795 --train build/adapt/kjv-ot/train.txt [--priors 2 5 10 25 50 200]

Two validation texts, neither of them a test text of scripts/adapt.sh:
  * where learning pays: the lines of --typed that fit the served weights (its first --fit-lines; the test
    scores the lines after them), their first half fitting the starting weights and the second half scored;
  * where the model knows the text: the lines training held out of --train for validation
    (``split_lines(lines, 0.1, seed 0)``, as the recipes train), typed with the weights of the first.
For each prior, ``nextword-eval --learn --learn-rule online`` types both (one thread each, two at once). The
table gives top-1, top-3 and keystroke savings with learning against without, and perplexity, for the fixed
weights and the weights fitted online; the prior chosen is the one with the least summed log-perplexity of
the two texts (what EM fits: their likelihood).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import subprocess
import sys
import tempfile

from training.data import read_corpus, split_lines


def evaluate(model: str, text: str, out: str, prior: float, *flags: str) -> dict:
    """``nextword-eval --learn --learn-rule online`` on ``text``: its JSON document."""
    command = [sys.executable, "-m", "training.evaluate", model, "--text", text, "--learn", "--learn-rule", "online"]
    command += ["--online-prior", str(prior), "--threads", "1", "--quiet", "--json", out, *flags]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    with open(out, encoding="utf-8") as handle:
        return json.load(handle)


def row(document: dict, which: str) -> dict:
    return document["results"]["model"] if which == "without" else document[which]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model file (scripts/adapt.sh's kjv.pt)")
    parser.add_argument("--typed", required=True, help="the typed text of the adaptation test")
    parser.add_argument("--fit-lines", type=int, required=True, help="its first lines, which fit the served weights")
    parser.add_argument("--train", required=True, help="the text the model was trained on")
    parser.add_argument("--priors", type=float, nargs="+", default=[2, 5, 10, 25, 50, 200])
    parser.add_argument("--score-every", type=int, default=2, help="of the held-out training lines")
    args = parser.parse_args()
    with open(args.typed, encoding="utf-8") as handle:
        fitting = [line for line in handle.read().splitlines() if line.strip()][: args.fit_lines]
    _, held = split_lines(read_corpus([args.train]).lines, 0.1, 0)
    with tempfile.TemporaryDirectory() as folder:
        typed, same = os.path.join(folder, "typed.txt"), os.path.join(folder, "same.txt")
        for path, lines in ((typed, fitting), (same, held)):
            with open(path, "w", encoding="utf-8") as handle:
                handle.write("\n".join(lines) + "\n")

        runs: dict[float, tuple[dict, dict]] = {}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            half = str(len(fitting) // 2)
            firsts = {
                p: pool.submit(evaluate, args.model, typed, os.path.join(folder, f"t{p}.json"), p, "--fit-lines", half)
                for p in args.priors
            }
            seconds = {}
            for p, future in firsts.items():
                weights = future.result()["learning"]["history_weights"]
                out = os.path.join(folder, f"s{p}.json")
                flags = ("--history-weights", weights, "--score-every", str(args.score_every))
                seconds[p] = pool.submit(evaluate, args.model, same, out, p, *flags)
            runs = {p: (firsts[p].result(), seconds[p].result()) for p in args.priors}
    print(
        f"validation: {args.typed} lines {len(fitting) // 2 + 1}-{len(fitting)} typed after the first "
        f"{len(fitting) // 2} fit the weights; {len(held)} lines held out of {args.train} (every "
        f"{args.score_every}th scored), with those weights\n"
    )
    print("| prior | typed: top-1 | top-3 | ppl | held out: top-1 | top-3 | ksr | ppl | summed log-ppl |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    best, least = None, math.inf
    for label, prior in [("fixed", None), *((f"{p:g}", p) for p in args.priors)]:
        first, second = runs[prior if prior is not None else args.priors[0]]
        which = "learning" if prior is None else "learning_online"
        cells = []
        for document, metrics in ((first, ("top1", "top3")), (second, ("top1", "top3", "ksr"))):
            mine, without = row(document, which), row(document, "without")
            cells += [f"{100 * (mine[m] - without[m]):+.2f}" for m in metrics]
            cells.append(f"{mine['perplexity'] / without['perplexity']:.3f}x")
        summed = math.log(row(first, which)["perplexity"]) + math.log(row(second, which)["perplexity"])
        if prior is not None and summed < least:
            best, least = prior, summed
        print(f"| {label} | " + " | ".join(cells) + f" | {summed:.4f} |")
    print(
        "\ntop-1, top-3, keystroke savings: points against without learning; ppl: with learning / without. "
        f"The least summed log-perplexity: prior {best:g}"
    )


if __name__ == "__main__":
    main()
