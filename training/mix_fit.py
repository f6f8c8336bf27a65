"""Fitting the mix of network and n-gram memory on the validation lines (at export).

For every token of the validation lines (each line read from ``<s>``, as served): the network's
probability of it, the memory's, and the longest context the memory has seen before it. Then EM
on the log-likelihood, one weight per seen-context length, as SRILM's compute-best-mix does for a
single weight:

    r_i      = lambda_k P_memory(w_i) / (lambda_k P_memory(w_i) + (1 - lambda_k) P_network(w_i))
    lambda_k = mean of r_i over the tokens whose context length is k

Then the rule (service/model/mix.py): the same weights used linearly and log-linearly, each served on the
same lines and judged as nextword-eval judges a model (``score_rules``), and export keeps the one
whose first suggestion is right more often (linear on a tie). ``python -m benchmarks.mix_rules``
compares more rules by the next token alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from service.model.artifact import MIX_RULES
from service.model.memory import NO_TOKEN, MemoryModel, NgramMemory
from service.model.mix import MixedModel
from service.model.steps import StepModel
from service.model.tokenizer import BOS, EOS, Tokenizer
from training.scoring import Scorer, score


@dataclass
class Evidence:
    network: np.ndarray  # [N] the network's probability of each token
    memory: np.ndarray  # [N] the memory's
    seen: np.ndarray  # [N] the longest context the memory had seen before it


@dataclass
class Position:
    """One position of a group of lines read through both models: the rows still going."""

    log_probs: torch.Tensor  # [rows, V] the network's next-token log-probabilities
    contexts: np.ndarray  # [rows, width] the memory's contexts (NO_TOKEN where empty)
    targets: np.ndarray  # [rows] the tokens that came next


@torch.inference_mode()
def walk(
    network: StepModel, memory: NgramMemory, sequences: Sequence[Sequence[int]], lines_at_once: int = 64
) -> Iterator[Position]:
    """Read each token sequence ``<s> ids </s>`` through the network, lines_at_once lines per model call,
    keeping the memory's contexts beside it."""
    width = memory.width
    for first in range(0, len(sequences), lines_at_once):
        group = sorted(([BOS, *s, EOS] for s in sequences[first : first + lines_at_once]), key=len, reverse=True)
        state = network.init_state(len(group))
        contexts = np.full((len(group), width), int(NO_TOKEN), dtype=np.int64)
        for position in range(len(group[0]) - 1):
            rows = sum(1 for s in group if len(s) > position + 1)
            tokens = [s[position] for s in group[:rows]]
            log_probs, state = network.advance(torch.tensor(tokens).view(-1, 1), state[:, :rows])
            contexts = np.concatenate([contexts[:rows, 1:], np.array(tokens).reshape(-1, 1)], axis=1)
            yield Position(log_probs, contexts, np.array([s[position + 1] for s in group[:rows]]))


def collect(
    network: StepModel,
    memory: NgramMemory,
    sequences: Sequence[Sequence[int]],
    lines_at_once: int = 64,
    each: Callable[[Position], None] | None = None,
) -> Evidence:
    """Both models' probabilities of each token of the sequences, and the longest context seen before it.
    ``each`` is shown every position of the walk as well (for a caller that wants more of it in the same read)."""
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for at in walk(network, memory, sequences, lines_at_once):
        if each is not None:
            each(at)
        rows = len(at.targets)
        probabilities, longest = memory.probabilities(at.contexts)
        picked = at.log_probs[torch.arange(rows), torch.from_numpy(at.targets)].exp().numpy()
        parts.append((picked, probabilities[np.arange(rows), at.targets], longest))
    return Evidence(*(np.concatenate(column) for column in zip(*parts)))


@dataclass
class RuleScore:
    perplexity: float
    top1: float  # share of targets (words, or phrases and characters) that Suggest's first suggestion gets
    keystroke_savings: float
    first_hits: Sequence[bool] = ()  # per target: ranked first?


def rule_sample(lines: Sequence[str], targets: int, seed: int = 0) -> list[str]:
    """Lines drawn at random (``seed``) until they hold about ``targets`` targets (words, or characters of
    text without spaces): the rules are compared on these, so that a large corpus costs what a small one does."""
    order = np.random.default_rng(seed).permutation(len(lines))
    chosen, held = [], 0
    for index in order:
        if held >= targets:
            break
        line = lines[int(index)]
        chosen.append(line)
        held += len(line.split()) if " " in line else len(line)
    return chosen


def score_rules(
    network: StepModel,
    memory: NgramMemory,
    tokenizer: Tokenizer,
    lines: Sequence[str],
    weights: Sequence[float],
    progress: Callable[[int], None] | None = None,
) -> dict[str, RuleScore]:
    """Each mixing rule with ``weights``, served on the lines and judged as nextword-eval judges a model;
    ``progress(n)``: n more lines scored (each rule scores every line)."""
    scores = {}
    for rule in MIX_RULES:
        mix = MixedModel(network, MemoryModel(memory), list(weights), rule)
        units, tally = score(Scorer(rule, mix, mix), tokenizer, lines, progress=progress)
        report = tally.report(units)
        scores[rule] = RuleScore(report["perplexity"], report["top1"], report["ksr"] or 0.0, tally.first_hits)
    return scores


def top1_difference(scores: dict[str, RuleScore], a: str, b: str) -> tuple[float, float]:
    """(top-1 of ``a`` minus that of ``b``, the half-width of its 95 % interval), paired by target."""
    first, second = np.asarray(scores[a].first_hits, float), np.asarray(scores[b].first_hits, float)
    if not len(first) or len(first) != len(second):
        return scores[a].top1 - scores[b].top1, float("nan")
    differences = first - second
    return float(differences.mean()), float(1.96 * differences.std(ddof=1) / math.sqrt(max(1, len(differences) - 1)))


def best_rule(scores: dict[str, RuleScore]) -> str:
    """The rule whose first suggestion is right most often; linear, the plainer, on a tie."""
    return max(scores, key=lambda rule: (scores[rule].top1, rule == "linear"))


def fit_weights(evidence: Evidence, order: int, iterations: int = 30) -> list[float]:
    """One memory weight per seen-context length (0 .. order - 1); 0.5 where no token had that length."""
    weights = []
    for k in range(order):
        chosen = evidence.seen == k
        network, memory = evidence.network[chosen].astype(np.float64), evidence.memory[chosen].astype(np.float64)
        weight = 0.5
        if chosen.any():
            for _ in range(iterations):
                share = weight * memory / np.maximum(weight * memory + (1 - weight) * network, 1e-300)
                weight = float(share.mean())
        weights.append(round(weight, 6))
    return weights


def perplexity(evidence: Evidence, weights: Sequence[float] | None) -> float:
    """Per-token perplexity of the mix with ``weights`` (None: the network alone)."""
    if weights is None:
        p = evidence.network
    else:
        w = np.asarray(weights)[evidence.seen]
        p = w * evidence.memory + (1 - w) * evidence.network
    return math.exp(-float(np.log(np.maximum(p, 1e-30)).mean()))
