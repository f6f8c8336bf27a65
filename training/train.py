"""Train a recurrent language model: ``python -m training.train --corpus PATH --out DIR``.

The loop is truncated backpropagation through time over the stream laid out in
``training/data.py``: the state is carried from one window to the next and
detached, the loss is cross-entropy over every step, gradients are clipped.
Under torchrun the same loop runs DistributedDataParallel, each process on its
own rows; rank 0 alone writes.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from service.artifact import atomic_write
from service.runner import resolve_device
from service.tokenizer import load_tokenizer
from training.checkpoint import BEST, LAST, CheckpointError, load_checkpoint, save_checkpoint
from training.config import RESUMABLE_OVERRIDES, TrainConfig, parse_args
from training.data import CorpusError, batchify, encode_lines, make_stream, num_windows, read_corpus, split_lines, windows
from training.model import LanguageModel, ModelConfig, line_start_state
from training.tokenizers import TokenizerError, build_tokenizer

PROG = "nextword-train"
DRY_RUN_STEPS = 3


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what was kept."""


# --------------------------------------------------------------------------- setup

class Distributed:
    """Rank and world size under torchrun (WORLD_SIZE set), or a single process."""

    def __init__(self, device: torch.device) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.enabled = self.world_size > 1
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: float) -> list[float]:
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def gather_rows(self, state: torch.Tensor) -> torch.Tensor:
        """Each rank's state [L, b, S] -> the whole batch [L, b*W, S] (on every rank)."""
        if not self.enabled:
            return state
        parts = [torch.empty_like(state) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, state.contiguous())
        return torch.cat(parts, dim=1)

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            # Leave together: a rank that tears down its connections while rank 0 is still
            # writing can abort in Gloo's teardown.
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def pick_device(name: str) -> torch.device:
    try:
        name = resolve_device(name)
    except ValueError as error:
        raise TrainingError(str(error)) from None
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per local process
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def resolve_resume(config: TrainConfig, given: set[str]) -> tuple[TrainConfig, dict | None]:
    """Merge a --resume run's saved config with the flags that may change."""
    if not config.resume:
        return config, None
    checkpoint = load_checkpoint(config.resume)
    saved = TrainConfig.from_dict(checkpoint["train_config"])
    changed = sorted(k for k in given - {"resume"} if k not in RESUMABLE_OVERRIDES
                     and getattr(config, k) != getattr(saved, k))
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise TrainingError(f"{flags} cannot change on --resume; only "
                            + ", ".join("--" + k.replace("_", "-") for k in RESUMABLE_OVERRIDES) + " can")
    overrides = {k: getattr(config, k) for k in given if k in RESUMABLE_OVERRIDES}
    return replace(saved, resume=config.resume, **overrides), checkpoint


def model_config_for(config: TrainConfig, vocab_size: int) -> ModelConfig:
    embedding = config.embedding_size or config.hidden_size
    tie = config.tie_weights if config.tie_weights is not None else (
        config.input == "embedding" and embedding == config.hidden_size)
    try:
        return ModelConfig(vocab_size=vocab_size, cell=config.cell, input=config.input,
                           num_layers=config.num_layers, hidden_size=config.hidden_size,
                           embedding_size=embedding, dropout=config.dropout, tie_weights=tie)
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


# --------------------------------------------------------------------------- outputs

class RunLog:
    """metrics.jsonl, curves.png and config.json in the output directory (rank 0 only)."""

    def __init__(self, out: str, enabled: bool) -> None:
        self.out = out
        self.enabled = enabled
        self.path = os.path.join(out, "metrics.jsonl")

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def save_config(self, config: TrainConfig, model_config: ModelConfig, tokenizer) -> None:
        if self.enabled:
            resolved = {"train": config.to_dict(), "model": model_config.to_dict(),
                        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                                      "lowercase": tokenizer.lowercase}}
            text = json.dumps(resolved, indent=2, ensure_ascii=False).encode("utf-8")
            atomic_write(os.path.join(self.out, "config.json"), lambda handle: handle.write(text))

    def plot(self) -> None:
        if not self.enabled or not os.path.exists(self.path):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train, val = [], []
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                (train if record["kind"] == "train" else val).append((record["step"], record["ppl"]))
        figure, axes = plt.subplots(figsize=(7, 4))
        if train:
            axes.plot(*zip(*train), label="train")
        if val:
            axes.plot(*zip(*val), marker="o", label="validation")
        axes.set_xlabel("step")
        axes.set_ylabel("perplexity")
        axes.set_yscale("log")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
        figure.tight_layout()
        atomic_write(os.path.join(self.out, "curves.png"), lambda handle: figure.savefig(handle, format="png"))
        plt.close(figure)


# --------------------------------------------------------------------------- loop

@torch.no_grad()
def evaluate(model: nn.Module, rows: torch.Tensor, bptt: int, device: torch.device,
             dist: Distributed, max_windows: int | None = None) -> float:
    """Mean cross-entropy per token over ``rows`` (summed over all processes)."""
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
    total, count = dist.sum(total, count)
    return total / max(1.0, count)


class StopFlag:
    """Ctrl-C / SIGTERM ask the loop to stop at the next step boundary and save."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __enter__(self) -> "StopFlag":
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def train(config: TrainConfig, checkpoint: dict | None = None) -> int:
    device = pick_device(config.device)
    dist = Distributed(device)
    if config.batch_size % dist.world_size:
        raise TrainingError(f"--batch-size {config.batch_size} must be divisible by the number of processes ({dist.world_size})")
    if dist.main:
        os.makedirs(config.out, exist_ok=True)

    corpus = read_corpus(config.corpus, config.encoding_errors)
    if config.val:
        train_lines, val_lines = corpus.lines, read_corpus(config.val, config.encoding_errors).lines
    else:
        if len(corpus.lines) < 2 and config.val_fraction > 0:
            raise TrainingError("the corpus has 1 line; a validation split needs 2 or more (or pass --val PATH)")
        train_lines, val_lines = split_lines(corpus.lines, config.val_fraction, config.seed)
    if checkpoint is not None:
        if checkpoint["provenance"]["corpus_sha256"] != corpus.sha256:
            raise TrainingError("the corpus files differ from the ones this run was trained on; resume needs the same text")
        tokenizer = load_tokenizer(checkpoint["tokenizer"])
    else:
        tokenizer = build_tokenizer(config.tokenizer, train_lines, config.vocab_size, config.min_count, config.lowercase)
    model_config = model_config_for(config, tokenizer.vocab_size)

    train_sequences = encode_lines(tokenizer, train_lines)
    val_rows = batchify(make_stream(encode_lines(tokenizer, val_lines)), min(16, config.batch_size)) if val_lines else None
    total_tokens = sum(len(s) for s in train_sequences)
    if total_tokens < 2 * config.batch_size:
        raise TrainingError(f"the training text has {total_tokens} tokens; --batch-size {config.batch_size} needs "
                            f"at least {2 * config.batch_size}: give more text or a smaller --batch-size")
    windows_per_epoch = num_windows(torch.empty(1, total_tokens // config.batch_size), config.bptt)
    max_steps = config.max_steps
    if config.dry_run:
        max_steps = min(max_steps or DRY_RUN_STEPS, DRY_RUN_STEPS)
    total_steps = max_steps or config.epochs * windows_per_epoch

    torch.manual_seed(config.seed)
    model = LanguageModel(model_config).to(device)
    # the fused kernel updates all parameters in one pass (about 5 % of a step on CPU)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  fused=device.type in ("cpu", "cuda"))
    step, epoch, window, elapsed, best = 0, 0, 0, 0.0, math.inf
    state = None
    if checkpoint is not None:
        model.load_weights(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, epoch, window = checkpoint["step"], checkpoint["epoch"], checkpoint["window"]
        elapsed, best = checkpoint["elapsed"], checkpoint["best_val_loss"]
        rows_per_rank = config.batch_size // dist.world_size
        state = checkpoint["state"][:, dist.rank * rows_per_rank:(dist.rank + 1) * rows_per_rank].to(device)
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
    wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist.enabled else model

    log = RunLog(config.out, dist.main)
    log.save_config(config, model_config, tokenizer)
    provenance = {"corpus": [os.path.basename(p) for p in config.corpus], "corpus_sha256": corpus.sha256,
                  "train_lines": len(train_lines), "val_lines": len(val_lines)}

    def payload() -> dict:
        full_state = dist.gather_rows(state.detach()) if state is not None else None
        weights = model.state_dict()
        if dist.main:  # only its payload is written: where served text starts, the stream's state between lines
            weights = {**weights, "start_state": line_start_state(model, train_sequences, seed=config.seed)}
        return {"model_config": model_config.to_dict(), "train_config": config.to_dict(),
                "tokenizer": tokenizer.to_bytes(), "model": weights,
                "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch, "window": window,
                "state": full_state.cpu() if full_state is not None else None, "elapsed": elapsed,
                "best_val_loss": best, "provenance": provenance, "torch_version": str(torch.__version__),
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}

    def save(names: tuple[str, ...]) -> None:
        data = payload()  # every rank joins the state gather
        if dist.main:
            for name in names:
                save_checkpoint(os.path.join(config.out, name), data)

    def validate() -> float | None:
        nonlocal best
        if val_rows is None:
            save((LAST,))
            return None
        loss = evaluate(model, val_rows, config.bptt, device, dist, 2 if config.dry_run else None)
        log.write({"kind": "val", "step": step, "epoch": epoch, "loss": loss, "ppl": math.exp(min(loss, 50))})
        improved = loss < best
        best = min(best, loss)
        save((LAST, BEST) if improved else (LAST,))
        log.plot()
        return loss

    progress = None
    if dist.main and sys.stderr.isatty():
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=min(step, total_steps), unit="step", dynamic_ncols=True)
    if dist.main:
        print(f"{PROG}: {tokenizer.kind} tokenizer, {tokenizer.vocab_size} tokens; {model_config.cell} "
              f"{model_config.num_layers}x{model_config.hidden_size}, "
              f"{sum(p.numel() for p in model.parameters()):,} parameters; {len(train_lines)} training lines "
              f"({total_tokens:,} tokens), {len(val_lines)} validation lines; device {device}"
              + (f", {dist.world_size} processes" if dist.enabled else ""), file=sys.stderr)

    model.train()
    started = time.perf_counter() - elapsed
    rate_tokens, rate_started = 0, time.perf_counter()
    last_loss = None
    stop_reason = "done"
    with StopFlag() as stop:
        while epoch < config.epochs and stop_reason == "done":
            rows = batchify(make_stream(train_sequences, shuffle_seed=config.seed * 100003 + epoch),
                            config.batch_size, dist.rank, dist.world_size)
            if state is None or window == 0:
                state = model.zero_state(rows.size(0))
            for index, inputs, targets in windows(rows, config.bptt, start=window):
                if max_steps is not None and step >= max_steps:
                    stop_reason = "max_steps"
                    break
                if config.time_budget and elapsed >= config.time_budget:
                    stop_reason = "time_budget"
                    break
                if stop.signal is not None:
                    stop_reason = "interrupted"
                    break
                lr = learning_rate(config, step, total_steps, elapsed)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                logits, new_state = wrapped(inputs, state)
                loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
                if not torch.isfinite(loss):
                    kept = os.path.join(config.out, LAST)
                    raise TrainingError(
                        f"the loss became {loss.item()} at step {step + 1}; stopped without saving it. "
                        + (f"The last good checkpoint is {kept}. " if os.path.exists(kept) else "No checkpoint was written yet. ")
                        + "Try a lower --lr or --clip.")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), config.clip, foreach=True)
                optimizer.step()
                state = new_state.detach()  # truncate backpropagation here, carry the values on
                step += 1
                window = index + 1
                elapsed = time.perf_counter() - started
                rate_tokens += targets.numel() * dist.world_size
                if step % 20 == 0 or step == 1:
                    last_loss = dist.sum(loss.item())[0] / dist.world_size  # the global mean, not rank 0's
                    now = time.perf_counter()
                    tokens_per_s = rate_tokens / max(1e-9, now - rate_started)
                    rate_tokens, rate_started = 0, now
                    log.write({"kind": "train", "step": step, "epoch": epoch, "loss": last_loss,
                               "ppl": math.exp(min(last_loss, 50)), "lr": lr, "tokens_per_s": tokens_per_s,
                               "elapsed": elapsed})
                    if progress is not None:
                        progress.set_postfix(loss=f"{last_loss:.3f}", ppl=f"{math.exp(min(last_loss, 50)):.1f}",
                                             tok_s=f"{tokens_per_s:,.0f}", refresh=False)
                if progress is not None:
                    progress.update(1)
                if step % config.save_every == 0:
                    save((LAST,))
                if config.eval_every and step % config.eval_every == 0:
                    validate()
            else:
                # the epoch ran to its end
                epoch, window, state = epoch + 1, 0, None
                val_loss = validate()
                if dist.main:
                    print(f"{PROG}: epoch {epoch} step {step} "
                          + (f"validation perplexity {math.exp(min(val_loss, 50)):.2f}" if val_loss is not None else ""),
                          file=sys.stderr)
        if progress is not None:
            progress.close()
        if stop_reason != "done":
            val_loss = validate()
            if dist.main:
                ppl = f", validation perplexity {math.exp(min(val_loss, 50)):.2f}" if val_loss is not None else ""
                print(f"{PROG}: stopped ({stop_reason.replace('_', ' ')}) at step {step}{ppl}", file=sys.stderr)
    if dist.main:
        where = os.path.join(config.out, BEST if os.path.exists(os.path.join(config.out, BEST)) else LAST)
        print(f"{PROG}: checkpoint {where}", file=sys.stderr)
        if stop_reason == "interrupted":
            print(f"{PROG}: interrupted; continue with --resume {config.out}", file=sys.stderr)
    dist.close()
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
