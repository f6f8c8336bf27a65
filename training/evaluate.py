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
from dataclasses import dataclass

import torch
from tqdm import tqdm

from service.model.artifact import Artifact, ArtifactError, load_artifact
from service.model.command_line import build_parser, config_from, option
from service.model.mix import served_model
from service.model.personal import HistoryConfig
from service.model.personal_tokens import ONLINE_PRIOR, LearnedWeights
from service.model.pinyin import ConvertConfig
from service.model.pinyin_lattice import MAX_PINYIN_LETTERS, reads_chinese
from service.model.steps import ScriptedModel
from service.model.suggest import Suggester
from service.model.tokenizer import Tokenizer
from training.data import CorpusError, read_corpus
from training.ngram import NgramCounts, NgramStepModel
from training.pinyin_eval import evaluate_ranker, format_pinyin_table, rankers
from training.scoring import Learning, Scorer, Tally, score
from training.tables import by_context, format_by_context, format_learning_table, format_table

PROG = "nextword-eval"
PINYIN = "pinyin conversion (a Chinese model; training/pinyin_eval.py)"


@dataclass(frozen=True)
class EvaluateConfig:
    model: str = option(help="a model file from nextword-export", positional=True)
    text: str = option(help="held-out UTF-8 text, one sequence per line", required=True, metavar="PATH")
    baseline: str | None = option(None, "also score an n-gram model on the same text", choices=["ngram"])
    ranking: str = option(
        "kneser-ney",
        "what the n-gram baseline ranks its suggestions by: its own Kneser-Ney probabilities, or stupid backoff",
        choices=["kneser-ney", "backoff"],
    )
    against: str | None = option(
        None, "also score another model file on the same text (for example float against int8)", metavar="MODEL"
    )
    train: tuple[str, ...] = option(
        (), "training text for the baseline (the model's own training split)", metavar="PATH"
    )
    order: int = option(4, "n-gram order, 3 to 5", low=3, high=5)
    suggestions: int = option(3, "suggestions shown for the keystroke savings rate", low=1, high=20)
    max_lines: int | None = option(None, "score only the first N lines", low=1)
    score_every: int = option(
        1, "score every N-th line only (with --learn the user still types and learns every line)", low=1
    )
    json: str | None = option(None, "also write the results as JSON to PATH ('-': standard output)", metavar="PATH")
    threads: int | None = option(
        None, "CPU threads for the network", low=1, high=256, default_text="torch's, one per core"
    )
    ngram: bool = option(
        True, "score the network mixed with the file's n-gram memory, as served (--no-ngram: the network alone)"
    )
    learn: bool = option(
        False,
        "also type the text in order as one user whose personal history learns each line after it is "
        "typed, and compare every metric with and without learning",
    )
    learn_rule: str = option(
        "mix",
        "with --learn: mix, the history as part of the served distribution; both, and also the rule served "
        "before it (suggestions re-ranked: training/rerank_rule.py) in the same table; online, and also the "
        "history's weights fitted to the user as they type, as the server fits them (OnlineWeights in "
        "service/model/personal_tokens.py) in the same table; all, the three",
        choices=["mix", "both", "online", "all"],
    )
    fit_lines: int = option(
        0,
        "with --learn: the user types the first N lines to fit the history's weights in the mix (then every "
        "model is scored on the lines after them)",
        low=0,
    )
    history_order: int = option(
        HistoryConfig.order, "with --learn: the user's n-gram orders 1..N, as the server's --history-order", low=1
    )
    online_prior: float = option(
        ONLINE_PRIOR,
        "with --learn-rule online: how many tokens the starting weights count as against the user's own",
        low=1.0,
    )
    history_weights: str = option(
        "",
        "with --learn: the history's weights (rows ';', weights ','; service/model/personal_tokens.py)",
        default_text="the served ones",
    )
    pinyin: bool = option(
        False,
        "instead of next words: convert each clause of --text back from its pinyin and compare the "
        "dictionary prior, the n-gram baseline (with --baseline ngram), the network and the served mix",
        group=PINYIN,
    )
    prior_weight: float = option(
        ConvertConfig.prior_weight,
        "weight of the dictionary's log-frequency next to the model's (the default is the served one)",
        low=0.0,
        group=PINYIN,
    )
    abbreviation_penalty: float = option(
        ConvertConfig.abbreviation_penalty,
        "subtracted per syllable typed as an initial or partly (the default is the served one)",
        low=0.0,
        group=PINYIN,
    )
    rankers: str = option(
        "prior,ngram,network,mix",
        "which rankers to run, of prior, ngram (needs --baseline ngram), network and mix",
        group=PINYIN,
    )
    beam: int = option(
        ConvertConfig.beam, "hypotheses kept per syllable (the default is the served one)", low=1, group=PINYIN
    )
    typing_clauses: int = option(
        100, "clauses typed letter by letter for letters per character (sampled by seed 0)", low=0, group=PINYIN
    )
    initials_words: int = option(
        300, "words of 2-4 characters typed as initials (sampled by seed 0)", low=0, group=PINYIN
    )
    association_words: int = option(
        1000,
        "word boundaries where Suggest's first suggestions meet the next whole word (sampled by seed 0)",
        low=0,
        group=PINYIN,
    )
    quiet: bool = option(False, "no progress bar (there is none either when standard error is not a terminal)")


@dataclass
class Inputs:
    """What an evaluation reads: the model file(s) and the text."""

    artifact: Artifact
    other: Artifact | None
    lines: list[str]
    train_lines: list[str]
    fit_lines: list[str]  # with --learn --fit-lines: typed first, to fit the history's weights


def parse_args(argv: list[str] | None) -> EvaluateConfig:
    parser = build_parser(
        PROG,
        "Judge a nextword model on held-out text: perplexity, top-k next-word accuracy, keystroke savings and "
        "word completion.",
        EvaluateConfig,
    )
    config = config_from(EvaluateConfig, parser.parse_args(argv))
    if config.baseline and not config.train:
        parser.error("--baseline ngram needs --train PATH (the text the model was trained on)")
    if config.baseline and config.against:
        parser.error("--baseline and --against are exclusive: compare with one of them")
    if (config.fit_lines or config.history_weights) and not config.learn:
        parser.error("--fit-lines and --history-weights go with --learn")
    if config.history_weights:
        try:
            LearnedWeights.parse(config.history_weights)
        except ValueError as error:
            parser.error(str(error))
    return config


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        lines = read_corpus([config.text]).lines
        inputs = Inputs(
            load_artifact(config.model),
            load_artifact(config.against) if config.against else None,
            lines[config.fit_lines :][: config.max_lines],
            read_corpus(list(config.train)).lines if config.baseline else [],
            lines[: config.fit_lines],
        )
    except (ArtifactError, CorpusError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    if config.fit_lines and not inputs.lines:
        print(
            f"{PROG}: --fit-lines {config.fit_lines} leaves none of {config.text}'s {len(lines)} lines to score",
            file=sys.stderr,
        )
        return 2
    if config.pinyin:
        return _pinyin(config, inputs)
    counts = (
        NgramCounts.from_text(inputs.train_lines, inputs.artifact.tokenizer, config.order) if config.baseline else None
    )
    results, tallies = run(config, inputs, counts)
    report(config, inputs, results, tallies, counts)
    return 0


def network_scorer(name: str, artifact, ngram: bool = True) -> tuple[Scorer, Tokenizer]:
    """What a model file serves, for perplexity and ranking alike: the network mixed with the file's n-gram
    memory (``ngram`` and the file has one) or the network alone; with the tokenizer it reads text with."""
    model = served_model(ScriptedModel(artifact.model, artifact.tokenizer.vocab_size), artifact, ngram)
    return Scorer(name, model, model), artifact.tokenizer


def scorers(config: EvaluateConfig, inputs: Inputs, counts: NgramCounts | None) -> list[tuple[Scorer, Tokenizer]]:
    """The model as served; the n-gram baseline and the mix's network alone, or another model file."""
    artifact = inputs.artifact
    out = [network_scorer("model", artifact, ngram=config.ngram)]
    if counts is not None:
        kneser_ney = NgramStepModel(counts, "kneser-ney")
        ranking = kneser_ney if config.ranking == "kneser-ney" else NgramStepModel(counts, "backoff")
        out.append((Scorer(f"ngram-{config.order}", kneser_ney, ranking), artifact.tokenizer))
        if artifact.memory is not None and config.ngram:
            out.append(network_scorer("network", artifact, ngram=False))  # the mix's other component, alone
    if inputs.other is not None:
        out.append(network_scorer("against", inputs.other, ngram=config.ngram))
    return out


def run(config: EvaluateConfig, inputs: Inputs, counts: NgramCounts | None) -> tuple[dict[str, dict], dict[str, Tally]]:
    """Every scorer over the lines (and the model again, learning, with --learn): results and tallies by name."""
    found = scorers(config, inputs, counts)
    runs = [(scorer, tokenizer, scorer.name, False) for scorer, tokenizer in found]
    if config.learn:
        runs.append((*found[0], "learning", True))
        if config.learn_rule in ("both", "all"):
            runs.append((*found[0], "reranking", True))
        if config.learn_rule in ("online", "all"):
            runs.append((*found[0], "online", True))
    results: dict[str, dict] = {}
    tallies: dict[str, Tally] = {}
    for scorer, tokenizer, name, learn in runs:
        started = time.perf_counter()
        quiet = config.quiet or not sys.stderr.isatty()
        with tqdm(
            total=len(inputs.lines), desc=name, unit="line", dynamic_ncols=True, file=sys.stderr, disable=quiet
        ) as bar:
            learning = _learning(config, inputs, scorer, tokenizer, name, bar) if learn else None
            units, tallies[name] = score(
                scorer,
                tokenizer,
                inputs.lines,
                config.suggestions,
                progress=bar.update,
                learning=learning,
                every=config.score_every,
            )
        results[name] = {"units": units, **tallies[name].report(units)}
        results[name]["seconds"] = round(time.perf_counter() - started, 1)
        if learning is not None and learning.rule == "mix":
            results[name]["history_weights"] = str(learning.weights)
    return results, tallies


def _learning(config: EvaluateConfig, inputs: Inputs, scorer: Scorer, tokenizer, name: str, bar: tqdm) -> Learning:
    """The user who types the lines: the history mixed in (or, for "reranking", the rule served before; "online":
    with the weights fitted as they type), having typed the --fit-lines lines first (and fitted the weights)."""
    weights = LearnedWeights.parse(config.history_weights) if config.history_weights else LearnedWeights()
    online = config.online_prior if name.endswith("online") else None
    rule = "rerank" if name == "reranking" else "mix"
    learning = Learning(tokenizer, weights, rule, online, scorer, config.history_order)
    if name == "reranking":
        for line in inputs.fit_lines:  # typed before, as for the mix
            learning.learn(line)
    elif inputs.fit_lines:
        bar.set_description(f"{name} (fitting on {len(inputs.fit_lines)} lines)")
        learning.fit_weights(scorer, inputs.fit_lines)
        bar.set_description(name)
    return learning


def report(
    config: EvaluateConfig,
    inputs: Inputs,
    results: dict[str, dict],
    tallies: dict[str, Tally],
    counts: NgramCounts | None,
) -> None:
    """The tables on standard output, and the --json document."""
    learned = results.pop("learning", None)
    reranked = results.pop("reranking", None)
    online = results.pop("online", None)
    first, lines = results["model"], inputs.lines
    scored = len(lines[:: config.score_every])
    which = f" (every {config.score_every}th scored: {scored})" if config.score_every > 1 else ""
    print(
        f"{config.text}: {len(lines)} lines{which}, {first['targets']} {first['units']} scored, "
        f"{first['tokens']} tokens ({100 * first['unknown_token_rate']:.1f} % <unk>); "
        f"keystroke savings with {config.suggestions} suggestions"
    )
    if inputs.other is not None:
        same = inputs.other.tokenizer.to_bytes() == inputs.artifact.tokenizer.to_bytes()
        print(
            f"against: {config.against}"
            + ("" if same else " (another tokenizer: compare bits per character, not perplexity)")
        )
    print(format_table(results))
    if learned is not None:
        print("\nthe model typed in order by one user, learning each line after it is typed, against without:")
        columns = {"without": results["model"], "learning": learned}
        if reranked is not None:
            columns["learning, re-ranked"] = reranked
        if online is not None:
            columns["learning, online weights"] = online
        baseline = next((name for name in results if name.startswith("ngram-")), None)
        print(format_learning_table(columns, results[baseline] if baseline else None, baseline))
        how = "given" if config.history_weights else "the served ones"
        how = f"fitted on the first {config.fit_lines} lines typed" if config.fit_lines else how
        print(f"the history's weights ({how}; service/model/personal_tokens.py): {learned['history_weights']}")
        if online is not None:
            print(f"the user's own weights, fitted online, at the end: {online['history_weights']}")
    document = {
        "model": config.model,
        "text": config.text,
        "lines": len(lines),
        "scored_lines": scored,
        "suggestions": config.suggestions,
        "order": config.order if config.baseline else None,
        "against": config.against,
        "results": results,
    }
    if learned is not None:
        document["learning"] = learned
    if reranked is not None:
        document["learning_reranked"] = reranked
    if online is not None:
        document["learning_online"] = online
    if counts is not None:
        hits = {name: tally.first_hits for name, tally in tallies.items()}
        rows = by_context(lines, tallies["model"].context_ends, hits, inputs.artifact.tokenizer, counts)
        print(
            f"\ntop-1 by the longest context (tokens before the target, <s> included) that {', '.join(config.train)} "
            f"contains; either: the model or the n-gram ranks the target first"
        )
        print(format_by_context(rows, list(hits), config.order))
        document["by_context"] = rows
    write_json(config.json, document)


def write_json(path: str | None, document: dict) -> None:
    """--json: to the file, or to standard output for '-'."""
    if path == "-":
        print(json.dumps(document, indent=2))
    elif path:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2)


def _pinyin(config: EvaluateConfig, inputs: Inputs) -> int:
    artifact, lines = inputs.artifact, inputs.lines
    if not reads_chinese(artifact.tokenizer):
        print(f"{PROG}: {config.model} does not read Chinese; --pinyin needs a Chinese model", file=sys.stderr)
        return 2
    ngram_model = None
    if config.baseline:
        counts = NgramCounts.from_text(inputs.train_lines, artifact.tokenizer, config.order)
        ngram_model = NgramStepModel(counts, "kneser-ney")
    convert = ConvertConfig(
        prior_weight=config.prior_weight, beam=config.beam, abbreviation_penalty=config.abbreviation_penalty
    )
    wanted = config.rankers.split(",")
    runs = [(name, converter, "") for name, converter in rankers(artifact, ngram_model, convert).items()]
    kinds = ["learning"] + (["learning online"] if config.learn_rule in ("online", "all") else [])
    runs += [(f"mix, {kind}", c, kind) for n, c, _ in list(runs) for kind in kinds if config.learn and n == "mix"]
    results = {}
    for name, converter, kind in runs:
        if name.split(",")[0] not in wanted:
            continue
        started = time.perf_counter()
        scorer = Scorer("mix", converter.model, converter.model)
        learning = _learning(config, inputs, scorer, artifact.tokenizer, kind, tqdm(disable=True)) if kind else None
        suggest = (
            Suggester(converter.model, artifact.tokenizer).suggest if name.split(",")[0] in ("network", "mix") else None
        )
        tally = evaluate_ranker(
            converter.convert,
            lines,
            MAX_PINYIN_LETTERS,
            config.typing_clauses,
            config.initials_words,
            learning=learning,
            suggest=suggest,
            association_words=config.association_words,
        )
        results[name] = {**tally.report(), "seconds": round(time.perf_counter() - started, 1)}
        if learning is not None:
            results[name]["history_weights"] = str(learning.weights)
        if not config.quiet:
            print(f"{PROG}: {name} done in {results[name]['seconds']:.0f} s", file=sys.stderr)
    first = next(iter(results.values()))
    print(
        f"{config.text}: {len(lines)} lines, {first['clauses']} clauses converted from their pinyin, "
        f"{config.typing_clauses} typed letter by letter, {first['initials_words']} words as initials; "
        f"prior weight {config.prior_weight:g}"
        + (f"; n-gram: order {config.order} from {', '.join(config.train)}" if config.baseline else "")
    )
    print(format_pinyin_table(results))
    document = {"model": config.model, "text": config.text, "prior_weight": config.prior_weight, "results": results}
    write_json(config.json, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
