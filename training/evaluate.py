"""Judge a model on held-out text, optionally against an n-gram baseline.

    python -m training.evaluate model.pt --text test.txt
    python -m training.evaluate model.pt --text test.txt --baseline ngram --train train.txt --order 4 --json out.json
    python -m training.evaluate int8.pt --text test.txt --against float.pt

Every line of the text is read on its own, from ``<s>``, as the service reads
a request. Suggestions come from the serving code itself (service/model/suggest.py),
for the network and for the baseline alike, so what is scored is what a user
would see.

Metrics
-------
* perplexity: per token of the model's tokenizer, ``</s>`` included;
  bits per character: the same log-loss over the characters of the text (a
  line break counts as one), comparable across tokenizers.
* top-1/3/5 accuracy: before each word, is it among the first k next-word
  suggestions? Text with spaces is scored word by word (words as the service
  suggests them: letters, digits, inner apostrophes; punctuation is not a
  target). Text without spaces is scored at each CJK character, and a
  suggestion (a phrase of one or more characters, as an input method's
  association shows it) counts when the text goes on with it.
* keystroke savings rate (KSR) with N suggestions: the text is typed from the
  first character to the last; before each letter of a word the first N
  suggestions are shown (next words, then completions of the letters typed),
  and a correct one is taken for one keystroke, which also enters the space
  after it. ``KSR = 1 - (keys typed + keys selecting) / characters``. Without
  spaces, each character costs one key and taking a phrase of n characters
  costs one, so the savings come from phrases.
* completion hit@1 and hit@3 after the first 1, 2 and 3 letters of each word
  longer than that (text with spaces only).

With ``--pinyin`` (a Chinese model) the text is instead converted back from its
pinyin, clause by clause, by four rankers: see training/pinyin_eval.py.

With ``--baseline ngram`` a second table splits top-1 accuracy by how much of
the context the training text contains: the longest run of tokens just before
the word (``<s>`` included, up to order - 1) that occurs in the training lines.
Where the whole n-gram context was seen, the n-gram recalls what followed it;
elsewhere it backs off. The column "either" counts the words that the model or
the n-gram ranks first: what the better of the two could get at each word.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence

import torch
from tqdm import tqdm

from service.model.artifact import ArtifactError, load_artifact
from service.model.command_line import OneLineParser, ranged
from service.model.mix import served_model
from service.model.personal import HistoryConfig
from service.model.pinyin import ConvertConfig
from service.model.pinyin_lattice import MAX_PINYIN_LETTERS, reads_chinese
from service.model.steps import ScriptedModel
from service.model.suggest import Suggester
from service.model.tokenizer import BOS, Tokenizer
from training.data import CorpusError, read_corpus
from training.ngram import NgramCounts, NgramStepModel
from training.pinyin_eval import association, evaluate_ranker, format_pinyin_table, rankers
from training.scoring import PREFIXES, Learning, Scorer, Tally, score


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
    first_hits: dict[str, Sequence[bool]],
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


def network_scorer(name: str, artifact, ngram: bool = True) -> tuple[Scorer, Tokenizer]:
    """What a model file serves, for perplexity and ranking alike: the network mixed with the file's n-gram
    memory (``ngram`` and the file has one) or the network alone; with the tokenizer it reads text with."""
    model = served_model(ScriptedModel(artifact.model, artifact.tokenizer.vocab_size), artifact, ngram)
    return Scorer(name, model, model), artifact.tokenizer


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(
        prog="nextword-eval",
        description="Judge a nextword model on held-out text: perplexity, "
        "top-k next-word accuracy, keystroke savings and word completion.",
    )
    p.add_argument("model", help="a model file from nextword-export")
    p.add_argument("--text", required=True, metavar="PATH", help="held-out UTF-8 text, one sequence per line")
    p.add_argument("--baseline", choices=["ngram"], help="also score an n-gram model on the same text")
    p.add_argument(
        "--against",
        metavar="MODEL",
        help="also score another model file on the same text (for example float against int8)",
    )
    p.add_argument(
        "--train",
        action="append",
        default=[],
        metavar="PATH",
        help="training text for the baseline (the model's own training split)",
    )
    p.add_argument("--order", type=ranged(int, 3, 5), default=4, help="n-gram order, 3 to 5 (default 4)")
    p.add_argument(
        "--suggestions",
        type=ranged(int, 1, 20),
        default=3,
        help="suggestions shown for the keystroke savings rate (default 3)",
    )
    p.add_argument("--max-lines", type=ranged(int, 1), default=None, help="score only the first N lines")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH ('-': standard output)")
    p.add_argument(
        "--threads",
        type=ranged(int, 1, 256),
        default=None,
        help="CPU threads for the network (default: torch's, one per core)",
    )
    p.add_argument(
        "--no-ngram",
        action="store_true",
        help="score the network alone, not mixed with the file's n-gram memory (default: as served)",
    )
    p.add_argument(
        "--learn",
        action="store_true",
        help="also type the text in order as one user whose personal history learns each line after it is "
        "typed, and compare every metric with and without learning",
    )
    p.add_argument(
        "--evidence-scale",
        type=ranged(float, 0.0, low_open=True),
        default=HistoryConfig.evidence_scale,
        help="with --learn: the history's weight is E / (E + this), E the evidence for the context "
        f"(docs/history.md; default {HistoryConfig.evidence_scale:g}, as served)",
    )
    pinyin = p.add_argument_group("pinyin conversion (a Chinese model; training/pinyin_eval.py)")
    pinyin.add_argument(
        "--pinyin",
        action="store_true",
        help="instead of next words: convert each clause of --text back from its pinyin and compare the "
        "dictionary prior, the n-gram baseline (with --baseline ngram), the network and the served mix",
    )
    pinyin.add_argument(
        "--prior-weight",
        type=ranged(float, 0.0),
        default=ConvertConfig.prior_weight,
        help=f"weight of the dictionary's log-frequency next to the model's (default {ConvertConfig.prior_weight:g},"
        " as served)",
    )
    pinyin.add_argument(
        "--abbreviation-penalty",
        type=ranged(float, 0.0),
        default=ConvertConfig.abbreviation_penalty,
        help="subtracted per syllable typed as an initial or partly (default "
        f"{ConvertConfig.abbreviation_penalty:g}, as served)",
    )
    pinyin.add_argument(
        "--rankers",
        default="prior,ngram,network,mix",
        help="which rankers to run, of prior, ngram (needs --baseline ngram), network and mix (default all)",
    )
    pinyin.add_argument(
        "--beam",
        type=ranged(int, 1),
        default=ConvertConfig.beam,
        help=f"hypotheses kept per syllable (default {ConvertConfig.beam}, as served)",
    )
    for flag, default, what in (
        ("--typing-clauses", 100, "clauses typed letter by letter for letters per character"),
        ("--initials-words", 300, "words of 2-4 characters typed as initials"),
        ("--association-words", 1000, "word boundaries where Suggest's first suggestions meet the next whole word"),
    ):
        pinyin.add_argument(
            flag, type=ranged(int, 0), default=default, help=f"{what} (default {default}, sampled by seed 0)"
        )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar (there is none either when standard error is not a terminal)",
    )
    args = p.parse_args(argv)
    if args.baseline and not args.train:
        p.error("--baseline ngram needs --train PATH (the text the model was trained on)")
    if args.baseline and args.against:
        p.error("--baseline and --against are exclusive: compare with one of them")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        artifact = load_artifact(args.model)
        other = load_artifact(args.against) if args.against else None
        lines = read_corpus([args.text]).lines[: args.max_lines]
        train_lines = read_corpus(args.train).lines if args.baseline else []
    except (ArtifactError, CorpusError) as error:
        print(f"nextword-eval: {error}", file=sys.stderr)
        return 2
    tokenizer = artifact.tokenizer
    if args.pinyin:
        return _pinyin(args, artifact, lines, train_lines)
    scorers = [network_scorer("model", artifact, ngram=not args.no_ngram)]
    if args.baseline:
        counts = NgramCounts.from_text(train_lines, tokenizer, args.order)
        scorers.append(
            (
                Scorer(f"ngram-{args.order}", NgramStepModel(counts, "kneser-ney"), NgramStepModel(counts, "backoff")),
                tokenizer,
            )
        )
    if args.baseline and artifact.memory is not None and not args.no_ngram:
        scorers.append(network_scorer("network", artifact, ngram=False))  # the mix's other component, alone
    if other is not None:
        scorers.append(network_scorer("against", other, ngram=not args.no_ngram))
    results: dict[str, dict] = {}
    tallies: dict[str, Tally] = {}
    runs = [(scorer, scorer_tokenizer, scorer.name, False) for scorer, scorer_tokenizer in scorers]
    if args.learn:
        runs.append((*scorers[0], "learning", True))
    for scorer, scorer_tokenizer, name, learn in runs:
        started = time.perf_counter()
        with tqdm(
            total=len(lines),
            desc=name,
            unit="line",
            dynamic_ncols=True,
            file=sys.stderr,
            disable=args.quiet or not sys.stderr.isatty(),
        ) as bar:
            learning = Learning(scorer_tokenizer, args.evidence_scale) if learn else None
            units, tallies[name] = score(
                scorer, scorer_tokenizer, lines, args.suggestions, progress=bar.update, learning=learning
            )
        results[name] = {"units": units, **tallies[name].report(units)}
        results[name]["seconds"] = round(time.perf_counter() - started, 1)
    learned = results.pop("learning", None)
    first = results["model"]
    print(
        f"{args.text}: {len(lines)} lines, {first['targets']} {first['units']} scored, {first['tokens']} tokens "
        f"({100 * first['unknown_token_rate']:.1f} % <unk>); keystroke savings with {args.suggestions} suggestions"
    )
    if other is not None:
        print(
            f"against: {args.against}"
            + (
                ""
                if other.tokenizer.to_bytes() == tokenizer.to_bytes()
                else " (another tokenizer: compare bits per character, not perplexity)"
            )
        )
    print(format_table(results))
    if learned is not None:
        print("\nthe model typed in order by one user, learning each line after it is typed, against without:")
        print(format_table({"learning": learned, "without": results["model"]}))
    document = {
        "model": args.model,
        "text": args.text,
        "lines": len(lines),
        "suggestions": args.suggestions,
        "order": args.order if args.baseline else None,
        "against": args.against,
        "results": results,
    }
    if learned is not None:
        document["learning"] = learned
    if args.baseline:
        hits = {name: tally.first_hits for name, tally in tallies.items()}
        rows = by_context(lines, tallies["model"].context_ends, hits, tokenizer, counts)
        print(
            f"\ntop-1 by the longest context (tokens before the target, <s> included) that {', '.join(args.train)} "
            f"contains; either: the model or the n-gram ranks the target first"
        )
        print(format_by_context(rows, list(hits), args.order))
        document["by_context"] = rows
    write_json(args.json, document)
    return 0


def write_json(path: str | None, document: dict) -> None:
    """--json: to the file, or to standard output for '-'."""
    if path == "-":
        print(json.dumps(document, indent=2))
    elif path:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2)


def _pinyin(args, artifact, lines: list[str], train_lines: list[str]) -> int:
    if not reads_chinese(artifact.tokenizer):
        print(f"nextword-eval: {args.model} does not read Chinese; --pinyin needs a Chinese model", file=sys.stderr)
        return 2
    ngram_model = None
    if args.baseline:
        counts = NgramCounts.from_text(train_lines, artifact.tokenizer, args.order)
        ngram_model = NgramStepModel(counts, "kneser-ney")
    config = ConvertConfig(
        prior_weight=args.prior_weight, beam=args.beam, abbreviation_penalty=args.abbreviation_penalty
    )
    wanted = args.rankers.split(",")
    results = {}
    for name, converter in rankers(artifact, ngram_model, config).items():
        if name not in wanted:
            continue
        started = time.perf_counter()
        tally = evaluate_ranker(converter.convert, lines, MAX_PINYIN_LETTERS, args.typing_clauses, args.initials_words)
        if name in ("network", "mix"):  # association: the same model's Suggest
            association(Suggester(converter.model, artifact.tokenizer).suggest, lines, tally, args.association_words)
        results[name] = {**tally.report(), "seconds": round(time.perf_counter() - started, 1)}
        if not args.quiet:
            print(f"nextword-eval: {name} done in {results[name]['seconds']:.0f} s", file=sys.stderr)
    first = next(iter(results.values()))
    print(
        f"{args.text}: {len(lines)} lines, {first['clauses']} clauses converted from their pinyin, "
        f"{args.typing_clauses} typed letter by letter, {first['initials_words']} words as initials; "
        f"prior weight {args.prior_weight:g}"
        + (f"; n-gram: order {args.order} from {', '.join(args.train)}" if args.baseline else "")
    )
    print(format_pinyin_table(results))
    document = {"model": args.model, "text": args.text, "prior_weight": args.prior_weight, "results": results}
    write_json(args.json, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
