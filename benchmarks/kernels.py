"""CPU recurrent kernels: ATen's own (what the service runs) against oneDNN's (torch's default).

    python -m benchmarks.kernels [--model models/default.pt] [--rounds 8]

In one process with one intra-op thread (a default worker's share here; ``--threads``), the two settings of
``torch.backends.mkldnn.enabled`` alternated round by round, the median round of each printed:
  * one forward (``forward_last``) of B rows of T tokens, for the shapes a server runs: a lone
    step (1 x 1), a context (1 x 8), a beam or a batch of keystrokes (8 x 1, 32 x 1);
  * Generate, milliseconds per token, 128 tokens, the network alone and the served mix.
The ratio is oneDNN's time over ATen's: above 1, ATen's kernels are faster.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics

import torch

from benchmarks.convert import timed
from service.artifact import load_artifact
from service.generation import GenerationParams, Generator
from service.hardware import use_intra_op_threads
from service.mix import served_model
from service.runner import ScriptedModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = ((1, 1), (1, 8), (8, 1), (32, 1))
SETTINGS = (("oneDNN", True), ("ATen", False))
PROMPT = "And God said "


def alternated(call, rounds: int, repeats: int) -> dict[str, float]:
    """The median over ``rounds`` of each setting's median, the settings alternated round by round."""
    runs: dict[str, list[float]] = {name: [] for name, _ in SETTINGS}
    for _ in range(rounds):
        for name, enabled in SETTINGS:
            torch.backends.mkldnn.enabled = enabled
            # one warm-up call first: the setting's first call may build its kernels
            runs[name].append(statistics.median(timed(call, [()], repeats)))
    return {name: statistics.median(values) for name, values in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description="nextword: CPU recurrent kernels, ATen's against oneDNN's")
    parser.add_argument("--model", default=os.path.join(ROOT, "models", "default.pt"))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1: a default worker's)")
    args = parser.parse_args()
    use_intra_op_threads(args.threads)
    artifact = load_artifact(args.model)
    network = ScriptedModel(artifact.model, artifact.tokenizer.vocab_size)
    print(f"model {args.model}; torch {torch.__version__}; {args.threads} intra-op thread(s); {args.rounds} rounds\n")
    print("| work | oneDNN ms | ATen ms | oneDNN / ATen |")
    print("| --- | --- | --- | --- |")
    with torch.inference_mode():
        for rows, length in SHAPES:
            tokens = torch.randint(4, artifact.tokenizer.vocab_size, (rows, length))
            state = network.init_state(rows)
            times = alternated(functools.partial(network.advance, tokens, state), args.rounds, 50)
            _row(f"one forward, {rows} x {length} tokens", times)
    params = GenerationParams(max_tokens=128, seed=1)
    for name, model in (("network alone", network), ("served mix", served_model(network, artifact))):
        generator = Generator(model, artifact.tokenizer)
        tokens = _generate(generator, params)
        times = alternated(functools.partial(_generate, generator, params), args.rounds, 1)
        _row(f"Generate, {name}, per token", {k: v / tokens for k, v in times.items()})


def _generate(generator: Generator, params: GenerationParams) -> int:
    """One Generate from the same prompt; the tokens it made."""
    return list(generator.generate(PROMPT, params))[-1].generated_tokens


def _row(work: str, times: dict[str, float]) -> None:
    ratio = times["oneDNN"] / times["ATen"]
    print(f"| {work} | {times['oneDNN']:.3f} | {times['ATen']:.3f} | {ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
