"""What a run writes besides its checkpoints (metrics.jsonl, curves.png and config.json), the progress
bar, and the signal flag that stops a run at a step boundary."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

import torch

from service.model.atomic import atomic_write
from training.config import TrainConfig
from training.model import ModelConfig

LOG_EVERY = 20  # steps between train lines in metrics.jsonl


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
            resolved = {
                "train": config.to_dict(),
                "model": model_config.to_dict(),
                "tokenizer": {
                    "kind": tokenizer.kind,
                    "vocab_size": tokenizer.vocab_size,
                    "lowercase": tokenizer.lowercase,
                },
            }
            text = json.dumps(resolved, indent=2, ensure_ascii=False).encode("utf-8")
            atomic_write(os.path.join(self.out, "config.json"), lambda handle: handle.write(text))

    def plot(self) -> None:
        if not self.enabled or not os.path.exists(self.path):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train: list[tuple[int, float]] = []
        val: list[tuple[int, float]] = []
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


class Progress:
    """The tqdm bar on a terminal (rank 0), and the train lines of metrics.jsonl every LOG_EVERY steps."""

    def __init__(self, run) -> None:  # a training.train.TrainingRun
        self.run = run
        self.bar = None
        if run.dist.main and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=run.total_steps, initial=min(run.step_count, run.total_steps), unit="step", dynamic_ncols=True
            )
        self.tokens, self.since = 0, time.perf_counter()

    def update(self, loss: torch.Tensor, tokens: int, lr: float) -> None:
        run = self.run
        self.tokens += tokens * run.dist.world_size
        if run.step_count % LOG_EVERY == 0 or run.step_count == 1:
            mean = run.dist.sum(loss.item())[0] / run.dist.world_size  # the global mean, not rank 0's
            now = time.perf_counter()
            tokens_per_s = self.tokens / max(1e-9, now - self.since)
            self.tokens, self.since = 0, now
            run.log.write(
                {
                    "kind": "train",
                    "step": run.step_count,
                    "epoch": run.epoch,
                    "loss": mean,
                    "ppl": math.exp(min(mean, 50)),
                    "lr": lr,
                    "tokens_per_s": tokens_per_s,
                    "elapsed": run.elapsed,
                }
            )
            if self.bar is not None:
                self.bar.set_postfix(
                    loss=f"{mean:.3f}",
                    ppl=f"{math.exp(min(mean, 50)):.1f}",
                    tok_s=f"{tokens_per_s:,.0f}",
                    refresh=False,
                )
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StopFlag:
    """Ctrl-C / SIGTERM ask the loop to stop at the next step boundary and save."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __enter__(self) -> StopFlag:
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
