"""``nextword-eval --pinyin``: convert held-out Chinese back from its pinyin, as an input method's user types it.

Each line is cut into clauses at punctuation; a clause's pinyin comes from pypinyin (toneless, v for ü,
joined without separators) and is converted after the text before it in the line. Reported per ranker:

    character accuracy   of the top whole-clause conversion (1 - edit distance / clause length)
    clause accuracy      the top whole-clause conversion is the clause
    first word top-1/5   jieba's first word of the clause among the first words of the candidates
    letters per char     a user types the pinyin letter by letter and takes the clause as soon as the top 5
                         show it whole (a key to select), else types on; at the end takes the longest
                         right leading part and goes on with the rest (KySS-style; fewer is better)
    initials top-1/5     words of 2-4 characters typed as their initials (zgr), in context
    next word top-1/3    association: after the text up to a word boundary (jieba's), the first
                         suggestions of Suggest are the next whole word (network and mix only)

Rankers: the dictionary prior alone (jieba frequencies), the n-gram baseline (its own order, built from
--train with the model's tokenizer), the network alone, and the served mix (network + n-gram memory).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from service.model.mix import served_model
from service.model.pinyin import ConvertConfig, Converter, PriorOnly
from service.model.pinyin_lattice import Lexicon
from service.model.steps import ScriptedModel
from service.model.tokenizer import JiebaTokenizer

CLAUSE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]+")
TYPING_CANDIDATES = 5


@dataclass
class PinyinTally:
    clauses: int = 0
    characters: int = 0
    char_errors: int = 0
    clause_hits: int = 0
    first_word: list[int] = field(default_factory=lambda: [0, 0])  # hits at 1, at 5
    typed_clauses: int = 0
    typed_characters: int = 0
    keys: int = 0
    initials: int = 0
    initials_hits: list[int] = field(default_factory=lambda: [0, 0])
    boundaries: int = 0
    next_word: list[int] = field(default_factory=lambda: [0, 0])  # hits at 1, at 3
    seconds: float = 0.0
    calls: int = 0

    def report(self) -> dict:
        def share(part: float, whole: float) -> float | None:
            return part / whole if whole else None

        return {
            "clauses": self.clauses,
            "character_accuracy": share(self.characters - self.char_errors, self.characters),
            "clause_accuracy": share(self.clause_hits, self.clauses),
            "first_word_top1": share(self.first_word[0], self.clauses),
            "first_word_top5": share(self.first_word[1], self.clauses),
            "letters_per_character": share(self.keys, self.typed_characters),
            "initials_words": self.initials,
            "initials_top1": share(self.initials_hits[0], self.initials),
            "initials_top5": share(self.initials_hits[1], self.initials),
            "next_word_top1": share(self.next_word[0], self.boundaries),
            "next_word_top3": share(self.next_word[1], self.boundaries),
            "convert_ms": 1000 * self.seconds / self.calls if self.calls else None,
        }


ROWS = (
    ("character_accuracy", "character accuracy", True),
    ("clause_accuracy", "clause accuracy", True),
    ("first_word_top1", "first word top-1", True),
    ("first_word_top5", "first word top-5", True),
    ("letters_per_character", "letters typed per character", False),
    ("initials_top1", "initials top-1 (2-4 char words)", True),
    ("initials_top5", "initials top-5 (2-4 char words)", True),
    ("next_word_top1", "next whole word top-1", True),
    ("next_word_top3", "next whole word top-3", True),
    ("convert_ms", "ms per conversion", False),
)


def reading(text: str) -> list[str]:
    from pypinyin import Style, lazy_pinyin

    return lazy_pinyin(text, style=Style.NORMAL, v_to_u=False, errors="ignore")


def edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def clauses(line: str, max_letters: int) -> list[tuple[str, str, list[str]]]:
    """(text before, clause, its syllables) for each run of Han characters whose pinyin fits."""
    out = []
    for match in CLAUSE.finditer(line):
        syllables = reading(match.group())
        if len(syllables) == len(match.group()) and sum(map(len, syllables)) <= max_letters:
            out.append((line[: match.start()], match.group(), syllables))
    return out


def typed_keys(convert: Callable, context: str, clause: str, syllables: list[str]) -> int:
    """Keys a user presses for ``clause``: letters, and one per candidate taken."""
    keys = 0
    while clause:
        letters = "".join(syllables)
        typed = ""
        taken = None
        for letter in letters:
            typed += letter
            keys += 1
            candidates = convert(context, typed, TYPING_CANDIDATES)
            if any(c.text == clause for c in candidates):
                taken = len(clause)
                break
        if taken is None:  # all typed: take the longest right leading part, go on with the rest
            candidates = convert(context, letters, TYPING_CANDIDATES * 2)
            right = [
                len(c.text)
                for c in candidates
                if clause.startswith(c.text) and c.consumed == sum(map(len, syllables[: len(c.text)]))
            ]
            taken = max(right, default=0)
            if taken == 0:  # no candidate is right: the user gives up on the clause (counted as typed)
                return keys + len(clause)
        keys += 1
        context, clause, syllables = context + clause[:taken], clause[taken:], syllables[taken:]
    return keys


def evaluate_ranker(
    convert: Callable,
    lines: Sequence[str],
    max_letters: int,
    typing_clauses: int,
    initials_words: int,
    seed: int = 0,
    learning=None,
    suggest: Callable | None = None,
    association_words: int = 0,
) -> PinyinTally:
    """Every metric of one ranker (``convert``; ``suggest`` for association) over the lines, in order. With
    ``learning`` (training/scoring.py Learning), a user whose history learns each line after it is typed and is
    mixed into every conversion and suggestion (``convert(..., personal=)``, ``suggest(..., personal)``)."""
    tally = PinyinTally()
    personal = None

    def timed(context: str, pinyin: str, count: int):
        started = time.perf_counter()
        found = convert(context, pinyin, count, personal=personal) if personal else convert(context, pinyin, count)
        tally.seconds += time.perf_counter() - started
        tally.calls += 1
        return found

    plan = _plan(lines, max_letters, typing_clauses, initials_words, association_words if suggest else 0, seed)
    for index, line in enumerate(lines):
        personal = learning.personal() if learning is not None and len(learning.history) else None
        for before, clause, syllables in plan.clauses.get(index, ()):
            _convert_clause(timed, tally, before, clause, syllables)
        for before, clause, syllables in plan.typed.get(index, ()):
            tally.typed_clauses += 1
            tally.typed_characters += len(clause)
            tally.keys += typed_keys(timed, before, clause, syllables)
        for before, word, initials in plan.initials.get(index, ()):
            candidates = [c.text for c in timed(before, initials, 9) if c.consumed == len(initials)]
            tally.initials += 1
            tally.initials_hits[0] += candidates[:1] == [word]
            tally.initials_hits[1] += word in candidates[:5]
        for before, following in plan.places.get(index, ()):
            found = suggest(before, 3, personal) if personal else suggest(before, 3)  # type: ignore[misc]
            shown = [text for text, _ in found.suggestions]
            tally.boundaries += 1
            tally.next_word[0] += shown[:1] == [following]
            tally.next_word[1] += following in shown
        if learning is not None:
            learning.typed(line)
    return tally


def _convert_clause(timed: Callable, tally: PinyinTally, before: str, clause: str, syllables: list[str]) -> None:
    pinyin = "".join(syllables)
    candidates = timed(before, pinyin, 9)
    whole = [c for c in candidates if c.consumed == len(pinyin)]
    best = whole[0].text if whole else ""
    tally.clauses += 1
    tally.characters += len(clause)
    tally.char_errors += min(len(clause), edit_distance(best, clause))
    tally.clause_hits += best == clause
    first = JiebaTokenizer.segment(clause)[0]
    firsts = list(dict.fromkeys(c.words[0] if c.words else c.text for c in candidates))
    tally.first_word[0] += firsts[:1] == [first]
    tally.first_word[1] += first in firsts[:5]


@dataclass
class _Plan:
    """What is asked at each line (by index): clauses converted, clauses typed letter by letter, words typed as
    initials, and word boundaries for association."""

    clauses: dict[int, list] = field(default_factory=dict)
    typed: dict[int, list] = field(default_factory=dict)
    initials: dict[int, list] = field(default_factory=dict)
    places: dict[int, list] = field(default_factory=dict)


def _plan(lines: Sequence[str], max_letters: int, typing: int, initials: int, association: int, seed: int) -> _Plan:
    plan = _Plan()
    every = [(i, item) for i, line in enumerate(lines) for item in clauses(line, max_letters)]
    for i, item in every:
        plan.clauses.setdefault(i, []).append(item)
    rng = random.Random(seed)
    for i, item in rng.sample(every, min(typing, len(every))):
        plan.typed.setdefault(i, []).append(item)
    words: list[tuple[int, tuple[str, str, str]]] = []
    for i, line in enumerate(lines):
        at = 0
        for word in JiebaTokenizer.segment(line):
            if 2 <= len(word) <= 4 and CLAUSE.fullmatch(word):
                syllables = reading(word)
                if len(syllables) == len(word):
                    words.append((i, (line[:at], word, "".join(s[0] for s in syllables))))
            at += len(word)
    for i, word_at in rng.sample(words, min(initials, len(words))):
        plan.initials.setdefault(i, []).append(word_at)
    places: list[tuple[int, tuple[str, str]]] = []
    for i, line in enumerate(lines):
        at = 0
        segmented = JiebaTokenizer.segment(line)
        for word, following in zip(segmented, segmented[1:]):
            at += len(word)
            if CLAUSE.fullmatch(word) and CLAUSE.fullmatch(following):
                places.append((i, (line[:at], following)))
    for i, place in random.Random(seed).sample(places, min(association, len(places))):
        plan.places.setdefault(i, []).append(place)
    return plan


def rankers(artifact, ngram_model, config: ConvertConfig, prior_only_weight: float = 1.0) -> dict[str, Converter]:
    """The four rankers over one lexicon: prior alone, the n-gram baseline, the network, the served mix."""
    lexicon = Lexicon.load()
    tokenizer = artifact.tokenizer
    network = ScriptedModel(artifact.model, tokenizer.vocab_size)
    out = {
        "prior": Converter(
            PriorOnly(tokenizer.vocab_size),
            tokenizer,
            lexicon,
            ConvertConfig(prior_weight=prior_only_weight, abbreviation_penalty=config.abbreviation_penalty),
        ),
    }
    if ngram_model is not None:
        out["ngram"] = Converter(ngram_model, tokenizer, lexicon, config)
    out["network"] = Converter(network, tokenizer, lexicon, config)
    if artifact.memory is not None:
        out["mix"] = Converter(served_model(network, artifact), tokenizer, lexicon, config)
    return out


def format_pinyin_table(results: dict[str, dict]) -> str:
    names = list(results)
    rows = [["", *names]]
    for key, label, percent in ROWS:
        row = [label]
        for name in names:
            value = results[name].get(key)
            row.append("n/a" if value is None else f"{100 * value:.1f} %" if percent else f"{value:.2f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in rows)
