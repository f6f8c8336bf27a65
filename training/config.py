"""Training configuration: a frozen dataclass and the command line that fills it."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields

from service.model.command_line import build_parser as build_parser_of
from service.model.command_line import config_from, option, ranged
from training.vocabulary import DEFAULT_VOCAB_SIZE


def _dropout(text: str) -> float | None:
    return None if text == "auto" else ranged(float, 0.0, 0.95)(text)


VOCAB_DEFAULTS = ", ".join(f"{k} {v}" for k, v in DEFAULT_VOCAB_SIZE.items())
DATA, TOKENS, NETWORK, OPTIMISATION, RUN = "data", "tokens", "network", "optimisation", "run"


@dataclass(frozen=True)
class TrainConfig:
    corpus: tuple[str, ...] = option(
        (), "UTF-8 training text, one sequence per line; repeat for several files", metavar="PATH", group=DATA
    )
    out: str = option(
        "",
        "output directory for checkpoints, metrics and config",
        metavar="DIR",
        group=DATA,
        default_text="the --resume directory",
    )
    val: tuple[str, ...] = option(
        (), "validation text; without it --val-fraction of the corpus lines is held out", metavar="PATH", group=DATA
    )
    val_fraction: float = option(
        0.1,
        "fraction of corpus lines held out for validation, split at random by --seed",
        low=0.0,
        high=0.5,
        group=DATA,
    )
    encoding_errors: str = option(
        "strict",
        "what to do with invalid UTF-8: stop with the file and line (strict), or replace it with U+FFFD",
        choices=["strict", "replace"],
        group=DATA,
    )
    tokenizer: str = option(
        "sentencepiece",
        "char: each character; word: words and punctuation; jieba: Chinese words as jieba segments them, "
        "a word outside the vocabulary spelled by its characters; sentencepiece: learned subwords, also for "
        "text without spaces",
        choices=["char", "word", "jieba", "sentencepiece"],
        group=TOKENS,
    )
    vocab_size: int | None = option(
        None, "largest vocabulary including the 4 special tokens", low=6, group=TOKENS, default_text=VOCAB_DEFAULTS
    )
    min_count: int = option(1, "char and word: drop tokens seen fewer times than this", low=1, group=TOKENS)
    lowercase: bool = option(False, "lower-case all text before tokenizing", group=TOKENS)
    input: str = option(
        "embedding",
        "embedding lookup, or one-hot input (a gather of the first layer's weights)",
        choices=["embedding", "onehot"],
        group=NETWORK,
    )
    cell: str = option("lstm", "recurrent cell, rnn is tanh", choices=["lstm", "gru", "rnn"], group=NETWORK)
    num_layers: int = option(2, "recurrent layers", low=1, high=16, group=NETWORK)
    hidden_size: int = option(512, "units per layer", low=1, high=8192, group=NETWORK)
    embedding_size: int | None = option(
        None, "embedding width", low=1, high=8192, group=NETWORK, default_text="--hidden-size"
    )
    dropout: float | None = option(
        0.2,
        "dropout from 0 to 0.95, or auto: 0.5 to 0.1 as the training text grows against the network's "
        "parameters (docs/training.md)",
        parse=_dropout,
        group=NETWORK,
    )
    weight_drop: float = option(
        0.0,
        "DropConnect on the recurrent (hidden-to-hidden) weights while training, from 0 to 0.95: one mask per "
        "window, shared by every position and row of the batch",
        low=0.0,
        high=0.95,
        group=NETWORK,
    )
    tie_weights: bool | None = option(
        None,
        "share the embedding with the output layer",
        group=NETWORK,
        default_text="on for embedding input",
    )
    batch_size: int = option(32, "sequences per batch", low=1, high=65536, group=OPTIMISATION)
    bptt: int = option(35, "truncated backpropagation length in tokens", low=1, high=100000, group=OPTIMISATION)
    lr: float = option(
        2e-3,
        "peak AdamW learning rate; linear warm-up, then cosine decay to 10%",
        low=0.0,
        low_open=True,
        group=OPTIMISATION,
    )
    weight_decay: float = option(0.0, "AdamW weight decay", low=0.0, group=OPTIMISATION)
    warmup_steps: int = option(100, "warm-up steps", low=0, group=OPTIMISATION)
    clip: float = option(1.0, "clip the gradient norm to this", low=0.0, low_open=True, group=OPTIMISATION)
    epochs: int = option(10, "passes over the corpus", low=1, group=OPTIMISATION)
    max_steps: int | None = option(None, "stop after this many steps", low=1, group=OPTIMISATION)
    time_budget: float | None = option(
        None,
        "stop after this many seconds of training; the schedule then follows time",
        low=0.0,
        low_open=True,
        metavar="SECONDS",
        group=OPTIMISATION,
    )
    eval_every: int = option(0, "also validate every N steps (0: after each epoch only)", low=0, group=OPTIMISATION)
    save_every: int = option(500, "write the 'last' checkpoint every N steps", low=1, group=OPTIMISATION)
    seed: int = option(0, "random seed for split, shuffling, init and dropout", group=RUN)
    device: str = option("auto", "auto picks cuda when available", choices=["auto", "cpu", "cuda"], group=RUN)
    dry_run: bool = option(False, "a few steps on a little data, to check the setup", group=RUN)
    resume: str | None = option(None, "continue the run whose checkpoints are in DIR", metavar="DIR", group=RUN)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        for key in ("corpus", "val"):
            values[key] = tuple(values.get(key) or ())
        return cls(**values)


def build_parser() -> argparse.ArgumentParser:
    return build_parser_of(
        "nextword-train",
        "Train a recurrent next-word language model on UTF-8 text (one sequence per line).",
        TrainConfig,
    )


# Flags that --resume may change; everything else comes from the saved run.
RESUMABLE_OVERRIDES = ("epochs", "max_steps", "time_budget", "eval_every", "save_every", "device", "out")


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, set[str]]:
    """Returns the config and the names of flags given explicitly on the command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    defaults = vars(parser.parse_args([]))
    given = {k for k, v in vars(args).items() if v != defaults[k]}
    if not args.corpus and not args.resume:
        parser.error("--corpus PATH is required (or --resume DIR)")
    if not args.out and not args.resume:
        parser.error("--out DIR is required")
    return config_from(TrainConfig, args, out=args.out or args.resume), given
