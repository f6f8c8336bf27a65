"""The served model and the objects built on it: what the servicer calls."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from service.artifact import Artifact, load_artifact
from service.batching import BatchingModel
from service.config import ServerConfig
from service.generation import GenerationParams, Generator
from service.runner import ScriptedModel, resolve_device
from service.suggest import SuggestConfig, Suggester


@dataclass
class Engine:
    artifact: Artifact
    model: ScriptedModel | BatchingModel
    suggester: Suggester
    generator: Generator

    @classmethod
    def load(cls, config: ServerConfig) -> "Engine":
        device = resolve_device(config.device)
        threads = config.threads or torch.get_num_threads()
        if config.threads and not config.batching:
            torch.set_num_threads(config.threads)
        artifact = load_artifact(config.model, "cpu")
        if artifact.manifest.get("quantization", "none") != "none" and device != "cpu":
            raise ValueError(f"{config.model} has {artifact.manifest['quantization']} weights, which run on CPU only; "
                             "serve it with --device cpu, or export the model without --quantize for the GPU")
        model = ScriptedModel(artifact.model, artifact.tokenizer.vocab_size, device, half=config.half and device == "cuda")
        if config.batching:
            model = BatchingModel(model, config.max_batch_size, config.max_batch_wait_ms / 1000.0, threads)
        suggester = Suggester(model, artifact.tokenizer, SuggestConfig(max_context_tokens=config.max_context_tokens))
        generator = Generator(model, artifact.tokenizer, config.max_context_tokens)
        return cls(artifact, model, suggester, generator)

    def warm_up(self) -> None:
        """One call of each path, so the first user does not pay for lazy initialisation."""
        for text in ("The", "The ", "我"):
            self.suggester.suggest(text, 3)
        for _ in self.generator.generate("The", GenerationParams(temperature=0, max_tokens=4)):
            pass
