"""What a run writes besides its checkpoints: metrics.jsonl, curves.png and config.json."""

from __future__ import annotations

import json
import os

from service.model.atomic import atomic_write
from training.config import TrainConfig
from training.model import ModelConfig


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
