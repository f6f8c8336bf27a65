"""The tables nextword-eval prints (training/evaluate.py): metrics side by side, top-1 by the context seen."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from service.model.tokenizer import BOS, Tokenizer
from training.ngram import NgramCounts
from training.scoring import PREFIXES


def seen_context_length(context: str, tokenizer: Tokenizer, counts: NgramCounts) -> int:
    """The longest run of tokens ending the context (``<s>`` included) that the counts contain, up to order - 1."""
    ids = [BOS, *(tokenizer.encode(context) if context else [])]
    seen = 0
    for k in range(1, min(counts.order - 1, len(ids)) + 1):
        if tuple(ids[len(ids) - k :]) not in counts.raw[k]:
            break  # a longer run contains this one: it cannot have been seen either
        seen = k
    return seen


def by_context(
    lines: Sequence[str],
    context_ends: Sequence[tuple[int, int]],
    first_hits: Mapping[str, Sequence[bool]],
    tokenizer: Tokenizer,
    counts: NgramCounts,
) -> list[dict]:
    """Top-1 accuracy of each scorer, and of either, by the context length seen in training (one row each)."""
    rows: dict[int, dict] = {}
    for i, (line, end) in enumerate(context_ends):
        row = rows.setdefault(
            seen_context_length(lines[line][:end], tokenizer, counts),
            {"targets": 0, **{name: 0 for name in first_hits}, "either": 0},
        )
        row["targets"] += 1
        hits = [bool(h[i]) for h in first_hits.values()]
        for name, hit in zip(first_hits, hits):
            row[name] += hit
        row["either"] += any(hits)
    total = len(context_ends)
    return [
        {
            "context_tokens": k,
            "targets": row["targets"],
            "share": row["targets"] / total,
            **{name: row[name] / row["targets"] for name in [*first_hits, "either"]},
        }
        for k, row in sorted(rows.items())
    ]


def format_by_context(rows: list[dict], names: Sequence[str], order: int) -> str:
    header = ["context seen", "share", *(f"{n} top-1" for n in names), "either top-1"]
    table = [header]
    for row in rows:
        k = row["context_tokens"]
        label = f"{k} token{'s' if k != 1 else ''}" + (" (all)" if k == order - 1 else "")
        table.append([label, f"{100 * row['share']:.1f} %", *(f"{100 * row[n]:.1f} %" for n in [*names, "either"])])
    if rows:
        total = sum(r["targets"] for r in rows)
        table.append(
            [
                "all",
                "100.0 %",
                *(f"{100 * sum(r[n] * r['targets'] for r in rows) / total:.1f} %" for n in [*names, "either"]),
            ]
        )
    return _aligned(table)


# ---------------------------------------------------------------------------- report

_ROWS = [
    ("perplexity", "perplexity", False),
    ("bits_per_character", "bits per character", False),
    ("top1", "top-1 accuracy", True),
    ("top3", "top-3 accuracy", True),
    ("top5", "top-5 accuracy", True),
    ("ksr", "keystroke savings", True),
] + [(f"completion{n}_hit{k}", f"completion hit@{k} after {n}", True) for n in PREFIXES for k in (1, 3)]


def _cell(value, percent: bool) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f} %" if percent else f"{value:.3f}" if value < 10 else f"{value:.2f}"


def _aligned(rows: list[list[str]]) -> str:
    """Columns padded to their widest cell: the first to the left, the others to the right."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows
    )


def format_table(results: dict[str, dict]) -> str:
    """One column per scorer; with two or more, the first against the second as a ratio and a difference."""
    names = list(results)
    header = ["metric", *names] + ([f"{names[0]} / {names[1]}", "difference"] if len(names) >= 2 else [])
    rows = [header]
    for key, label, percent in _ROWS:
        values = [results[n].get(key) for n in names]
        row = [label, *(_cell(v, percent) for v in values)]
        if len(names) >= 2:
            a, b = values[:2]
            ratio = f"{a / b:.2f}x" if a is not None and b else "n/a"
            diff = f"{100 * (a - b):+.1f} pts" if percent and a is not None and b is not None else ""
            row += [ratio, diff]
        rows.append(row)
    return _aligned(rows)


def format_learning_table(columns: dict[str, dict], baseline: dict | None = None, name: str | None = None) -> str:
    """Learning against without: the first column is "without"; each other column is followed by its
    difference from it; the n-gram ``baseline`` (``name``) last, for reference."""
    names = list(columns)
    header = ["metric", names[0]]
    for other in names[1:]:
        header += [other, "difference"]
    if baseline is not None:
        header.append(name or "baseline")
    rows = [header]
    for key, label, percent in _ROWS:
        base = columns[names[0]].get(key)
        row = [label, _cell(base, percent)]
        for other in names[1:]:
            value = columns[other].get(key)
            if value is None or base is None:
                change = "n/a"
            elif percent:
                change = f"{100 * (value - base):+.1f} pts"
            else:
                change = f"{value / base:.2f}x" if base else "n/a"
            row += [_cell(value, percent), change]
        if baseline is not None:
            row.append(_cell(baseline.get(key), percent))
        rows.append(row)
    return _aligned(rows)
