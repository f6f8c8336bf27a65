"""Export a training checkpoint to one served model file.

    python -m training.export runs/kjv --out model.pt      (a run directory: its best checkpoint)
    python -m training.export runs/kjv/checkpoint_last.pt --out model.pt

The file is scripted with torch.jit.script and written through service.model.artifact.
Before it is renamed into place it is loaded back through service.model.artifact and
must give the eager model's logits and state on random inputs; otherwise the
export fails and leaves no file.

``--quantize int8``: int8 weights for CPU serving (training/int8.py): the
recurrent layers' and the output layer's weights are stored as int8 rows with a
scale each, and their inputs quantised with scales fixed at export; embeddings
and states stay float. Faster per batched step on CPU; judge its accuracy with ``nextword-eval
INT8.pt --against FLOAT.pt`` (docs/model-file.md, "int8 weights"). int8 files
run on CPU only.

``--quantize float16``: every weight stored as float16, half the network's room in the file, and
read back as float32 on any device. The network is rounded to float16 before the memory's weights
are fitted, so export fits, checks and writes the network that is served.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import numpy as np
import torch
from tqdm import tqdm

from service.model.artifact import (
    MIX_RULES,
    ArtifactError,
    Manifest,
    MemorySpec,
    Provenance,
    TokenizerSpec,
    load_artifact,
    write_artifact,
)
from service.model.command_line import build_parser, config_from, option
from service.model.memory import NgramMemory
from service.model.steps import ScriptedModel
from service.model.tokenizer import WordTokenizer, load_tokenizer
from training.checkpoint import BEST, CheckpointError, load_checkpoint
from training.config import TrainConfig
from training.data import CorpusError, read_corpus, split_lines
from training.int8 import quantize_int8
from training.mix_fit import Evidence, best_rule, collect, fit_weights, rule_sample, score_rules, top1_difference
from training.mix_fit import perplexity as mix_perplexity
from training.model import LanguageModel, ModelConfig
from training.ngram import NgramCounts, to_memory

PROG = "nextword-export"
DEFAULT_ORDER = 5  # the n-gram memory's order
DEFAULT_MIN_COUNT = 1  # keep every n-gram (a larger value gives a smaller file)
MAX_FIT_LINES = 2000  # validation lines the mixing weights are fitted on
RULE_TARGETS = 3000  # about this many targets of validation lines (at random) choose the rule
AUTO_RULE = "auto"  # --mix-rule: choose on the validation lines


class ExportError(RuntimeError):
    pass


def check_parity(eager: LanguageModel, path: str, trials: int = 3) -> float:
    """Largest difference between the eager model and the file at ``path`` on random inputs."""
    loaded = load_artifact(path).model
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        worst = (loaded.init_state(2) - eager.init_state(2)).abs().max().item()  # the start state
        for batch, length in [(1, 1), (3, 17), (2, 64)][:trials]:
            tokens = torch.randint(0, eager.vocab_size, (batch, length), generator=generator)
            state = torch.randn(eager.init_state(batch).shape, generator=generator) * 0.5
            expected_logits, expected_state = eager(tokens, state)
            logits, new_state = loaded(tokens, state)
            expected_last, _ = eager.forward_last(tokens, state)  # what the service runs
            last_logits, last_state = loaded.forward_last(tokens, state)
            worst = max(
                worst,
                (logits - expected_logits).abs().max().item(),
                (new_state - expected_state).abs().max().item(),
                (last_logits - expected_last).abs().max().item(),
                (last_state - expected_state).abs().max().item(),
            )
    return worst


QUANTIZATIONS = ("int8", "float16")


def training_lines(checkpoint: dict, corpus: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """The checkpoint's training and validation lines, split as training split them; ``corpus`` replaces
    the corpus paths it recorded (files moved). The text must be the text it was trained on."""
    config = TrainConfig.from_dict(checkpoint["train_config"])
    paths = list(corpus) or list(config.corpus)
    try:
        text = read_corpus(paths, config.encoding_errors)
    except CorpusError as error:
        raise ExportError(
            f"{error} (the n-gram memory is built from the training text: give it with --corpus "
            "PATH, or export with --ngram-order 0)"
        ) from None
    if sorted(text.sha256.values()) != sorted(checkpoint["provenance"]["corpus_sha256"].values()):
        raise ExportError(f"{', '.join(paths)} differ from the text this model was trained on")
    if config.val:
        return text.lines, read_corpus(config.val, config.encoding_errors).lines
    return split_lines(text.lines, config.val_fraction, config.seed)


def written_forms(tokenizer, lines: Sequence[str]) -> list[str] | None:
    """For a lower-cased word vocabulary: each word's most frequent written form in ``lines``
    ("lord" -> "LORD", "moses" -> "Moses"); None for other tokenizers."""
    if tokenizer.kind != "word" or not tokenizer.lowercase:
        return None
    seen: dict[str, Counter] = {}
    for line in lines:
        for word in tokenizer.split(line):
            seen.setdefault(word.lower(), Counter())[word] += 1
    return [seen[t].most_common(1)[0][0] if t in seen else t for t in tokenizer.tokens]


@contextlib.contextmanager
def _bar(total: int, desc: str, unit: str, quiet: bool) -> Iterator[tqdm]:
    """One stage of the export on standard error: a progress bar on a terminal; elsewhere (a log file) a line
    when it starts and one when it ends, with its time. ``quiet``: nothing."""
    terminal = sys.stderr.isatty()
    if not quiet and not terminal:
        print(f"{PROG}: {desc}: {total:,} {unit}s ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with tqdm(
        total=total,
        desc=f"{PROG}: {desc}",
        unit=unit,
        dynamic_ncols=True,
        file=sys.stderr,
        disable=quiet or not terminal,
    ) as bar:
        yield bar
    if not quiet and not terminal:
        print(f"{PROG}: {desc}: done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


def build_memory(
    model: torch.jit.ScriptModule | LanguageModel,
    tokenizer,
    train: Sequence[str],
    validation: Sequence[str],
    order: int,
    min_count: int,
    rule: str = AUTO_RULE,
    quiet: bool = True,
) -> tuple[NgramMemory, MemorySpec]:
    """The n-gram memory of the training lines, and its mixing weights fitted on the validation lines; with
    ``rule`` "auto", the mixing rule whose suggestions rank a sample of those lines better. Each stage shows a
    progress bar unless ``quiet``."""
    with _bar(len(train), "memory (n-grams of the training lines)", "line", quiet) as bar:
        counts = NgramCounts.from_text(_counted(train, bar), tokenizer, order)
        memory = to_memory(counts, min_count)
    sequences = [tokenizer.encode(line) for line in validation[:MAX_FIT_LINES]]
    network = ScriptedModel(model, tokenizer.vocab_size)
    with _bar(len(sequences), "EM fit of the mixing weights", "line", quiet) as bar:
        parts = []
        for first in range(0, len(sequences), 256):
            parts.append(collect(network, memory, sequences[first : first + 256]))
            bar.update(len(sequences[first : first + 256]))
        evidence = Evidence(
            *(np.concatenate(column) for column in zip(*((p.network, p.memory, p.seen) for p in parts)))
        )
    weights = fit_weights(evidence, order)
    fitted_on = f"{len(sequences)} validation lines, {len(evidence.seen)} tokens: perplexity "
    fitted_on += f"{mix_perplexity(evidence, None):.2f} network, linear mix {mix_perplexity(evidence, weights):.2f}"
    if rule == AUTO_RULE:
        sample = rule_sample(validation[:MAX_FIT_LINES], RULE_TARGETS)
        with _bar(len(sample) * len(MIX_RULES), "rule choice (each rule served)", "line", quiet) as bar:
            scores = score_rules(network, memory, tokenizer, sample, weights, progress=bar.update)
        rule = best_rule(scores)
        other = next(name for name in scores if name != rule)
        difference, half_width = top1_difference(scores, rule, other)
        fitted_on += f"; as served on {len(sample)} of them at random, " + ", ".join(
            f"{name} top-1 {100 * got.top1:.1f} %, keys saved {100 * got.keystroke_savings:.1f} %, "
            f"perplexity {got.perplexity:.2f}"
            for name, got in scores.items()
        )
        fitted_on += f" ({rule} - {other} top-1: {100 * difference:+.1f} ± {100 * half_width:.1f} points, 95 %)"
    fitted_on += f"; served: {rule}"
    spec = MemorySpec(
        order=order, min_count=min_count, entries=memory.entries(), weights=weights, fitted_on=fitted_on, rule=rule
    )
    return memory, spec


def _counted(lines: Sequence[str], bar: tqdm):
    for index, line in enumerate(lines):
        if index % 1000 == 999:
            bar.update(1000)
        yield line
    bar.update(len(lines) % 1000)


def export(
    checkpoint_path: str,
    out: str,
    tolerance: float = 1e-4,
    quantize: str | None = None,
    ngram_order: int = DEFAULT_ORDER,
    ngram_min_count: int = DEFAULT_MIN_COUNT,
    corpus: Sequence[str] = (),
    mix_rule: str = AUTO_RULE,
    quiet: bool = True,
) -> Manifest:
    if os.path.isdir(checkpoint_path) and os.path.exists(os.path.join(checkpoint_path, BEST)):
        checkpoint_path = os.path.join(checkpoint_path, BEST)
    checkpoint = load_checkpoint(checkpoint_path)
    config = ModelConfig(**checkpoint["model_config"])
    model: LanguageModel = LanguageModel(config)
    model.load_weights(checkpoint["model"])
    model.eval()
    tokenizer = load_tokenizer(checkpoint["tokenizer"])
    parameters = sum(p.numel() for p in model.parameters())
    if quantize == "int8":
        model = quantize_int8(model, config.cell)
    elif quantize == "float16":
        model.half().float()  # the weights as the file holds them; served as float32
    elif quantize is not None:
        raise ExportError(f"unknown quantisation {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(copy.deepcopy(model).half() if quantize == "float16" else model)
    best = checkpoint.get("best_val_loss", math.inf)
    manifest = Manifest(
        network=config.to_dict(),
        parameters=parameters,
        state_size=config.state_size,
        quantization=quantize or "none",
        tokenizer=TokenizerSpec(kind=tokenizer.kind, vocab_size=tokenizer.vocab_size, lowercase=tokenizer.lowercase),
        provenance=Provenance(
            **checkpoint["provenance"],
            steps=checkpoint["step"],
            epochs_completed=checkpoint["epoch"],
            stream_validation_perplexity=math.exp(best) if math.isfinite(best) else None,
            checkpoint=os.path.basename(checkpoint_path),
            train_config=checkpoint["train_config"],
        ),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        torch_version=str(torch.__version__),
    )
    memory = None
    if ngram_order:
        train, validation = training_lines(checkpoint, corpus)
        if isinstance(tokenizer, WordTokenizer):  # lower-cased: each word shown as it is most often written
            tokenizer.written = written_forms(tokenizer, train)
        memory, spec = build_memory(model, tokenizer, train, validation, ngram_order, ngram_min_count, mix_rule, quiet)
        manifest = replace(manifest, memory=spec)

    def verify(temporary: str) -> None:
        difference = check_parity(model, temporary)
        if not difference <= tolerance:
            raise ExportError(
                f"the exported model differs from the trained one by {difference:.3g} "
                f"(tolerance {tolerance}); nothing was written"
            )

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    return write_artifact(out, scripted, manifest, tokenizer, verify=verify, memory=memory)


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: str = option(help="a checkpoint file, or a run directory (its best checkpoint)", positional=True)
    out: str = option(help="the model file to write, e.g. model.pt", required=True, metavar="PATH")
    quantize: str | None = option(
        None,
        "int8: int8 weights (a scale per row) for faster CPU serving, CPU only; float16: weights stored as "
        "float16 (half the network's room in the file), served as float32 on any device",
        choices=QUANTIZATIONS,
        default_text="float weights",
    )
    ngram_order: int = option(
        DEFAULT_ORDER, "the n-gram memory's order, mixed with the network when served; 0: none", low=0, high=9
    )
    ngram_min_count: int = option(
        DEFAULT_MIN_COUNT, "leave out n-grams of 3 or more tokens seen fewer times: a smaller file", low=1
    )
    mix_rule: str = option(
        AUTO_RULE,
        "how the memory is mixed with the network; auto: the rule whose suggestions rank a sample of the "
        "validation lines better, each scored as nextword-eval scores a model (docs/model-file.md)",
        choices=[AUTO_RULE, *MIX_RULES],
    )
    corpus: tuple[str, ...] = option(
        (),
        "the training text, when it is no longer where training read it (repeat for several)",
        metavar="PATH",
    )
    quiet: bool = option(False, "no progress on standard error while the memory is built and fitted")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(PROG, "Export a training checkpoint to one TorchScript model file.", ExportConfig)
    args = config_from(ExportConfig, parser.parse_args(argv))
    try:
        manifest = export(
            args.checkpoint,
            args.out,
            quantize=args.quantize,
            ngram_order=args.ngram_order,
            ngram_min_count=args.ngram_min_count,
            corpus=list(args.corpus),
            mix_rule=args.mix_rule,
            quiet=args.quiet,
        )
    except (CheckpointError, ArtifactError, ExportError, OSError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    size = os.path.getsize(args.out) / 1e6
    ppl = manifest.provenance.stream_validation_perplexity
    print(
        f"{PROG}: wrote {args.out} ({size:.1f} MB, {manifest.parameters:,} parameters, "
        f"{manifest.tokenizer.kind} tokenizer"
        + (f", {args.quantize} weights" if args.quantize else "")
        + (f", stream validation perplexity {ppl:.2f}" if ppl else "")
        + "); it loads and matches the checkpoint"
    )
    if manifest.memory is not None:
        m = manifest.memory
        print(
            f"{PROG}: n-gram memory of order {m.order}, {m.entries:,} entries, mixed {m.rule}; mixing weights by "
            f"context seen {', '.join(f'{w:.3f}' for w in m.weights)}; fitted on {m.fitted_on}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
