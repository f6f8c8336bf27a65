"""Recurrent kernels: the choices the service makes against the alternative, in one process.

    python -m benchmarks.kernels [--model models/default.pt] [--rounds 8] [--threads 1] [--device cpu]

On the CPU: ATen's own kernels (what a worker of one intra-op thread runs; ``--threads``, default one, a
default worker's share here) against oneDNN's (torch's default), the two settings of
``torch.backends.mkldnn.enabled``. On CUDA (``--device cuda``): each recurrent layer's weights in one
buffer (what ``ScriptedModel`` makes of them) against a buffer per weight, as the file loads them.

The two alternate round by round and the median round of each is printed:
  * one forward (``forward_last``) of B rows of T tokens, for the shapes a server runs: a lone
    step (1 x 1), a context (1 x 8), a beam or a batch of keystrokes (8 x 1, 32 x 1);
  * Generate, milliseconds per token, 128 tokens, the network alone and the served mix.
The ratio is the alternative's time over the service's choice: above 1, the service's choice is faster.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.convert import timed
from service.model.artifact import load_artifact
from service.model.generation import GenerationParams, Generator
from service.model.hardware import use_intra_op_threads
from service.model.mix import served_model
from service.model.steps import ScriptedModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = ((1, 1), (1, 8), (8, 1), (32, 1))
PROMPT = "And God said "


@dataclass
class Variant:
    name: str
    network: ScriptedModel
    enter: Callable[[], None] = lambda: None  # sets the process-wide switch this variant needs


def cpu_variants(artifact) -> list[Variant]:
    """oneDNN's kernels (the alternative) and ATen's (the service's choice), one network."""
    network = ScriptedModel(artifact.model, artifact.tokenizer.vocab_size)

    def switch(enabled: bool) -> Callable[[], None]:
        return lambda: setattr(torch.backends.mkldnn, "enabled", enabled)

    return [Variant("oneDNN", network, switch(True)), Variant("ATen", network, switch(False))]


def cuda_variants(path: str, vocab_size: int) -> list[Variant]:
    """A buffer per weight (the alternative) and one buffer per layer (the service's choice)."""
    loose = ScriptedModel(load_artifact(path, "cuda").model, vocab_size, "cuda")
    with torch.no_grad():
        for layer in loose.module.modules():
            for weight in getattr(layer, "_flat_weights", None) or []:
                weight.set_(weight.clone())  # a storage of its own again, as torch.jit.load made it
    compact = ScriptedModel(load_artifact(path, "cuda").model, vocab_size, "cuda")
    return [Variant("a buffer per weight", loose), Variant("one buffer per layer", compact)]


def alternated(variants: list[Variant], calls: list[Callable[[], object]], rounds: int, repeats: int) -> list[float]:
    """For each variant, the median over ``rounds`` of its call's median time, the variants alternated round by
    round (``calls[i]`` is variant i's)."""
    runs: list[list[float]] = [[] for _ in variants]
    for _ in range(rounds):
        for variant, call, times in zip(variants, calls, runs):
            variant.enter()
            # one warm-up call first: the setting's first call may build its kernels
            times.append(statistics.median(timed(call, [()], repeats)))
    return [statistics.median(times) for times in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description="nextword: recurrent kernels, the service's choice against the other")
    parser.add_argument("--model", default=os.path.join(ROOT, "models", "default.pt"))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1: a default worker's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    use_intra_op_threads(args.threads)
    artifact = load_artifact(args.model)
    vocab_size = artifact.tokenizer.vocab_size
    if args.device == "cuda":
        variants = cuda_variants(args.model, vocab_size)
        where = torch.cuda.get_device_name(0)
    else:
        variants = cpu_variants(artifact)
        where = f"{args.threads} intra-op thread(s)"
    other, chosen = (variant.name for variant in variants)
    print(f"model {args.model}; torch {torch.__version__}; {where}; {args.rounds} rounds\n")
    print(f"| work | {other} ms | {chosen} ms | {other} / {chosen} |")
    print("| --- | --- | --- | --- |")
    with torch.inference_mode():
        for rows, length in SHAPES:
            tokens = torch.randint(4, vocab_size, (rows, length))
            state = variants[0].network.init_state(rows)
            calls = [functools.partial(v.network.advance, tokens, state) for v in variants]
            _row(f"one forward, {rows} x {length} tokens", alternated(variants, calls, args.rounds, 50))
    params = GenerationParams(max_tokens=128, seed=1)
    for name, mixed in (("network alone", False), ("served mix", True)):
        models = [served_model(v.network, artifact) if mixed else v.network for v in variants]
        calls = [functools.partial(_generate, Generator(model, artifact.tokenizer), params) for model in models]
        tokens = calls[-1]()
        times = alternated(variants, calls, args.rounds, 1)
        _row(f"Generate, {name}, per token", [t / tokens for t in times])


def _generate(generator: Generator, params: GenerationParams) -> int:
    """One Generate from the same prompt; the tokens it made."""
    return list(generator.generate(PROMPT, params))[-1].generated_tokens


def _row(work: str, times: list[float]) -> None:
    other, chosen = times
    print(f"| {work} | {other:.3f} | {chosen:.3f} | {other / chosen:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
