"""A reference n-gram language model over a nextword tokenizer's ids.

The baseline that ``training.evaluate --baseline ngram`` compares a network
with. It is built on the same tokenizer (so the same vocabulary and the same
``<unk>``) and from the same training lines, and it implements the engine's
``StepModel`` interface, so suggestions, completions and keystroke savings are
computed for it by the very code that serves the network (service/model/suggest.py).

Two ways to score the next token, as n-gram input methods do:

* ``kneser-ney``: interpolated Kneser-Ney, a proper distribution, for
  perplexity. For orders below the highest, counts are continuation counts
  (how many different tokens precede the n-gram); one absolute discount per
  order, D = n1 / (n1 + 2 n2), from the count-of-counts; the unigram
  interpolates with the uniform distribution over the vocabulary.
* ``backoff``: ranking by backoff ("stupid backoff", Brants et al. 2007): the
  relative frequency in the longest context that has been seen, times 0.4 for
  each order backed off. Not normalised; it only ranks.

The state is the history itself, as token ids in a float tensor [1, B, n-1]
(-1 where the history is shorter), so the engine can stack, expand and slice
it like a network's state.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from service.model.memory import NgramMemory
from service.model.tokenizer import BOS, EOS, PAD

SCORINGS = ("kneser-ney", "backoff")
BACKOFF_FACTOR = 0.4
_FLOOR = 1e-12  # backoff scores of tokens never seen: ranked last, still finite


class _Followers:
    """What follows one context: token ids, their counts, and the total."""

    __slots__ = ("ids", "counts", "total")

    def __init__(self, counter: Counter) -> None:
        self.ids = np.fromiter(counter.keys(), dtype=np.int64, count=len(counter))
        self.counts = np.fromiter(counter.values(), dtype=np.float64, count=len(counter))
        self.total = float(self.counts.sum())


def _discount(tables: Iterable[dict[tuple, _Followers]]) -> float:
    ones = twos = 0
    for table in tables:
        for followers in table.values():
            ones += int((followers.counts == 1).sum())
            twos += int((followers.counts == 2).sum())
    if ones == 0:
        return 0.5
    return min(max(ones / (ones + 2 * twos), 0.1), 0.9)


class NgramCounts:
    """Counts of every order up to ``order`` over sequences ``<s> ids </s>``."""

    def __init__(self, sequences: Iterable[Sequence[int]], order: int, vocab_size: int) -> None:
        if not 1 <= order <= 9:
            raise ValueError(f"n-gram order must be between 1 and 9, not {order}")
        self.order = order
        self.vocab_size = vocab_size
        raw: list[dict[tuple, Counter]] = [defaultdict(Counter) for _ in range(order)]  # index k: context length k
        preceded: list[dict[tuple, set]] = [defaultdict(set) for _ in range(order)]  # distinct left neighbours
        for ids in sequences:
            tokens = [BOS, *ids, EOS]
            for end in range(1, len(tokens)):
                word = tokens[end]
                for k in range(order):
                    if end - k < 0:
                        break
                    context = tuple(tokens[end - k : end])
                    raw[k][context][word] += 1
                    if k + 1 < order and end - k - 1 >= 0:
                        preceded[k][context + (word,)].add(tokens[end - k - 1])
        self.raw = [{c: _Followers(f) for c, f in table.items()} for table in raw]
        continuation: list[dict[tuple, Counter]] = [defaultdict(Counter) for _ in range(order)]
        for k in range(order - 1):
            for gram, left in preceded[k].items():
                continuation[k][gram[:-1]][gram[-1]] = len(left)
            for context, followers in raw[k].items():
                if context and context[0] == BOS:  # nothing can precede <s>: its contexts keep raw counts
                    continuation[k][context] = followers
        # Kneser-Ney: continuation counts below the highest order, raw counts at it.
        self.kn = [{c: _Followers(f) for c, f in table.items()} for table in continuation[:-1]] + [self.raw[-1]]
        self.discounts = [_discount([table]) for table in self.kn]
        uniform = np.ones(vocab_size)
        uniform[[PAD, BOS]] = 0.0
        self.uniform = uniform / uniform.sum()
        unigram = np.zeros(vocab_size)
        top = self.raw[0].get(())
        if top is not None:
            unigram[top.ids] = top.counts / top.total
        self.unigram_frequency = unigram

    @classmethod
    def from_text(cls, lines: Iterable[str], tokenizer, order: int) -> NgramCounts:
        return cls((tokenizer.encode(line) for line in lines), order, tokenizer.vocab_size)

    def kneser_ney(self, history: Sequence[int]) -> np.ndarray:
        """P(next token | history) for every token [V]."""
        p = self.uniform
        for k in range(self.order):
            if k > len(history):
                break
            followers = self.kn[k].get(tuple(history[len(history) - k :]))
            if followers is None:
                break  # a longer context containing this one was not seen either
            discount = self.discounts[k]
            p = p * (discount * len(followers.ids) / followers.total)
            np.add.at(p, followers.ids, np.maximum(followers.counts - discount, 0.0) / followers.total)
        return p

    def backoff(self, history: Sequence[int]) -> np.ndarray:
        """Backoff ranking scores for every token [V]."""
        scores = self.unigram_frequency * BACKOFF_FACTOR ** (self.order - 1)
        for k in range(1, self.order):
            if k > len(history):
                break
            followers = self.raw[k].get(tuple(history[len(history) - k :]))
            if followers is None:
                break
            scores[followers.ids] = followers.counts / followers.total * BACKOFF_FACTOR ** (self.order - 1 - k)
        return scores


class NgramStepModel:
    """An ``NgramCounts`` behind the engine's StepModel interface (see service/model/steps.py)."""

    def __init__(self, counts: NgramCounts, scoring: str = "kneser-ney") -> None:
        if scoring not in SCORINGS:
            raise ValueError(f"unknown n-gram scoring {scoring!r}; choose one of {', '.join(SCORINGS)}")
        self.counts = counts
        self.scoring = scoring
        self.vocab_size = counts.vocab_size
        self._width = max(1, counts.order - 1)

    def init_state(self, batch_size: int) -> Tensor:
        return torch.full((1, batch_size, self._width), -1.0)

    def advance(self, tokens: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        rows = []
        new_state = torch.empty(1, tokens.size(0), self._width)
        for b in range(tokens.size(0)):  # one history at a time: numpy does the vocabulary-wide work
            history = [int(t) for t in state[0, b].tolist() if t >= 0] + tokens[b].tolist()
            history = history[max(0, len(history) - (self.counts.order - 1)) :] if self.counts.order > 1 else []
            new_state[0, b] = torch.tensor([-1.0] * (self._width - len(history)) + [float(t) for t in history])
            if self.scoring == "kneser-ney":
                rows.append(self.counts.kneser_ney(history))
            else:
                rows.append(np.maximum(self.counts.backoff(history), _FLOOR))
        with np.errstate(divide="ignore"):  # <pad> and <s> have probability 0
            return torch.from_numpy(np.log(np.stack(rows))).float(), new_state


def to_memory(counts: NgramCounts, min_count: int = 1) -> NgramMemory:
    """The Kneser-Ney model of ``counts`` as the arrays a model file stores (service/model/memory.py).

    ``min_count`` prunes: n-grams of three or more tokens seen fewer times are left out, and their
    probability goes to the shorter context (the distribution still sums to one). Shorter n-grams
    are always kept.
    """
    tables = []
    for k, table in enumerate(counts.kn):
        raw = counts.raw[k]
        discount = counts.discounts[k]
        rows = []
        for context, followers in table.items():
            keep = np.ones(len(followers.ids), dtype=bool)
            if k >= 2 and min_count > 1:  # prune by how often the n-gram itself occurred
                seen = raw[context]
                occurred = dict(zip(seen.ids.tolist(), seen.counts.tolist()))
                keep = np.array([occurred.get(int(t), 0) >= min_count for t in followers.ids], dtype=bool)
                if not keep.any():
                    continue
            p = np.maximum(followers.counts[keep] - discount, 0.0) / followers.total
            rows.append((context, followers.ids[keep], p, max(0.0, 1.0 - float(p.sum()))))
        tables.append(rows)
    return NgramMemory.build(tables, counts.vocab_size)
