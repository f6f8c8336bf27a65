"""Training configuration: a frozen dataclass and the command line that fills it."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields

from service.model.command_line import OneLineParser, ranged
from training.vocabulary import DEFAULT_VOCAB_SIZE


@dataclass(frozen=True)
class TrainConfig:
    corpus: tuple[str, ...]
    out: str
    val: tuple[str, ...] = ()
    val_fraction: float = 0.1
    encoding_errors: str = "strict"
    tokenizer: str = "sentencepiece"
    vocab_size: int | None = None
    min_count: int = 1
    lowercase: bool = False
    input: str = "embedding"
    cell: str = "lstm"
    num_layers: int = 2
    hidden_size: int = 512
    embedding_size: int | None = None  # None: same as hidden_size
    dropout: float | None = 0.2  # None: auto, from the training tokens per parameter (training/train.py)
    tie_weights: bool | None = None  # None: on for embedding input
    batch_size: int = 32
    bptt: int = 35
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    clip: float = 1.0
    epochs: int = 10
    max_steps: int | None = None
    time_budget: float | None = None
    eval_every: int = 0
    save_every: int = 500
    seed: int = 0
    device: str = "auto"
    dry_run: bool = False
    resume: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        for key in ("corpus", "val"):
            values[key] = tuple(values.get(key) or ())
        return cls(**values)


def _dropout(text: str) -> float | None:
    return None if text == "auto" else ranged(float, 0.0, 0.95)(text)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="nextword-train",
        description="Train a recurrent next-word language model on UTF-8 text (one sequence per line).",
    )
    io = p.add_argument_group("data")
    io.add_argument(
        "--corpus",
        action="append",
        default=[],
        metavar="PATH",
        help="UTF-8 training text, one sequence per line; repeat for several files",
    )
    io.add_argument(
        "--out",
        metavar="DIR",
        help="output directory for checkpoints, metrics and config (default: the --resume directory)",
    )
    io.add_argument(
        "--val",
        action="append",
        default=[],
        metavar="PATH",
        help="validation text; without it --val-fraction of the corpus lines is held out",
    )
    io.add_argument(
        "--val-fraction",
        type=ranged(float, 0.0, 0.5),
        default=0.1,
        help="fraction of corpus lines held out for validation, split at random by --seed (default 0.1)",
    )
    io.add_argument(
        "--encoding-errors",
        choices=["strict", "replace"],
        default="strict",
        help="what to do with invalid UTF-8: stop with the file and line (strict), or replace it with "
        "U+FFFD (default strict)",
    )
    tok = p.add_argument_group("tokens")
    tok.add_argument(
        "--tokenizer",
        choices=["char", "word", "jieba", "sentencepiece"],
        default="sentencepiece",
        help="char: each character; word: words and punctuation; jieba: Chinese words as jieba segments them, "
        "a word outside the vocabulary spelled by its characters; sentencepiece: learned subwords, also for "
        "text without spaces (default)",
    )
    tok.add_argument(
        "--vocab-size",
        type=ranged(int, 6),
        default=None,
        help="largest vocabulary including the 4 special tokens (default: "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_VOCAB_SIZE.items())
        + ")",
    )
    tok.add_argument(
        "--min-count",
        type=ranged(int, 1),
        default=1,
        help="char and word: drop tokens seen fewer times than this (default 1)",
    )
    tok.add_argument("--lowercase", action="store_true", help="lower-case all text before tokenizing")
    net = p.add_argument_group("network")
    net.add_argument(
        "--input",
        choices=["embedding", "onehot"],
        default="embedding",
        help="embedding lookup, or one-hot input (a gather of the first layer's weights) (default embedding)",
    )
    net.add_argument(
        "--cell", choices=["lstm", "gru", "rnn"], default="lstm", help="recurrent cell, rnn is tanh (default lstm)"
    )
    net.add_argument("--num-layers", type=ranged(int, 1, 16), default=2, help="recurrent layers (default 2)")
    net.add_argument("--hidden-size", type=ranged(int, 1, 8192), default=512, help="units per layer (default 512)")
    net.add_argument(
        "--embedding-size", type=ranged(int, 1, 8192), default=None, help="embedding width (default: --hidden-size)"
    )
    net.add_argument(
        "--dropout",
        type=_dropout,
        default=0.2,
        help="dropout from 0 to 0.95, or auto: 0.5 to 0.1 as the training text grows against the network's "
        "parameters (docs/training.md) (default 0.2)",
    )
    net.add_argument(
        "--tie-weights",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="share the embedding with the output layer (default: on for embedding input)",
    )
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=ranged(int, 1, 65536), default=32, help="sequences per batch (default 32)")
    opt.add_argument(
        "--bptt",
        type=ranged(int, 1, 100000),
        default=35,
        help="truncated backpropagation length in tokens (default 35)",
    )
    opt.add_argument(
        "--lr",
        type=ranged(float, 0.0, low_open=True),
        default=2e-3,
        help="peak AdamW learning rate; linear warm-up, then cosine decay to 10%% (default 2e-3)",
    )
    opt.add_argument("--weight-decay", type=ranged(float, 0.0), default=0.0, help="AdamW weight decay (default 0)")
    opt.add_argument("--warmup-steps", type=ranged(int, 0), default=100, help="warm-up steps (default 100)")
    opt.add_argument(
        "--clip",
        type=ranged(float, 0.0, low_open=True),
        default=1.0,
        help="clip the gradient norm to this (default 1.0)",
    )
    opt.add_argument("--epochs", type=ranged(int, 1), default=10, help="passes over the corpus (default 10)")
    opt.add_argument("--max-steps", type=ranged(int, 1), default=None, help="stop after this many steps")
    opt.add_argument(
        "--time-budget",
        type=ranged(float, 0.0, low_open=True),
        default=None,
        metavar="SECONDS",
        help="stop after this many seconds of training; the schedule then follows time",
    )
    opt.add_argument(
        "--eval-every",
        type=ranged(int, 0),
        default=0,
        help="also validate every N steps (default 0: after each epoch only)",
    )
    opt.add_argument(
        "--save-every", type=ranged(int, 1), default=500, help="write the 'last' checkpoint every N steps (default 500)"
    )
    run = p.add_argument_group("run")
    run.add_argument(
        "--seed", type=int, default=0, help="random seed for split, shuffling, init and dropout (default 0)"
    )
    run.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto picks cuda when available (default auto)",
    )
    run.add_argument("--dry-run", action="store_true", help="a few steps on a little data, to check the setup")
    run.add_argument("--resume", metavar="DIR", help="continue the run whose checkpoints are in DIR")
    return p


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
    values = vars(args)
    values["corpus"] = tuple(values["corpus"])
    values["val"] = tuple(values["val"])
    values["out"] = values["out"] or values["resume"]
    return TrainConfig(**values), given
