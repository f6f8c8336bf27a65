"""Corpus reading, the token stream, and how it is cut into batches.

Each non-empty line is one sequence ``<s> tokens </s>``; the sequences of an
epoch (line order shuffled by seed + epoch) are joined into one stream, which
is laid out as ``batch_size`` contiguous rows and walked in windows of
``bptt`` columns, carrying the recurrent state from one window to the next:

    stream: a b c d e f g h i j k l m n o p q r s t u v w x
    batch_size 4:   row 0: a b c d e f     window 0 = columns [0, bptt)
                    row 1: g h i j k l     window 1 = columns [bptt, 2*bptt)
                    row 2: m n o p q r     ...
                    row 3: s t u v w x
    inputs = rows[:, i : i+bptt]     targets = rows[:, i+1 : i+1+bptt]

With several processes (torchrun), process r of W takes rows
[r*B/W, (r+1)*B/W) of the same layout: its own contiguous shard of the stream.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from service.model.tokenizer import BOS, EOS, Tokenizer


class CorpusError(ValueError):
    """A corpus file cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Corpus:
    paths: tuple[str, ...]
    lines: list[str]
    sha256: dict[str, str]


def read_corpus(paths: Sequence[str], encoding_errors: str = "strict") -> Corpus:
    """Read UTF-8 text files; each non-empty (stripped) line is one sequence."""
    lines: list[str] = []
    hashes: dict[str, str] = {}
    for path in paths:
        if not os.path.isfile(path):
            raise CorpusError(f"corpus file not found: {path}")
        digest = hashlib.sha256()
        count_before = len(lines)
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                digest.update(raw)
                try:
                    text = raw.decode("utf-8", errors=encoding_errors)
                except UnicodeDecodeError as error:
                    raise CorpusError(
                        f"{path}: line {number} is not valid UTF-8 (byte {error.start}); "
                        "fix the file or pass --encoding-errors replace"
                    ) from None
                text = text.strip()
                if text:
                    lines.append(text)
        if len(lines) == count_before:
            raise CorpusError(f"corpus file is empty (no non-blank lines): {path}")
        hashes[os.path.basename(path)] = digest.hexdigest()
    return Corpus(tuple(paths), lines, hashes)


def split_lines(lines: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A random split by line: (train, validation), ``fraction`` of lines to validation."""
    order = torch.randperm(len(lines), generator=torch.Generator().manual_seed(seed)).tolist()
    count = max(1, round(len(lines) * fraction)) if fraction > 0 else 0
    held = set(order[:count])
    train = [line for i, line in enumerate(lines) if i not in held]
    val = [line for i, line in enumerate(lines) if i in held]
    return train, val


def encode_lines(tokenizer: Tokenizer, lines: Sequence[str]) -> list[array]:
    return [array("l", [BOS, *tokenizer.encode(line), EOS]) for line in lines]


def make_stream(sequences: Sequence[array], shuffle_seed: int | None = None) -> Tensor:
    """Join sequences into one token stream [N], shuffled by line when a seed is given."""
    order: Sequence[int] = range(len(sequences))
    if shuffle_seed is not None:
        order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
    joined = array("l")
    for i in order:
        joined.extend(sequences[i])
    return torch.frombuffer(joined, dtype=torch.int64).clone() if joined else torch.zeros(0, dtype=torch.int64)


def batchify(stream: Tensor, batch_size: int, rank: int = 0, world_size: int = 1) -> Tensor:
    """[N] -> this process's rows [batch_size / world_size, N // batch_size] (see the diagram above)."""
    columns = stream.numel() // batch_size
    rows = stream[: columns * batch_size].view(batch_size, columns)
    per_rank = batch_size // world_size
    return rows[rank * per_rank : (rank + 1) * per_rank]


def num_windows(rows: Tensor, bptt: int) -> int:
    return max(0, (rows.size(1) - 1 + bptt - 1) // bptt)


def windows(rows: Tensor, bptt: int, start: int = 0) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Yield (window index, inputs [B, t], targets [B, t]) from window ``start`` on."""
    for index in range(start, num_windows(rows, bptt)):
        i = index * bptt
        length = min(bptt, rows.size(1) - 1 - i)
        yield index, rows[:, i : i + length], rows[:, i + 1 : i + 1 + length]
