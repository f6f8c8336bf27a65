"""int8 weights: nextword's own (plain int8 tensors, oneDNN's int8 product) against the float network and
against torch.ao's dynamic quantisation (what ``--quantize int8`` wrote before, which torch deprecates), in
one run.

    python -m benchmarks.int8 [--model FLOAT.pt] [--text TEST.txt] [--max-lines 200] [--threads 1] [--rounds 8]

From one float model file, both int8 forms of its network are written to a temporary folder with the file's
tokenizer and n-gram memory, and loaded as the server loads them. Printed, each against float in the same
run: the file's size; one forward (``forward_last``, as the server runs it) for the shapes a server runs:
a lone step (1 x 1), a beam or a batch of keystrokes (8 x 1, 64 x 1), a context (1 x 20); Generate per
token (the served mix); the largest difference of a logit from float's; and with ``--text``, what
nextword-eval measures of the served mix on its first ``--max-lines`` lines. The forms alternate round by
round and the median round of each is printed.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile

import torch

from benchmarks.kernels import Variant, _generate, alternated
from service.model.artifact import Artifact, load_artifact
from service.model.generation import GenerationParams, Generator
from service.model.hardware import ThreadPlan, use_intra_op_threads
from service.model.mix import served_model
from service.model.steps import ScriptedModel
from training.data import read_corpus
from training.evaluate import network_scorer
from training.int8 import eager_network, quantize_int8, torch_ao_int8, write_int8
from training.scoring import score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = ((1, 1), (8, 1), (64, 1), (1, 20))
METRICS = (("perplexity", "perplexity", "{:.2f}"), ("top1", "top-1", "{:.1%}"), ("top3", "top-3", "{:.1%}"))
FORMS = ("float", "int8 (torch.ao)", "int8 (nextword)")


def largest_difference(artifacts: list[Artifact], vocab_size: int) -> list[float]:
    """Each file's largest |logit - float's| over 4 random lines of 30 tokens."""
    tokens = torch.randint(4, vocab_size, (4, 30), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        outputs = [a.model(tokens, a.model.init_state(4))[0] for a in artifacts]
    return [float((out - outputs[0]).abs().max()) for out in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description="nextword: int8 weights against float and torch.ao's int8")
    parser.add_argument("--model", default=os.path.join(ROOT, "models", "default.pt"), help="a float model file")
    parser.add_argument("--text", default="", help="held-out text for accuracy (none: speed only)")
    parser.add_argument("--max-lines", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1: a default worker's)")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    use_intra_op_threads(args.threads)
    ThreadPlan(worker=args.threads, others=args.threads).choose_rnn_kernels()  # as the server chooses
    float_artifact = load_artifact(args.model)
    if float_artifact.manifest.quantization != "none":
        raise SystemExit(f"{args.model} is not a float model file (it has {float_artifact.manifest.quantization})")
    vocab_size = float_artifact.tokenizer.vocab_size
    model, cell = eager_network(float_artifact)
    with tempfile.TemporaryDirectory() as folder:
        artifacts = [
            float_artifact,
            load_artifact(write_int8(float_artifact, torch_ao_int8(model), os.path.join(folder, "torch-ao.pt"))),
            load_artifact(write_int8(float_artifact, quantize_int8(model, cell), os.path.join(folder, "nextword.pt"))),
        ]
        sizes = [os.path.getsize(a.path) / 1e6 for a in artifacts]
    networks = [ScriptedModel(a.model, vocab_size) for a in artifacts]
    variants = [Variant(name, network) for name, network in zip(FORMS, networks)]
    print(f"model {args.model}; torch {torch.__version__}; {args.threads} intra-op thread(s); {args.rounds} rounds\n")
    print("| | " + " | ".join(FORMS[1:]) + " | float |")
    print("| --- | --- | --- | --- |")
    _row("file, MB", sizes, "{:.1f}")
    _row("largest logit difference from float", largest_difference(artifacts, vocab_size), "{:.3f}", ratio=False)
    with torch.inference_mode():
        for rows, length in SHAPES:
            tokens = torch.randint(4, vocab_size, (rows, length))
            state = networks[0].init_state(rows)
            calls = [functools.partial(network.advance, tokens, state) for network in networks]
            _row(f"one forward, {rows} x {length} tokens, ms", alternated(variants, calls, args.rounds, 30), "{:.3f}")
        params = GenerationParams(max_tokens=64, seed=1)
        generators = [Generator(served_model(n, a), a.tokenizer) for n, a in zip(networks, artifacts)]
        calls = [functools.partial(_generate, generator, params) for generator in generators]
        made = calls[0]()
        times = alternated(variants, calls, args.rounds, 1)
        _row("Generate (served mix), ms per token", [t / made for t in times], "{:.3f}")
    if args.text:
        lines = read_corpus([args.text]).lines[: args.max_lines]
        reports = []
        for name, artifact in zip(FORMS, artifacts):
            scorer, tokenizer = network_scorer(name, artifact)
            units, tally = score(scorer, tokenizer, lines, 3)
            reports.append(tally.report(units))
        print(f"\nserved mix on the first {len(lines)} lines of {args.text} ({units})\n")
        print("| | " + " | ".join(FORMS[1:]) + " | float |")
        print("| --- | --- | --- | --- |")
        for key, label, form in (*METRICS, ("ksr", "keystroke savings", "{:.1%}")):
            _row(label, [r[key] for r in reports], form, ratio=key == "perplexity")


def _row(label: str, values: list[float], form: str, ratio: bool = True) -> None:
    """Float first in ``values``; printed last, each int8 form with its ratio to float."""
    base, *others = values
    cells = [form.format(v) + (f" ({v / base:.2f}x)" if ratio and base else "") for v in others]
    print(f"| {label} | " + " | ".join(cells) + f" | {form.format(base)} |", flush=True)


if __name__ == "__main__":
    main()
