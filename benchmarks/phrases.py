"""Phrase suggestions for text without spaces: ways to fill the row, compared on validation lines.

    python -m benchmarks.phrases --model build/recipes/zh.pt --train build/zh/train.txt [--max-lines 444]

The validation lines are the ones training held out of --train (``split_lines(lines, 0.1, seed 0)``,
as the recipes train), scored in two halves, each as ``nextword-eval`` scores text without spaces
(training/scoring.py): top-1 and top-3 (a suggestion counts when the text goes on with all of it)
and keystroke savings with 3 suggestions (at each character the longest suggestion the text goes on
with is taken for one key). Each way is scored for the served mix and for the n-gram baseline of
``--order`` built from the training lines (Kneser-Ney, ranked by stupid backoff), through the same
code, so that the difference in keystroke savings is the one nextword-eval reports. The ways:
  * served: each of the most probable next characters is extended while the next character is at
    least ``phrase_threshold`` (0.25) probable, up to ``max_phrase_chars`` (4); ranked by probability;
  * the same with a lower threshold, or with phrases of up to 7 characters (verse lines);
  * savings: every leading part of those extensions is a candidate (extended whatever the threshold);
    the most probable candidate comes first, and each further place goes to the one whose expected
    keys saved, P(phrase) * (its characters - 1 - those of a phrase above that it extends), is
    largest: a single character saves no key, so the row fills with phrases.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from service.model.artifact import load_artifact
from service.model.suggest import SuggestConfig, Suggester
from training.data import read_corpus, split_lines
from training.evaluate import network_scorer
from training.ngram import NgramCounts, NgramStepModel
from training.scoring import Scorer, score


class SavingsRow(Suggester):
    """The row filled by expected keys saved (see the module docstring)."""

    def _phrases(self, log_probs, state, k):
        ids, limit = self.cjk_ids, self.config.max_phrase_chars
        top = log_probs[ids].topk(min(ids.numel(), max(3 * k, 10)))
        live = [(v, self.texts[int(j)].strip(), int(j)) for v, j in zip(top.values.tolist(), ids[top.indices].tolist())]
        live = [c for c in live if len(c[1]) <= limit]
        found = {phrase: value for value, phrase, _ in live}
        states = state.expand(-1, len(live), -1).contiguous()
        while live:
            next_log_probs, states = self.model.advance(torch.tensor([[c[2]] for c in live]), states)
            best_values, best_index = next_log_probs[:, ids].max(dim=1)
            keep, extended = [], []
            for i, (value, phrase, _) in enumerate(live):
                token = int(ids[best_index[i]])
                piece = self.texts[token].strip()
                if len(phrase) + len(piece) <= limit:
                    extended.append((value + best_values[i].item(), phrase + piece, token))
                    keep.append(i)
            live = extended
            states = states[:, keep] if keep else states
            found.update((phrase, value) for value, phrase, _ in extended)
        ranked = sorted(found.items(), key=lambda item: -item[1])
        chosen, pool = ranked[:1], ranked[1:]

        def gain(item: tuple[str, float]) -> float:
            covered = max((len(p) - 1 for p, _ in chosen if item[0].startswith(p)), default=0)
            return math.exp(item[1]) * (max(len(item[0]) - 1 - covered, 0) + 1e-9)

        while len(chosen) < k and pool:
            best = max(pool, key=gain)
            pool.remove(best)
            chosen.append(best)
        return [(phrase, math.exp(value)) for phrase, value in chosen]


def counted_continuations(memory, histories: np.ndarray, least: int) -> list[tuple[float, int] | None]:
    """For each row's history [B, width]: where the memory saw at least ``least`` tokens of it, the follower
    with the highest relative frequency there (its discounted probability plus its share of the context's
    backoff weight) and that frequency; else None."""
    longest, found = memory.seen(histories)
    out: list[tuple[float, int] | None] = []
    for row, k in enumerate(longest.tolist()):
        if k < least:
            out.append(None)
            continue
        order, context = memory.orders[k], int(found[k - 1][row])
        start, end = order.offsets[context], order.offsets[context + 1]
        frequency = order.probs[start:end] + order.gamma[context] / max(end - start, 1)
        best = int(np.argmax(frequency))
        out.append((float(frequency[best]), int(order.ids[start + best])))
    return out


class MemoryRow(Suggester):
    """The served row's first suggestion, then phrases extended as the n-gram memory counted them: where the
    mix gives no next character the threshold but the memory saw at least 2 tokens of the context and one
    follower there has a relative frequency of at least the threshold, the phrase goes on with it and
    scores that frequency (as a classic n-gram row ranks). Models without a memory get the served row."""

    def __init__(self, model, tokenizer, config: SuggestConfig = SuggestConfig()) -> None:
        super().__init__(model, tokenizer, config)
        self.served = Suggester(model, tokenizer, config)
        self.memory = getattr(model, "memory", None)
        self.han = set(self.cjk_ids.tolist())

    def _phrases(self, log_probs, state, k):
        served = self.served._phrases(log_probs, state, k)
        if self.memory is None or not served:
            return served
        mine = super()._phrases(log_probs, state, k)
        return ([served[0]] + [item for item in mine if item[0] != served[0][0]])[:k]

    def _next_pieces(self, log_probs, states):
        pieces = super()._next_pieces(log_probs, states)
        histories = states[-1, :, : self.memory.width].numpy().astype(np.int64)
        threshold = self.config.phrase_threshold
        for i, found in enumerate(counted_continuations(self.memory.memory, histories, 2)):
            if pieces[i] is None and found is not None and found[0] >= threshold and found[1] in self.han:
                pieces[i] = (found[1], math.log(max(found[0], math.exp(log_probs[i, found[1]].item()))))
        return pieces


WAYS = {
    "served": (Suggester, SuggestConfig()),
    "threshold 0.15": (Suggester, SuggestConfig(phrase_threshold=0.15)),
    "up to 7 characters": (Suggester, SuggestConfig(max_phrase_chars=7)),
    "savings": (SavingsRow, SuggestConfig()),
    "memory counts": (MemoryRow, SuggestConfig()),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Chinese model file with an n-gram memory")
    parser.add_argument("--train", required=True, help="the text the model was trained on (train.txt)")
    parser.add_argument("--order", type=int, default=5, help="of the n-gram baseline (default 5)")
    parser.add_argument("--max-lines", type=int, default=444, help="validation lines read (default 444)")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"which, of: {', '.join(WAYS)}")
    args = parser.parse_args()
    torch.set_num_threads(1)
    artifact = load_artifact(args.model)
    training, validation = split_lines(read_corpus([args.train]).lines, 0.1, 0)
    validation = validation[: args.max_lines]
    halves = [validation[: len(validation) // 2], validation[len(validation) // 2 :]]
    mix, tokenizer = network_scorer("mix", artifact)
    counts = NgramCounts.from_text(training, tokenizer, args.order)
    ngram = Scorer("ngram", NgramStepModel(counts, "kneser-ney"), NgramStepModel(counts, "backoff"))
    print(f"{args.model}: {len(validation)} validation lines in two halves; n-gram of order {args.order}")
    print(
        "way                  | half | mix top-1 / top-3 / savings | n-gram top-1 / top-3 / savings "
        "| savings, mix - n-gram"
    )
    for name in args.ways.split(","):
        kind, config = WAYS[name]
        for half, lines in enumerate(halves, 1):
            started = time.perf_counter()
            figures = []
            for scorer in (mix, ngram):
                units, tally = score(scorer, tokenizer, lines, 3, config, row=kind)
                report = tally.report(units)
                figures.append([100 * report[key] for key in ("top1", "top3", "ksr")])
            cells = " | ".join(" / ".join(f"{v:5.2f} %" for v in values) for values in figures)
            print(
                f"{name:20s} | {half}    | {cells} | {figures[0][2] - figures[1][2]:+.2f} points"
                f"   ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
