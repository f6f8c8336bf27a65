"""Train a recurrent language model: ``python -m training.train --corpus PATH --out DIR``.

The loop is truncated backpropagation through time over the stream laid out in
``training/data.py``: the state is carried from one window to the next and
detached, the loss is cross-entropy over every step, gradients are clipped.
Under torchrun the same loop runs DistributedDataParallel, each process on its
own rows; rank 0 alone writes.

    TrainingRun(config)          data, tokenizer, model, optimizer; restore() from a checkpoint
      .step(inputs, targets)     one window: forward, loss, backward, clip, update (recurrent weights
                                 masked meanwhile with --weight-drop: training/weight_drop.py)
      .validate()                validation loss, logged; checkpoints saved (best when it improved)
      .save(names)               checkpoint files (every rank joins the state gather)
    train(config)                the loop: epochs x windows, stopping on steps, time or a signal
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from service.model.tokenizer import load_tokenizer
from training.checkpoint import BEST, LAST, CheckpointError, load_checkpoint, save_checkpoint
from training.config import RESUMABLE_OVERRIDES, TrainConfig, parse_args
from training.data import (
    CorpusError,
    batchify,
    encode_lines,
    make_stream,
    num_windows,
    read_corpus,
    split_lines,
    windows,
)
from training.distributed import Distributed, TrainingError, pick_device
from training.model import LanguageModel, ModelConfig, line_start_state
from training.runlog import Progress, RunLog, StopFlag
from training.vocabulary import TokenizerError, build_tokenizer
from training.weight_drop import dropped_weights

PROG = "nextword-train"
DRY_RUN_STEPS = 3


def resolve_resume(config: TrainConfig, given: set[str]) -> tuple[TrainConfig, dict | None]:
    """Merge a --resume run's saved config with the flags that may change."""
    if not config.resume:
        return config, None
    checkpoint = load_checkpoint(config.resume)
    saved = TrainConfig.from_dict(checkpoint["train_config"])
    changed = sorted(
        k for k in given - {"resume"} if k not in RESUMABLE_OVERRIDES and getattr(config, k) != getattr(saved, k)
    )
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise TrainingError(
            f"{flags} cannot change on --resume; only "
            + ", ".join("--" + k.replace("_", "-") for k in RESUMABLE_OVERRIDES)
            + " can"
        )
    overrides = {k: getattr(config, k) for k in given if k in RESUMABLE_OVERRIDES}
    return replace(saved, resume=config.resume, **overrides), checkpoint


AUTO_DROPOUT = ((0.03, 0.5), (0.3, 0.1))  # (training tokens per parameter, dropout) at the two ends of the rule


def auto_dropout(tokens: int, parameters: int) -> float:
    """``--dropout auto``: more regularisation where there is less text for the network's size. 0.5 at 0.03
    training tokens per parameter or fewer (zh-fortunes' 0.23 M characters for the 2x512 Chinese network),
    0.1 at 0.3 or more (KJV's 0.79 M words for the 2x256 word network), log-linear between, to the
    nearest 0.05 (0.7 M characters for the 2x512 network, 0.1 tokens per parameter, get 0.3)."""
    (low_ratio, most), (high_ratio, least) = AUTO_DROPOUT
    ratio = tokens / max(1, parameters)
    where = math.log(ratio / low_ratio) / math.log(high_ratio / low_ratio) if ratio > 0 else 0.0
    return round((most + (least - most) * min(1.0, max(0.0, where))) * 20) / 20


def model_config_for(config: TrainConfig, vocab_size: int) -> ModelConfig:
    embedding = config.embedding_size or config.hidden_size
    tie = (
        config.tie_weights
        if config.tie_weights is not None
        else (config.input == "embedding" and embedding == config.hidden_size)
    )
    try:
        return ModelConfig(
            vocab_size=vocab_size,
            cell=config.cell,
            input=config.input,
            num_layers=config.num_layers,
            hidden_size=config.hidden_size,
            embedding_size=embedding,
            dropout=config.dropout if config.dropout is not None else 0.0,  # auto: chosen in Run.build
            tie_weights=tie,
        )
    except ValueError as error:
        raise TrainingError(str(error)) from None


def learning_rate(config: TrainConfig, step: int, total_steps: int, elapsed: float) -> float:
    """Linear warm-up, then cosine decay to 10% of --lr, by steps or by time, whichever is further."""
    warm = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    progress = step / max(1, total_steps)
    if config.time_budget:
        progress = max(progress, elapsed / config.time_budget)
    progress = min(1.0, progress)
    return config.lr * warm * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def validation_loss(
    model: LanguageModel,
    rows: torch.Tensor,
    bptt: int,
    device: torch.device,
    dist: Distributed,
    max_windows: int | None = None,
) -> float:
    """Mean cross-entropy per token over ``rows`` read as one stream (summed over all processes)."""
    model.eval()
    state = model.zero_state(rows.size(0))
    total, count = 0.0, 0
    for index, inputs, targets in windows(rows, bptt):
        if max_windows is not None and index >= max_windows:
            break
        logits, state = model(inputs.to(device), state)
        total += F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten(), reduction="sum").item()
        count += targets.numel()
    model.train()
    total_sum, count_sum = dist.sum(total, count)
    return total_sum / max(1.0, count_sum)


def stream_perplexity(loss: float | None) -> str:
    """How logs name the validation figure: the held-out lines read as one stream (see service/model/artifact.py)."""
    return f"stream validation perplexity {math.exp(min(loss, 50)):.2f}" if loss is not None else ""


class TrainingRun:
    """Everything one run holds: data, tokenizer, model, optimizer, its position in the stream, its outputs."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.device = pick_device(config.device)
        self.dist = Distributed(self.device)
        if config.batch_size % self.dist.world_size:
            raise TrainingError(
                f"--batch-size {config.batch_size} must be divisible by the number of processes "
                f"({self.dist.world_size})"
            )
        if self.dist.main:
            os.makedirs(config.out, exist_ok=True)
        self.corpus = read_corpus(config.corpus, config.encoding_errors)
        self.train_lines, self.val_lines = self._split()
        # position in the stream: steps taken, epochs done, next window, seconds trained, best validation loss
        self.step_count, self.epoch, self.window, self.elapsed, self.best = 0, 0, 0, 0.0, math.inf
        self.state: torch.Tensor | None = None  # [L, rows of this rank, S], carried from window to window

    def _split(self) -> tuple[list[str], list[str]]:
        config = self.config
        if config.val:
            return self.corpus.lines, read_corpus(config.val, config.encoding_errors).lines
        if len(self.corpus.lines) < 2 and config.val_fraction > 0:
            raise TrainingError("the corpus has 1 line; a validation split needs 2 or more (or pass --val PATH)")
        return split_lines(self.corpus.lines, config.val_fraction, config.seed)

    def build(self, checkpoint: dict | None) -> None:
        """Tokenizer, token stream, model and optimizer: new, or those of ``checkpoint``."""
        config = self.config
        if checkpoint is not None:
            if checkpoint["provenance"]["corpus_sha256"] != self.corpus.sha256:
                raise TrainingError(
                    "the corpus files differ from the ones this run was trained on; resume needs the same text"
                )
            self.tokenizer = load_tokenizer(checkpoint["tokenizer"])
        else:
            self.tokenizer = build_tokenizer(
                config.tokenizer, self.train_lines, config.vocab_size, config.min_count, config.lowercase
            )
        self.model_config = model_config_for(config, self.tokenizer.vocab_size)
        self.train_sequences = encode_lines(self.tokenizer, self.train_lines)
        self.val_rows = (
            batchify(make_stream(encode_lines(self.tokenizer, self.val_lines)), min(16, config.batch_size))
            if self.val_lines
            else None
        )
        self.total_tokens = sum(len(s) for s in self.train_sequences)
        if self.total_tokens < 2 * config.batch_size:
            raise TrainingError(
                f"the training text has {self.total_tokens} tokens; --batch-size {config.batch_size} "
                f"needs at least {2 * config.batch_size}: give more text or a smaller --batch-size"
            )
        if config.dropout is None:  # --dropout auto: from the training tokens per parameter
            parameters = sum(p.numel() for p in LanguageModel(self.model_config).parameters())
            self.config = config = replace(config, dropout=auto_dropout(self.total_tokens, parameters))
            self.model_config = model_config_for(config, self.tokenizer.vocab_size)
            tokens = self.total_tokens
            self.say(f"dropout {config.dropout:g} (auto: {tokens:,} training tokens for {parameters:,} parameters)")
        windows_per_epoch = num_windows(torch.empty(1, self.total_tokens // config.batch_size), config.bptt)
        self.max_steps = min(config.max_steps or DRY_RUN_STEPS, DRY_RUN_STEPS) if config.dry_run else config.max_steps
        self.total_steps = self.max_steps or config.epochs * windows_per_epoch

        torch.manual_seed(config.seed)
        self.model = LanguageModel(self.model_config).to(self.device)
        # the fused kernel updates all parameters in one pass (its cost: docs/performance.md)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=config.lr,
            weight_decay=config.weight_decay,
            fused=self.device.type in ("cpu", "cuda"),
        )
        if checkpoint is not None:
            self.restore(checkpoint)
        self.wrapped = (
            nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            if self.dist.enabled
            else self.model
        )
        self.log = RunLog(config.out, self.dist.main)
        self.log.save_config(config, self.model_config, self.tokenizer)
        self.provenance = {
            "corpus": [os.path.basename(p) for p in config.corpus],
            "corpus_sha256": self.corpus.sha256,
            "train_lines": len(self.train_lines),
            "val_lines": len(self.val_lines),
        }

    def restore(self, checkpoint: dict) -> None:
        """Weights, optimizer, position, this rank's rows of the state, random state."""
        self.model.load_weights(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.step_count, self.epoch, self.window = checkpoint["step"], checkpoint["epoch"], checkpoint["window"]
        self.elapsed, self.best = checkpoint["elapsed"], checkpoint["best_val_loss"]
        rows = self.config.batch_size // self.dist.world_size
        self.state = checkpoint["state"][:, self.dist.rank * rows : (self.dist.rank + 1) * rows].to(self.device)
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if self.device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], self.device)

    def describe(self) -> str:
        m = self.model_config
        return (
            f"{self.tokenizer.kind} tokenizer, {self.tokenizer.vocab_size} tokens; {m.cell} "
            f"{m.num_layers}x{m.hidden_size}, {sum(p.numel() for p in self.model.parameters()):,} parameters; "
            f"{len(self.train_lines)} training lines ({self.total_tokens:,} tokens), {len(self.val_lines)} "
            f"validation lines; device {self.device}"
            + (f", {self.dist.world_size} processes" if self.dist.enabled else "")
        )

    def epoch_rows(self) -> torch.Tensor:
        """This rank's rows of the epoch's shuffled stream [rows, tokens]."""
        stream = make_stream(self.train_sequences, shuffle_seed=self.config.seed * 100003 + self.epoch)
        return batchify(stream, self.config.batch_size, self.dist.rank, self.dist.world_size)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, lr: float) -> torch.Tensor:
        """One window of truncated backpropagation; returns the loss (a tensor: reading it syncs a GPU)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        inputs = inputs.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with dropped_weights(self.model, self.config.weight_drop, self.config.seed, self.step_count):
            logits, new_state = self.wrapped(inputs, self.state)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            if not torch.isfinite(loss):
                kept = os.path.join(self.config.out, LAST)
                raise TrainingError(
                    f"the loss became {loss.item()} at step {self.step_count + 1}; stopped without saving it. "
                    + (
                        f"The last good checkpoint is {kept}. "
                        if os.path.exists(kept)
                        else "No checkpoint was written yet. "
                    )
                    + "Try a lower --lr or --clip."
                )
            loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip, foreach=True)
        self.optimizer.step()
        self.state = new_state.detach()  # truncate backpropagation here, carry the values on
        self.step_count += 1
        return loss

    def payload(self) -> dict:
        full_state = self.dist.gather_rows(self.state.detach()) if self.state is not None else None
        weights = self.model.state_dict()
        if self.dist.main:  # only its payload is written: where served text starts, the stream's state between lines
            weights = {
                **weights,
                "start_state": line_start_state(self.model, self.train_sequences, seed=self.config.seed),
            }
        cuda = self.device.type == "cuda"
        return {
            "model_config": self.model_config.to_dict(),
            "train_config": self.config.to_dict(),
            "tokenizer": self.tokenizer.to_bytes(),
            "model": weights,
            "optimizer": self.optimizer.state_dict(),
            "step": self.step_count,
            "epoch": self.epoch,
            "window": self.window,
            "state": full_state.cpu() if full_state is not None else None,
            "elapsed": self.elapsed,
            "best_val_loss": self.best,
            "provenance": self.provenance,
            "torch_version": str(torch.__version__),
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.device) if cuda else None},
        }

    def save(self, names: tuple[str, ...]) -> None:
        data = self.payload()  # every rank joins the state gather
        if self.dist.main:
            for name in names:
                save_checkpoint(os.path.join(self.config.out, name), data)

    def validate(self) -> float | None:
        """Validation loss (None without validation lines); saves 'last', and 'best' when it improved."""
        if self.val_rows is None:
            self.save((LAST,))
            return None
        loss = validation_loss(
            self.model, self.val_rows, self.config.bptt, self.device, self.dist, 2 if self.config.dry_run else None
        )
        self.log.write(
            {"kind": "val", "step": self.step_count, "epoch": self.epoch, "loss": loss, "ppl": math.exp(min(loss, 50))}
        )
        improved = loss < self.best
        self.best = min(self.best, loss)
        self.save((LAST, BEST) if improved else (LAST,))
        self.log.plot()
        return loss

    def say(self, text: str) -> None:
        if self.dist.main:
            print(f"{PROG}: {text}", file=sys.stderr)


def train(config: TrainConfig, checkpoint: dict | None = None) -> int:
    run = TrainingRun(config)
    run.build(checkpoint)
    run.say(run.describe())
    run.model.train()
    progress = Progress(run)
    started = time.perf_counter() - run.elapsed
    stop_reason = "done"
    with StopFlag() as stop:
        while run.epoch < config.epochs and stop_reason == "done":
            rows = run.epoch_rows()
            if run.state is None or run.window == 0:
                run.state = run.model.zero_state(rows.size(0))
            for index, inputs, targets in windows(rows, config.bptt, start=run.window):
                if run.max_steps is not None and run.step_count >= run.max_steps:
                    stop_reason = "max_steps"
                elif config.time_budget and run.elapsed >= config.time_budget:
                    stop_reason = "time_budget"
                elif stop.signal is not None:
                    stop_reason = "interrupted"
                if stop_reason != "done":
                    break
                lr = learning_rate(config, run.step_count, run.total_steps, run.elapsed)
                loss = run.step(inputs, targets, lr)
                run.window = index + 1
                run.elapsed = time.perf_counter() - started
                progress.update(loss, targets.numel(), lr)
                if run.step_count % config.save_every == 0:
                    run.save((LAST,))
                if config.eval_every and run.step_count % config.eval_every == 0:
                    run.validate()
            if stop_reason == "done":  # the epoch ran to its end
                run.epoch, run.window, run.state = run.epoch + 1, 0, None
                run.say(f"epoch {run.epoch} step {run.step_count} {stream_perplexity(run.validate())}")
        progress.close()
        if stop_reason != "done":
            ppl = stream_perplexity(run.validate())
            run.say(f"stopped ({stop_reason.replace('_', ' ')}) at step {run.step_count}" + (f", {ppl}" if ppl else ""))
    best = os.path.join(config.out, BEST)
    run.say(f"checkpoint {best if os.path.exists(best) else os.path.join(config.out, LAST)}")
    if stop_reason == "interrupted":
        run.say(f"interrupted; continue with --resume {config.out}")
    run.dist.close()
    return 130 if stop_reason == "interrupted" else 0


def main(argv: list[str] | None = None) -> int:
    config, given = parse_args(argv)
    try:
        config, checkpoint = resolve_resume(config, given)
        code = train(config, checkpoint)
        if argv is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Under torchrun everything is written and the process group is closed: exit now.
            # Gloo's C++ destructors at interpreter exit can abort a rank (SIGABRT) at random.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    except (CorpusError, TokenizerError, CheckpointError, TrainingError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted before a checkpoint could be written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
