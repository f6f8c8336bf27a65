"""The n-gram memory stored in a model file: what followed each context in the training text.

A network generalises; an n-gram recalls. Where a whole context occurred in training, the n-gram
knows verbatim what came next, so the service mixes the two (service/model/mix.py). training/ counts the
n-grams at export (interpolated Kneser-Ney over the model's own tokens, the training split only);
this module lays them out (``NgramMemory.build``), reads them and answers, for a batch of contexts
at once, the next token's probability over the whole vocabulary.

The arrays, per context length k = 0 .. order-1 (the file's ``memory.npz``):

    keys_k     uint64 [C]      each context t_1 .. t_k (t_k the most recent) as a number, sorted:
                               index of t_2 .. t_k in order k - 1's contexts * V + t_1
                               (the empty context has index 0, so keys_1 are the tokens themselves)
    gamma_k    float32 [C]     the weight left for the shorter context (backoff mass)
    offsets_k  int64 [C + 1]   where each context's followers start in ids_k / probs_k
    ids_k      int32 [F]       the tokens seen after the context
    probs_k    float32 [F]     their discounted probabilities, max(count - D, 0) / total

    P(w | h) = probs_k(h, w) + gamma_k(h) * P(w | h shortened), down to the uniform distribution,
    k being the longest context of h that was seen (every shorter one was seen too).

A key chains to the shorter context's index, so any order fits 64 bits. Files written before the
``chained`` flag packed the tokens themselves, sum(t_i * V**(k - i)); they are read as they were.
"""

from __future__ import annotations

import functools
import io
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from service.model.tokenizer import BOS, PAD

# a context's row for NgramMemory.build: (context tokens, oldest first; follower ids; their probabilities; gamma)
ContextRow = tuple[tuple[int, ...], np.ndarray, np.ndarray, float]
NO_TOKEN = -1.0  # an empty place in a context (a text shorter than order - 1 tokens)


@dataclass
class MemoryOrder:
    keys: np.ndarray
    gamma: np.ndarray
    offsets: np.ndarray
    ids: np.ndarray
    probs: np.ndarray


class NgramMemory:
    def __init__(self, orders: list[MemoryOrder], vocab_size: int, chained: bool = True) -> None:
        self.orders = orders
        self.order = len(orders)
        self.vocab_size = vocab_size
        self.chained = chained  # keys chain to the shorter context's index (see the module docstring)
        uniform = np.ones(vocab_size, dtype=np.float32)
        uniform[[PAD, BOS]] = 0.0
        self.uniform = uniform / uniform.sum()

    @classmethod
    def build(cls, tables: Sequence[Sequence[ContextRow]], vocab_size: int) -> NgramMemory:
        """The memory of ``tables``: per context length k = 0 .. order-1, a row (context, follower ids,
        their probabilities, gamma) per context, laid out as the module docstring says. A context whose
        shorter context has no row (it was pruned) is left out: a lookup never reaches it."""
        orders = []
        vocab = np.uint64(vocab_size)
        position: dict[tuple, int] = {(): 0}  # each kept context of the previous order: its index there
        for k, rows in enumerate(tables):
            keys, gammas, offsets, ids, probs, kept = [], [], [0], [], [], []
            for context, follower_ids, p, gamma in rows:
                if k and context[1:] not in position:
                    continue
                # the key chains to the index of the context without its oldest token
                keys.append(np.uint64(position[context[1:]]) * vocab + np.uint64(context[0]) if k else np.uint64(0))
                kept.append(context)
                gammas.append(gamma)
                ids.append(follower_ids)
                probs.append(p)
                offsets.append(offsets[-1] + len(follower_ids))
            packed = np.array(keys, dtype=np.uint64)
            order = np.argsort(packed, kind="stable")
            position = {kept[i]: rank for rank, i in enumerate(order.tolist())}
            starts, ends = np.array(offsets[:-1])[order], np.array(offsets[1:])[order]
            flat_ids = np.concatenate(ids) if ids else np.empty(0, np.int64)
            flat_probs = np.concatenate(probs) if probs else np.empty(0)
            index = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if len(order) else np.empty(0, int)
            orders.append(
                MemoryOrder(
                    keys=packed[order],
                    gamma=np.array(gammas, dtype=np.float32)[order],
                    offsets=np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64),
                    ids=flat_ids[index].astype(np.int32),
                    probs=flat_probs[index].astype(np.float32),
                )
            )
        return cls(orders, vocab_size)

    @property
    def width(self) -> int:
        """Tokens of context it reads: order - 1 (at least one place, so the state is never empty)."""
        return max(1, self.order - 1)

    # ------------------------------------------------------------------ the file's bytes

    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {"vocab_size": np.array([self.vocab_size], dtype=np.int64)}
        if self.chained:
            arrays["chained"] = np.array([1], dtype=np.int64)
        for k, o in enumerate(self.orders):
            arrays.update(
                {
                    f"keys_{k}": o.keys,
                    f"gamma_{k}": o.gamma,
                    f"offsets_{k}": o.offsets,
                    f"ids_{k}": o.ids,
                    f"probs_{k}": o.probs,
                }
            )
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type] # numpy's stub: its first keyword
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> NgramMemory:
        """Raises ValueError for bytes that are not a memory."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                vocab_size = int(arrays["vocab_size"][0])
                chained = "chained" in arrays and bool(arrays["chained"][0])
                orders, k = [], 0
                while f"keys_{k}" in arrays:
                    orders.append(
                        MemoryOrder(*(arrays[f"{name}_{k}"] for name in ("keys", "gamma", "offsets", "ids", "probs")))
                    )
                    k += 1
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(f"unreadable n-gram memory ({type(error).__name__})") from None
        if not orders:
            raise ValueError("the n-gram memory has no orders")
        return cls(orders, vocab_size, chained)

    def entries(self) -> int:
        return sum(len(o.ids) for o in self.orders)

    # ------------------------------------------------------------------ queries

    def seen(self, contexts: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """For contexts [B, width] (NO_TOKEN where empty): the longest context length seen [B], and per
        order k >= 1 the index of each row's context in that order's arrays (-1 where unseen)."""
        rows = contexts.shape[0]
        longest = np.zeros(rows, dtype=np.int64)
        found_at: list[np.ndarray] = []
        for k, (live, at) in enumerate(self._lookup(contexts), 1):
            index = np.full(rows, -1, dtype=np.int64)
            index[live] = at
            longest[live] = k
            found_at.append(index)
        return longest, found_at

    def _lookup(self, contexts: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per order k = 1, 2, ... while any row's last k tokens were seen: those rows, and their contexts'
        indices in order k's arrays."""
        rows, width = contexts.shape
        out = []
        live = np.arange(rows)  # the rows whose context of k - 1 tokens was seen
        keys = np.zeros(rows, dtype=np.uint64)  # for the live rows: that context's index (chained keys)
        vocab = np.uint64(self.vocab_size)
        power = np.uint64(1)  # files without chained keys: V ** (k - 1), and keys hold the packed tokens
        for k in range(1, self.order):
            token = contexts[live, width - k]  # the context of the last k tokens gains its first (oldest) token
            if token.min(initial=0) < 0:  # a text shorter than k tokens: no context of k
                known = token >= 0
                live, token, keys = live[known], token[known], keys[known]
            if self.chained:
                keys = keys * vocab + token.astype(np.uint64)
            else:
                keys = keys + token.astype(np.uint64) * power
                power = power * vocab
            order_keys = self.orders[k].keys
            if not len(live) or not len(order_keys):
                break
            at = np.searchsorted(order_keys, keys)
            np.minimum(at, len(order_keys) - 1, out=at)
            hit = order_keys[at] == keys
            live, at = live[hit], at[hit]
            if not len(live):
                break
            out.append((live, at))
            keys = at.astype(np.uint64) if self.chained else keys[hit]
        return out

    @functools.cached_property
    def base(self) -> np.ndarray:
        """P(w) with no context: the unigram level over the uniform distribution [V]."""
        o = self.orders[0]
        p = self.uniform * (o.gamma[0] if len(o.gamma) else 1.0)
        if len(o.ids):
            np.add.at(p, o.ids[o.offsets[0] : o.offsets[1]], o.probs[o.offsets[0] : o.offsets[1]])
        return p.astype(np.float32)

    def parts(self, contexts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The next-token distribution of [B, width] contexts, unrolled but not added up:

            P[b] = scale[b] * base + the sparse values at (rows, ids)

        (scale: the product of every seen order's gamma [B]; each (row, id, value): a follower of one seen
        context, its discounted probability times the gammas of the longer orders). Also the longest
        context seen [B]. A caller mixes or gathers from these without building [B, V] twice."""
        found = self._lookup(contexts)
        rows = contexts.shape[0]
        longest = np.zeros(rows, dtype=np.int64)
        for k, (live, _) in enumerate(found, 1):  # a row seen at k was seen at every shorter length
            longest[live] = k
        scale = np.ones(rows, dtype=np.float32)  # the product of the gammas of the orders above, so far
        at_rows, at_ids, at_values = [], [], []
        for k in range(len(found), 0, -1):
            live, contexts = found[k - 1]
            o = self.orders[k]
            starts = o.offsets[contexts]
            lengths = o.offsets[contexts + 1] - starts
            # the followers' places in ids/probs: each context's run starts..ends, all at once
            of = np.repeat(np.arange(len(live)), lengths)
            flat = np.arange(len(of)) + (starts - np.cumsum(lengths) + lengths)[of]
            at_rows.append(live[of])
            at_ids.append(o.ids[flat])
            at_values.append(o.probs[flat] * scale[live][of])
            scale[live] *= o.gamma[contexts]
        if not at_rows:
            empty = np.zeros(0, dtype=np.int64)
            return scale, empty, empty, np.zeros(0, dtype=np.float32), longest
        return scale, np.concatenate(at_rows), np.concatenate(at_ids), np.concatenate(at_values), longest

    def probabilities(self, contexts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[B, width] contexts -> ([B, V] next-token probabilities (float32), [B] longest context seen).

        The interpolation unrolled: P = sum over seen k of (product of gamma above k) * probs_k, plus the
        product of every gamma times the base: one dense product and a sparse add (``parts``)."""
        scale, rows, ids, values, longest = self.parts(contexts)
        return self.dense(scale, rows, ids, values).numpy(), longest

    def dense(self, scale: np.ndarray, rows: np.ndarray, ids: np.ndarray, values: np.ndarray) -> Tensor:
        """``parts``' distribution added up: [B, V] float32."""
        p = torch.from_numpy(scale)[:, None] * torch.from_numpy(self.base)[None, :]
        # a token may follow several orders' contexts: their values add up
        p.view(-1).index_add_(0, torch.from_numpy(rows * self.vocab_size + ids), torch.from_numpy(values))
        return p


class MemoryModel:
    """The memory behind the engine's StepModel interface (service/model/steps.py): its state is the last
    ``width`` tokens read, as floats [1, B, width], NO_TOKEN where the text is shorter."""

    def __init__(self, memory: NgramMemory) -> None:
        self.memory = memory
        self.vocab_size = memory.vocab_size
        self.width = memory.width

    def init_state(self, batch_size: int) -> Tensor:
        return torch.full((1, batch_size, self.width), NO_TOKEN)

    def read(self, tokens: Tensor, state: Tensor) -> np.ndarray:
        """The contexts after ``tokens`` [B, T]: [B, width] int64."""
        joined = torch.cat([state[0], tokens.to(state.dtype)], dim=1)
        return joined[:, joined.size(1) - self.width :].numpy().astype(np.int64)

    def advance(self, tokens: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        contexts = self.read(tokens, state)
        probabilities, _ = self.memory.probabilities(contexts)
        with np.errstate(divide="ignore"):
            log_probs = torch.from_numpy(np.log(probabilities))
        return log_probs, torch.from_numpy(contexts.astype(np.float32)).unsqueeze(0)
