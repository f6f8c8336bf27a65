"""A user's history as part of the served distribution: their n-grams (service/model/personal.py) as a
distribution over a model's next tokens, mixed with the served one.

P_user(unit | context) is Witten-Bell interpolated over the user's n-grams, down to how often they typed
each unit at all, so it gives every unit they typed some probability:

    P_0(u) = c(u) / sum c                                    (decayed counts)
    P_n(u) = (c(h_n, u) + T(h_n) P_{n-1}(u)) / (C(h_n) + T(h_n))   for each longer context h_n they typed

Units map to the model's tokens: a word model's word, or the first token of the unit for other models. A
unit that the vocabulary lacks ("Zelda" for a model that never saw it) keeps an id of its own past the
vocabulary (``extra``), so that its probability goes to ``<unk>`` in the distribution over tokens and it
can still be suggested by name. Then

    P(w | h) = (1 - lambda_b) P_served(w | h) + lambda_b P_user(w | h)

with one weight per bucket b: the longest context of h that the user has typed (0: none) and how often
they typed it (``EVIDENCE_BINS``). The weights are fitted by EM on typed text, as the memory's are on the
training text's validation lines (``fit``; ``nextword-eval --learn`` fits them on the first lines it
types and reports them). A user with no history gets exactly the served distribution.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from service.model.tokenizer import UNK

EVIDENCE_BINS = (3.0, 10.0, 30.0, 100.0)  # bins of the count of the context (E < 3, 3 <= E < 10, ...)
# The least weight of a history that applies: a word typed once is then always among the completions of
# its first letters (the model gives the other words starting with them little), at most 2 % of the
# served probability of the next word.
MIN_WEIGHT = 0.02
MIN_FIT_TOKENS = 50  # a bucket fitted on fewer tokens keeps the weight it had
REBASE = 40.0  # half-lives between the reference time of the stored unigram counts and now, at most
# Fitted by ``nextword-eval --learn --fit-lines`` on the first 10 % of the New Testament typed on a model
# of the Old Testament with a history of orders 1-4 (scripts/recipes.sh adapt; docs/history.md): rows are the
# longest context typed before (0: none, 1, 2 or more units), columns the bins of how often (EVIDENCE_BINS).
DEFAULT_WEIGHTS = (
    (0.02, 0.02, 0.06, 0.167, 0.05),
    (0.128, 0.156, 0.198, 0.194, 0.306),
    (0.361, 0.414, 0.527, 0.521, 0.607),
)


def evidence_bin(evidence: float) -> int:
    return bisect.bisect_right(EVIDENCE_BINS, evidence)


@dataclass(frozen=True)
class LearnedWeights:
    """The history's weight in the mix, by (longest context typed, bin of its count)."""

    weights: tuple[tuple[float, ...], ...] = DEFAULT_WEIGHTS

    def weight(self, seen: int, evidence: float) -> float:
        row = self.weights[min(seen, len(self.weights) - 1)]
        return row[min(evidence_bin(evidence), len(row) - 1)]

    @classmethod
    def parse(cls, text: str) -> LearnedWeights:
        """Rows separated by ';', weights by ',' (what ``str`` gives); a ValueError names what is wrong."""
        rows = tuple(tuple(float(w) for w in row.split(",")) for row in text.split(";") if row.strip())
        if not rows or any(len(row) != len(EVIDENCE_BINS) + 1 for row in rows):
            raise ValueError(f"history weights: give rows of {len(EVIDENCE_BINS) + 1} weights separated by ';'")
        if any(not 0.0 <= w < 1.0 for row in rows for w in row):
            raise ValueError("history weights must lie in [0, 1)")
        return cls(rows)

    def __str__(self) -> str:
        return ";".join(",".join(f"{w:.4g}" for w in row) for row in self.weights)


@dataclass
class UserTokens:
    """One user's history seen through one model's tokens: the unigram counts as a vector over the vocabulary
    and the units it lacks, kept up to date as the history learns (``UserHistory.views``)."""

    vocab_size: int
    encode: Callable[[str], list[int]]  # the tokenizer's
    words: bool  # a word model: a unit is one token or none
    half_life: float
    ids: dict[str, int] = field(default_factory=dict)  # unit key -> id (past vocab_size: a unit it lacks)
    extra: list[str] = field(default_factory=list)  # the keys of the units it lacks, by id - vocab_size
    reference: float | None = None  # the time the stored unigram counts are decayed to

    def __post_init__(self) -> None:
        self.unigram = np.zeros(self.vocab_size, dtype=np.float64)

    def id_of(self, key: str, shown: str) -> int:
        found = self.ids.get(key)
        if found is None:
            tokens = self.encode(shown)
            if tokens and tokens[0] != UNK and (len(tokens) == 1 or not self.words):
                found = tokens[0]
            else:
                found = self.vocab_size + len(self.extra)
                self.extra.append(key)
                self.unigram = np.concatenate([self.unigram, np.zeros(1)])
            self.ids[key] = found
        return found

    def add(self, key: str, shown: str, count: float, when: float) -> None:
        """``count`` more uses of the unit ``key`` at time ``when``."""
        if self.reference is None:
            self.reference = when
        elif (when - self.reference) / self.half_life > REBASE:
            self.unigram *= 2.0 ** (-(when - self.reference) / self.half_life)
            self.reference = when
        slot = self.id_of(key, shown)
        self.unigram[slot] += count * 2.0 ** ((when - self.reference) / self.half_life)


SERVED_WEIGHTS = LearnedWeights()


def tokens_of(history, tokenizer) -> UserTokens:
    """``history`` seen through ``tokenizer``'s tokens, built once and then kept up to date by the history."""
    view = history.views.get(tokenizer)
    if view is None:
        view = UserTokens(tokenizer.vocab_size, tokenizer.encode, tokenizer.kind == "word", history.config.half_life)
        for key, (count, last) in list(history.followers.get((), {}).items()):
            view.add(key, history.shown.get(key, key), count, last)
        history.views[tokenizer] = view
    return view


@dataclass(frozen=True)
class Lacking:
    """The units a vocabulary lacks, as the mix gives them: their written forms and probabilities."""

    words: Sequence[str] = ()
    probabilities: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def top(self, k: int) -> list[tuple[str, float]]:
        if not len(self.words) or k <= 0:
            return []
        best = np.argsort(-self.probabilities, kind="stable")[:k]
        return [(self.words[i], float(self.probabilities[i])) for i in best if self.probabilities[i] > 0]

    def starting(self, prefix: str, normalize) -> list[tuple[str, float]]:
        """Those whose normalised form starts with ``prefix`` (normalised), best first."""
        found = [
            (word, float(p))
            for word, p in zip(self.words, self.probabilities)
            if p > 0 and normalize(word).startswith(prefix)
        ]
        return sorted(found, key=lambda item: -item[1])


NOTHING_LACKING = Lacking()


@dataclass
class UserDistribution:
    """P_user over a model's tokens and the units it lacks, and the bucket of its context."""

    probabilities: np.ndarray  # [V + extra]
    seen: int  # the longest context typed before (0: none)
    evidence: float  # how often: that context's decayed count (or, for 0, every unit's)

    def over_tokens(self, vocab_size: int) -> np.ndarray:
        """[V]: the units the vocabulary lacks are ``<unk>``."""
        tokens = self.probabilities[:vocab_size].copy()
        tokens[UNK] += self.probabilities[vocab_size:].sum()
        return tokens


def distribution(history, view: UserTokens, context: Sequence[str], now: float) -> UserDistribution | None:
    """P_user(next unit | the units ``context``) at time ``now``, or None for a user with no history."""
    total = view.unigram.sum()
    if total <= 0:
        return None
    probabilities = view.unigram / total
    decay = 2.0 ** (-(now - (view.reference or now)) / view.half_life)
    seen, evidence = 0, total * decay
    recent: list[str] = []
    for unit in reversed(context[-(history.config.order - 1) :] if history.config.order > 1 else []):
        if not unit:
            break  # a break (punctuation): what came before is another clause
        recent.insert(0, unit.casefold())
    rate = 1.0 / view.half_life
    for n in range(1, len(recent) + 1):
        followers = history.followers.get(tuple(recent[-n:]))
        if not followers:
            break  # a longer context contains this one: not typed either
        ids = np.fromiter((view.id_of(w, history.shown.get(w, w)) for w in followers), dtype=np.int64)
        counts = np.fromiter(
            (c * 2.0 ** (min(0.0, last - now) * rate) for c, last in followers.values()), dtype=np.float64
        )
        if len(view.unigram) > len(probabilities):  # a unit new to the view
            probabilities = np.concatenate([probabilities, np.zeros(len(view.unigram) - len(probabilities))])
        count, types = float(counts.sum()), len(counts)
        if count <= 0:
            break
        probabilities *= types / (count + types)
        np.add.at(probabilities, ids, counts / (count + types))
        seen, evidence = n, count
    return UserDistribution(probabilities, seen, evidence)


def mix(served: np.ndarray, user: UserDistribution, weight: float) -> tuple[np.ndarray, np.ndarray]:
    """(the mixed probabilities over the vocabulary [V], those of the units it lacks [extra])."""
    vocab = len(served)
    mixed = (1.0 - weight) * served + weight * user.probabilities[:vocab]
    lacking = weight * user.probabilities[vocab:]
    mixed[UNK] += float(lacking.sum())
    return mixed, lacking


def history_share(weight, user: np.ndarray, served: np.ndarray) -> np.ndarray:
    """The history's share of each token's probability in the mix with ``weight``: EM's expectation step."""
    mine = weight * user
    return mine / np.maximum(mine + (1 - weight) * served, 1e-300)


def fit(
    served: np.ndarray,
    user: np.ndarray,
    buckets: np.ndarray,
    shape: tuple[int, int],
    prior: LearnedWeights | None = None,
    iterations: int = 30,
):
    """EM, one weight per bucket: ``served`` and ``user`` are each token's probability under the served model
    and under P_user, ``buckets`` its bucket (seen * columns + bin); at least ``MIN_WEIGHT``. A bucket with
    fewer than ``MIN_FIT_TOKENS`` tokens keeps its weight in ``prior`` (without one, ``MIN_WEIGHT``)."""
    rows, columns = shape
    weights = np.full(rows * columns, MIN_WEIGHT)
    if prior is not None:
        weights = np.array(
            [prior.weights[min(r, len(prior.weights) - 1)][c] for r in range(rows) for c in range(columns)]
        )
    for b in range(rows * columns):
        chosen = buckets == b
        if chosen.sum() < MIN_FIT_TOKENS:
            continue
        s, u, w = served[chosen], user[chosen], 0.1
        for _ in range(iterations):
            share = history_share(w, u, s)
            w = float(share.mean())
        weights[b] = min(max(round(w, 4), MIN_WEIGHT), 0.99)
    return LearnedWeights(tuple(tuple(float(x) for x in weights[r * columns : (r + 1) * columns]) for r in range(rows)))


# tokens: what the starting weight of a bucket counts for against the user's own typing in it; chosen on
# validation text, the least summed log-perplexity of two (benchmarks/online_prior.py; 1 and 2 tie there)
ONLINE_PRIOR = 1.0


class OnlineWeights:
    """One user's history weights, fitted as they type: each bucket's weight moves from its start toward the
    mean share of the history in the mixed probability of the tokens the user typed in it (one EM step per
    token, each share taken with the weight of the moment), as if the start had been seen on ``prior``
    tokens. A user whose history does not help (text the model knows) drifts toward ``MIN_WEIGHT``, one whose
    history does (names, a domain of their own) upward. Counts only: no text. The server keeps the sums with
    each user's history (``UserHistory.online``), per model."""

    def __init__(self, start: LearnedWeights, prior: float = ONLINE_PRIOR) -> None:
        self.start = np.array(start.weights, dtype=np.float64)
        self.prior = prior
        self.shares = np.zeros_like(self.start)  # summed shares of the history, by bucket
        self.counts = np.zeros_like(self.start)  # tokens, by bucket
        self.current = start

    def shares_of(self, served: np.ndarray, user: np.ndarray, buckets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each typed token's probability under the served model and under P_user, and its bucket (``bucket_of``;
        -1: no history, not counted), as (summed share, tokens) per bucket (flat), under the weights of now."""
        shares, counts = np.zeros(self.start.size), np.zeros(self.start.size)
        known = (buckets >= 0) & (buckets < self.start.size)
        if known.any():
            weights = np.array(self.current.weights, dtype=np.float64).reshape(-1)[buckets[known]]
            np.add.at(shares, buckets[known], history_share(weights, user[known], served[known]))
            np.add.at(counts, buckets[known], 1.0)
        return shares, counts

    def add(self, shares: np.ndarray, counts: np.ndarray) -> LearnedWeights:
        """Add summed shares and tokens per bucket (flat, as ``shares_of`` gives them): the weights from now on."""
        self.shares += shares.reshape(self.start.shape)
        self.counts += counts.reshape(self.start.shape)
        fitted = (self.prior * self.start + self.shares) / (self.prior + self.counts)
        table = np.clip(fitted, MIN_WEIGHT, 0.99)
        self.current = LearnedWeights(tuple(tuple(round(float(w), 4) for w in row) for row in table))
        return self.current

    def observe(self, served: np.ndarray, user: np.ndarray, buckets: np.ndarray) -> LearnedWeights:
        """``shares_of`` these tokens, added: the weights from now on."""
        return self.add(*self.shares_of(served, user, buckets))


def token_probability(user: UserDistribution | None, target: int, vocab_size: int) -> float:
    """P_user of the token ``target`` (``<unk>``: with every unit the vocabulary lacks); 0 without a history."""
    if user is None or target < 0 or target >= vocab_size:
        return 0.0
    mine = float(user.probabilities[target])
    if target == UNK:
        mine += float(user.probabilities[vocab_size:].sum())
    return mine


def log_loss(served: np.ndarray, user: np.ndarray, buckets: np.ndarray, weights: LearnedWeights) -> float:
    """Mean negative log-probability of the tokens under the mix with ``weights`` (no history: bucket -1)."""
    table = np.append(np.array(weights.weights, dtype=np.float64).flatten(), 0.0)  # [-1]: no history, weight 0
    w = table[buckets]
    return -float(np.log(np.maximum((1 - w) * served + w * user, 1e-300)).mean())


def bucket_of(user: UserDistribution | None, rows: int) -> int:
    """The bucket index of a distribution for ``fit`` (-1: no history)."""
    if user is None:
        return -1
    return min(user.seen, rows - 1) * (len(EVIDENCE_BINS) + 1) + evidence_bin(user.evidence)
