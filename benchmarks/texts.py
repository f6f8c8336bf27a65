"""Benchmark inputs: text before the cursor cut from the committed King James verses."""

from __future__ import annotations

import gzip
import os
import random

CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "kjv", "kjv.txt.gz")


def prompts(count: int = 500, seed: int = 0) -> list[str]:
    """Verse beginnings of 2 to 60 characters, half ending inside a word, half after a space."""
    with gzip.open(CORPUS, "rt", encoding="utf-8") as handle:
        verses = [line.strip() for line in handle if line.strip()]
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        verse = rng.choice(verses)
        cut = rng.randint(2, min(60, len(verse)))
        text = verse[:cut]
        if rng.random() < 0.5 and " " in text:
            text = text[: text.rindex(" ") + 1]
        out.append(text)
    return out


def verses() -> list[str]:
    """Every verse, in the order of the book."""
    with gzip.open(CORPUS, "rt", encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def next_word_prompts(count: int = 30, seed: int = 0) -> list[str]:
    """Verse beginnings that end after a whole word and a space (a next-word request), 1 to 8 words."""
    with gzip.open(CORPUS, "rt", encoding="utf-8") as handle:
        verses = [line.split() for line in handle if len(line.split()) > 2]
    rng = random.Random(seed)
    return [" ".join(words[: rng.randint(1, min(8, len(words) - 1))]) + " " for words in rng.sample(verses, count)]


def long_text(chars: int) -> str:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as handle:
        text = " ".join(line.strip() for _, line in zip(range(200), handle))
    return text[:chars]
