"""Export a training checkpoint to one served model file.

    python -m training.export runs/kjv --out model.pt      (a run directory: its best checkpoint)
    python -m training.export runs/kjv/checkpoint_last.pt --out model.pt

The file is scripted with torch.jit.script and written through service.artifact.
Before it is renamed into place it is loaded back through service.artifact and
must give the eager model's logits and state on random inputs; otherwise the
export fails and leaves no file.

``--quantize int8``: dynamic int8 quantisation for CPU serving (torch.ao): the
recurrent layers' and the output layer's weights are stored as int8 and their
inputs quantised on the fly; embeddings and states stay float. About twice as
fast per batched step on CPU; judge its accuracy with nextword-eval on both
files (README, "Performance"). Quantised files run on CPU only.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from datetime import UTC, datetime

import torch

from service.artifact import ArtifactError, Manifest, Provenance, TokenizerSpec, load_artifact, write_artifact
from service.cli import OneLineParser
from service.tokenizer import load_tokenizer
from training.checkpoint import BEST, CheckpointError, load_checkpoint
from training.model import LanguageModel, ModelConfig

PROG = "nextword-export"


class ExportError(RuntimeError):
    pass


def check_parity(eager: torch.nn.Module, path: str, trials: int = 3) -> float:
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


QUANTIZATIONS = ("int8",)


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    with warnings.catch_warnings():  # torch.ao announces its successor (torchao); the pinned torch has it
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            model, {torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN, torch.nn.Linear}, dtype=torch.qint8
        )


def export(checkpoint_path: str, out: str, tolerance: float = 1e-4, quantize: str | None = None) -> Manifest:
    if os.path.isdir(checkpoint_path) and os.path.exists(os.path.join(checkpoint_path, BEST)):
        checkpoint_path = os.path.join(checkpoint_path, BEST)
    checkpoint = load_checkpoint(checkpoint_path)
    config = ModelConfig(**checkpoint["model_config"])
    model = LanguageModel(config)
    model.load_weights(checkpoint["model"])
    model.eval()
    tokenizer = load_tokenizer(checkpoint["tokenizer"])
    parameters = sum(p.numel() for p in model.parameters())
    if quantize == "int8":
        model = quantize_int8(model)
    elif quantize is not None:
        raise ExportError(f"unknown quantisation {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(model)
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

    def verify(temporary: str) -> None:
        difference = check_parity(model, temporary)
        if not difference <= tolerance:
            raise ExportError(
                f"the exported model differs from the trained one by {difference:.3g} "
                f"(tolerance {tolerance}); nothing was written"
            )

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    return write_artifact(out, scripted, manifest, tokenizer, verify=verify)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description="Export a training checkpoint to one TorchScript model file.")
    parser.add_argument("checkpoint", help="a checkpoint file, or a run directory (its best checkpoint)")
    parser.add_argument("--out", required=True, metavar="PATH", help="the model file to write, e.g. model.pt")
    parser.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        help="int8: dynamic int8 weights for faster CPU serving, CPU only (default: float weights)",
    )
    args = parser.parse_args(argv)
    try:
        manifest = export(args.checkpoint, args.out, quantize=args.quantize)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
