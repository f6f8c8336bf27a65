"""The served model and the objects built on it: what the servicer calls."""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import torch

from service.model.artifact import Artifact, load_artifact
from service.model.batching import BatchingModel
from service.model.generation import GenerationParams, Generator
from service.model.hardware import ThreadPlan, resolve_device
from service.model.mix import MixedModel, served_model
from service.model.personal_mix import NextTokens
from service.model.pinyin import Converter
from service.model.pinyin_lattice import Lexicon, reads_chinese
from service.model.steps import ScriptedModel
from service.model.suggest import SuggestConfig, Suggester

log = logging.getLogger("nextword")


class EngineOptions(Protocol):
    """What loading an engine reads of a server's configuration (service/api/config.py ServerConfig)."""

    @property
    def models(self) -> list[tuple[str, str]]: ...

    @property
    def device(self) -> str: ...

    @property
    def half(self) -> bool: ...

    @property
    def ngram(self) -> bool: ...

    @property
    def threads(self) -> int: ...

    @property
    def batching(self) -> bool: ...

    @property
    def max_batch_size(self) -> int: ...

    @property
    def max_batch_wait_ms(self) -> float: ...

    @property
    def drop_ended(self) -> bool: ...

    @property
    def max_context_tokens(self) -> int: ...


@dataclass
class Engine:
    artifact: Artifact
    model: ScriptedModel | MixedModel | BatchingModel
    suggester: Suggester
    generator: Generator
    name: str = ""  # what requests call it (ServerConfig.models)
    path: str = ""
    converter: Converter | None = None  # pinyin conversion, for a model that reads Chinese
    version: str = ""  # the file's sha256, short: a client can tell that the model changed under it
    loaded_at: float = 0.0  # unix seconds

    def __post_init__(self) -> None:
        self.calls = 0  # calls using this engine now (a reload retires it once none does)
        self._calls_lock = threading.Condition()

    def enter(self) -> None:
        with self._calls_lock:
            self.calls += 1

    def leave(self) -> None:
        with self._calls_lock:
            self.calls -= 1
            self._calls_lock.notify_all()

    def retire(self, timeout: float | None = None) -> bool:
        """Wait until no call uses this engine (at most ``timeout`` s), then stop its worker; True if it was idle."""
        with self._calls_lock:
            idle = self._calls_lock.wait_for(lambda: self.calls <= 0, timeout)
        self.close()
        return idle

    @classmethod
    def load(cls, config: EngineOptions, threads: ThreadPlan | None = None, name: str = "", path: str = "") -> Engine:
        """The model ``path`` named ``name`` (default: the config's first); ``threads``: the server's thread
        plan (by default the one ``config`` implies)."""
        if not path:
            name, path = config.models[0]
        threads = threads or ThreadPlan.for_server(config.threads, config.batching)
        device = resolve_device(config.device)
        artifact = load_artifact(path, "cpu")
        quantization = artifact.manifest.quantization
        if quantization == "int8" and device != "cpu":
            raise ValueError(
                f"{path} has {quantization} weights, which run on CPU only; "
                "serve it with --device cpu, or export the model without --quantize for the GPU"
            )
        if quantization == "int8" and artifact.torch_ao_int8:
            log.warning(
                "%s: int8 weights in torch.ao's format, which torch deprecates (its warning above); it serves "
                "as before. Export it again with --quantize int8 for nextword's own int8 layers",
                path,
            )
        elif quantization == "int8" and not torch.backends.mkldnn.is_available():
            raise ValueError(f"{path} has int8 weights, which need oneDNN; this torch was built without it")
        if device == "cpu":
            threads.choose_rnn_kernels()
        network = ScriptedModel(
            artifact.model, artifact.tokenizer.vocab_size, device, half=config.half and device == "cuda"
        )
        model: ScriptedModel | MixedModel | BatchingModel = served_model(network, artifact, config.ngram)
        if config.batching or device != "cpu":
            # On a GPU one thread, the worker, runs every forward: each thread that touches CUDA gets
            # cuBLAS and cuDNN handles and workspaces of its own, and a request thread per call would
            # fill the GPU's memory with them. Without batching, it runs one call's step per forward.
            model = BatchingModel(
                model,
                config.max_batch_size if config.batching else 1,
                config.max_batch_wait_ms / 1000.0,
                threads.worker,
                config.drop_ended,
                inline=device == "cpu" and threads.worker == 1 and threads.others == 1,
            )
        suggester = Suggester(model, artifact.tokenizer, SuggestConfig(max_context_tokens=config.max_context_tokens))
        generator = Generator(model, artifact.tokenizer, config.max_context_tokens)
        converter = None
        if reads_chinese(artifact.tokenizer):
            converter = Converter(
                model, artifact.tokenizer, Lexicon.load(), max_context_tokens=config.max_context_tokens
            )
        return cls(artifact, model, suggester, generator, name, path, converter, file_version(path), time.time())

    def warm_up(self) -> None:
        """One call of each path, so the first user does not pay for lazy initialisation."""
        for text in ("The", "The ", "我"):
            self.suggester.suggest(text, 3)
        for _ in self.generator.generate("The", GenerationParams(temperature=0, max_tokens=4)):
            pass
        if self.converter is not None:
            self.converter.convert("我", "nihaozgr")

    @functools.cached_property
    def next_tokens(self) -> NextTokens:
        """A user's predicted words as next tokens of this model (Generate for a user), built at first use."""
        return NextTokens(self.artifact.tokenizer)

    @property
    def mixed(self) -> bool:
        """The served distribution is the network mixed with the n-gram memory."""
        inner = self.model.model if isinstance(self.model, BatchingModel) else self.model
        return isinstance(inner, MixedModel)

    def close(self) -> None:
        """Stop the model worker (batching), after the calls that use it have ended."""
        if isinstance(self.model, BatchingModel):
            self.model.close()


def file_version(path: str) -> str:
    """A model file's version: the first 12 hex digits of its sha256."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def by_name(engines: Engine | dict[str, Engine]) -> dict[str, Engine]:
    """The served models by name; one engine without a name is called "default"."""
    if isinstance(engines, dict):
        return engines
    engines.name = engines.name or "default"
    return {engines.name: engines}
