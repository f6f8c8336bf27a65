"""Mixing rules for the network and the n-gram memory, compared on validation lines.

    python -m benchmarks.mix_rules --model build/recipes/kjv.pt --train build/kjv/train.txt [--max-lines 2000]

The validation lines are the ones training held out of --train (``split_lines(lines, 0.1, seed 0)``,
as the recipes train). Each rule is fitted on the first half of their tokens and scored on the
second: perplexity, and top-1 (the token ranked first is the one that came next). The rules:
  * linear, a weight per longest context seen (k), fitted by EM on the log-likelihood: what export
    fits and the service serves;
  * linear, a weight per k and per quantile bucket of that context's backoff weight gamma (a context
    seen often with few followers has a low gamma), by EM: a gate on the seen order and counts;
  * linear with the served weights scaled (sharper towards the memory, or softer);
  * log-linear, P proportional to P_network^(1 - a_k) * P_memory^a_k, a_k the served weights scaled.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from service.model.artifact import load_artifact
from service.model.memory import NgramMemory
from service.model.steps import ScriptedModel
from training.data import read_corpus, split_lines
from training.mix_fit import Evidence, collect, fit_weights, walk

BUCKETS = 4  # quantiles of gamma for the gated rule
SCALES = (0.7, 1.3)  # of the served weights, linear
LOG_LINEAR_SCALES = (1.0, 1.5, 2.0)


def longest_gamma(memory: NgramMemory, contexts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The longest context seen [B] and its backoff weight gamma [B]."""
    longest, found = memory.seen(contexts)
    gamma = np.full(len(longest), float(memory.orders[0].gamma[0]) if len(memory.orders[0].gamma) else 1.0)
    for k in range(1, memory.order):
        rows = longest == k
        if rows.any():
            gamma[rows] = memory.orders[k].gamma[found[k - 1][rows]]
    return longest, gamma


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model file with an n-gram memory")
    parser.add_argument("--train", required=True, help="the text the model was trained on (train.txt)")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-lines", type=int, default=2000, help="validation lines read (export fits on 2,000)")
    args = parser.parse_args()
    artifact = load_artifact(args.model)
    memory = artifact.memory
    if memory is None:
        raise SystemExit(f"benchmarks.mix_rules: {args.model} has no n-gram memory")
    _, validation = split_lines(read_corpus([args.train]).lines, args.val_fraction, args.seed)
    sequences = [artifact.tokenizer.encode(line) for line in validation[: args.max_lines]]
    network = ScriptedModel(artifact.model, artifact.tokenizer.vocab_size)

    found: list[np.ndarray] = []  # each position's gamma, from the same read of the network
    evidence = collect(network, memory, sequences, each=lambda at: found.append(longest_gamma(memory, at.contexts)[1]))
    gammas = np.concatenate(found)
    half = len(evidence.seen) // 2
    fit = slice(0, half)
    served = np.asarray(
        fit_weights(Evidence(evidence.network[fit], evidence.memory[fit], evidence.seen[fit]), memory.order)
    )
    edges = np.quantile(gammas[fit], np.linspace(0, 1, BUCKETS + 1)[1:-1])
    cells = evidence.seen * BUCKETS + np.searchsorted(edges, gammas)
    gated = np.asarray(
        fit_weights(Evidence(evidence.network[fit], evidence.memory[fit], cells[fit]), memory.order * BUCKETS)
    )

    rules = {"linear by k (served)": ("linear", 1.0)}
    rules[f"linear by k and {BUCKETS} gamma buckets"] = ("gated", 1.0)
    rules.update({f"linear by k, weights x{s:g}": ("linear", s) for s in SCALES})
    rules.update({f"log-linear by k, weights x{s:g}": ("log-linear", s) for s in LOG_LINEAR_SCALES})
    rules["network alone"] = ("network", 0.0)
    rules["memory alone"] = ("memory", 0.0)
    hits = dict.fromkeys(rules, 0)
    nats = dict.fromkeys(rules, 0.0)
    scored, index = 0, 0
    for at in walk(network, memory, sequences):
        rows = len(at.targets)
        held = np.arange(index, index + rows) >= half
        index += rows
        if not held.any():
            continue
        memory_p, longest = memory.probabilities(at.contexts)
        network_log = at.log_probs.numpy()
        _, gamma = longest_gamma(memory, at.contexts)
        targets, rows_at = at.targets[held], np.nonzero(held)[0]
        for name, (kind, scale) in rules.items():
            if kind == "network":
                log_p = network_log
            elif kind == "memory":
                log_p = np.log(np.maximum(memory_p, 1e-30))
            elif kind == "log-linear":
                a = np.clip(served[longest] * scale, 0.0, 1.0)[:, None]
                log_p = a * np.log(np.maximum(memory_p, 1e-30)) + (1 - a) * network_log
                log_p = log_p - np.logaddexp.reduce(log_p, axis=1, keepdims=True)
            else:
                weight = (
                    gated[longest * BUCKETS + np.searchsorted(edges, gamma)] if kind == "gated" else served[longest]
                )
                weight = np.clip(weight * scale, 0.0, 0.99)[:, None]
                log_p = np.log(np.maximum(weight * memory_p + (1 - weight) * np.exp(network_log), 1e-30))
            hits[name] += int((log_p[rows_at].argmax(1) == targets).sum())
            nats[name] -= float(log_p[rows_at, targets].sum())
        scored += len(targets)
    print(
        f"{args.model}: {len(sequences)} validation lines, {len(evidence.seen):,} tokens; fitted on the first "
        f"half, scored on the {scored:,} of the second\n"
    )
    print("| rule | perplexity | top-1 |")
    print("| --- | --- | --- |")
    for name in rules:
        print(f"| {name} | {math.exp(nats[name] / scored):.2f} | {100 * hits[name] / scored:.2f} % |")


if __name__ == "__main__":
    main()
