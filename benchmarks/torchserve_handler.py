"""A TorchServe handler doing a nextword Suggest's work, for benchmarks/peer.py (not part of the service).

For a batch of texts that end after a word (with a space), as the benchmark sends them: nextword's
tokenizer reads each text, the served model (the network mixed with the file's n-gram memory, the
same StepModel nextword serves) runs one step per group of equal token length, and nextword's
Suggester picks the top 3 words. The answer is JSON: [[word, probability], ...], which
benchmarks/peer.py checks against Suggest's.

TorchServe runs it with nextword's checkout on PYTHONPATH (benchmarks/peer.py sets it).
"""

from __future__ import annotations

import json
import os

import torch

from service.model.artifact import load_artifact
from service.model.hardware import ThreadPlan
from service.model.mix import served_model
from service.model.steps import ScriptedModel
from service.model.suggest import Suggester
from service.model.tokenizer import BOS

SUGGESTIONS = 3
NGRAM_ENV = "NEXTWORD_PEER_NGRAM"  # "0": the network alone, as nextword-serve --no-ngram


class NextWordHandler:
    def __init__(self) -> None:
        self.suggester: Suggester | None = None

    def initialize(self, context) -> None:
        properties = context.system_properties
        path = os.path.join(properties["model_dir"], context.manifest["model"]["serializedFile"])
        artifact = load_artifact(path)
        # the recurrent kernels nextword's server picks for a model run on this many intra-op threads
        ThreadPlan(worker=None, others=torch.get_num_threads()).choose_rnn_kernels()
        network = ScriptedModel(artifact.model, artifact.tokenizer.vocab_size, "cpu")
        ngram = os.environ.get(NGRAM_ENV, "1") != "0"
        self.suggester = Suggester(served_model(network, artifact, ngram), artifact.tokenizer)

    @torch.inference_mode()
    def handle(self, data, context) -> list[str]:
        suggester = self.suggester
        texts = [(row.get("data") or row.get("body")).decode("utf-8") for row in data]
        splits = [suggester.split(text) for text in texts]
        ids = [[BOS, *suggester.context_ids(split)] for split in splits]
        groups: dict[int, list[int]] = {}
        for index, row in enumerate(ids):
            groups.setdefault(len(row), []).append(index)
        answers: list[str] = [""] * len(texts)
        for members in groups.values():
            tokens = torch.tensor([ids[i] for i in members], dtype=torch.int64)
            log_probs, states = suggester.model.advance(tokens, suggester.model.init_state(len(members)))
            for row, index in enumerate(members):
                found = suggester.suggest_from(splits[index], log_probs[row], states[:, row : row + 1], SUGGESTIONS)
                answers[index] = json.dumps(found.suggestions)
        return answers


_service = NextWordHandler()


def handle(data, context):
    """TorchServe's entry point for a module handler."""
    if _service.suggester is None:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
