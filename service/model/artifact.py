"""The served model file: one TorchScript archive with its manifest and tokenizer inside.

    model.pt (zip, written by torch.jit.save)
    ├── the scripted network: forward(tokens [B, T], state [L, B, S]) -> (logits [B, T, V], state)
    │                         init_state(batch) -> state [L, B, S]  (where every text starts)
    └── extra files
        ├── manifest.json   format version, model config, tokenizer kind and special ids,
        │                   provenance (corpus names and hashes, steps, stream validation
        │                   perplexity),
        │                   creation time, torch version, checksums of the weights and tokenizer
        └── tokenizer.bin   service.model.tokenizer.Tokenizer.to_bytes()

This module is the only reader and writer of the format, and needs torch,
sentencepiece and the standard library alone (never training/).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch

from service.model.atomic import atomic_write
from service.model.memory import NgramMemory
from service.model.tokenizer import BOS, EOS, PAD, UNK, Tokenizer, load_tokenizer

FORMAT = "nextword-model"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.bin"
MEMORY_FILE = "memory.npz"
MIX_RULES = ("linear", "log-linear")  # how a file's memory may be mixed with its network (service/model/mix.py)


class ArtifactError(ValueError):
    """A model file cannot be loaded; the message names the file and the problem."""


@dataclass(frozen=True)
class TokenizerSpec:
    kind: str  # char | word | sentencepiece
    vocab_size: int
    lowercase: bool = False
    special_ids: dict[str, int] = field(
        default_factory=lambda: dict(zip(("pad", "bos", "eos", "unk"), (PAD, BOS, EOS, UNK)))
    )


@dataclass(frozen=True)
class Provenance:
    """Where the weights came from. ``stream_validation_perplexity`` is the training-time figure: the
    held-out lines read as one stream, the state carried from line to line. Served text starts every
    line from ``<s>``; nextword-eval measures that (a higher figure) on any text."""

    corpus: list[str] = field(default_factory=list)
    corpus_sha256: dict[str, str] = field(default_factory=dict)
    train_lines: int = 0
    val_lines: int = 0
    steps: int = 0
    epochs_completed: int = 0
    stream_validation_perplexity: float | None = None
    checkpoint: str = ""
    train_config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MemorySpec:
    """The n-gram memory (service/model/memory.py) and how the service mixes it with the network (mix.py)."""

    order: int  # n: contexts of up to n - 1 tokens
    min_count: int  # n-grams of 3+ tokens seen fewer times were pruned
    entries: int  # followers stored, over all orders
    weights: list[float]  # the memory's mixing weight by the longest context seen, 0 .. order - 1
    sha256: str = ""  # of the memory's bytes
    fitted_on: str = ""  # what the weights were fitted on, and the perplexities there
    rule: str = (
        "linear"  # how the two are mixed, one of MIX_RULES (service/model/mix.py); files before the choice: linear
    )


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` holds. The one place that knows its keys: readers use the fields."""

    network: dict[str, Any]  # training.model.ModelConfig as a dict (cell, num_layers, hidden_size, ...)
    parameters: int
    state_size: int
    tokenizer: TokenizerSpec
    provenance: Provenance = field(default_factory=Provenance)
    quantization: str = "none"  # none | int8 (CPU only) | float16 (stored so, served as float32)
    created: str = ""
    torch_version: str = ""
    weights_sha256: str = ""
    tokenizer_sha256: str = ""
    memory: MemorySpec | None = None  # None: the network alone (files exported without a memory)
    format_version: int = FORMAT_VERSION

    @property
    def cell(self) -> str:
        return self.network["cell"]

    @property
    def num_layers(self) -> int:
        return self.network["num_layers"]

    @property
    def hidden_size(self) -> int:
        return self.network["hidden_size"]

    def describe(self) -> str:
        """One phrase for logs: 'word tokenizer, lstm 2x256'."""
        return f"{self.tokenizer.kind} tokenizer, {self.cell} {self.num_layers}x{self.hidden_size}"

    def to_dict(self) -> dict[str, Any]:
        provenance = asdict(self.provenance)
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "model": self.network,
            "parameters": self.parameters,
            "quantization": self.quantization,
            "state_size": self.state_size,
            "tokenizer": asdict(self.tokenizer),
            "provenance": provenance,
            "created": self.created,
            "torch_version": self.torch_version,
            "weights_sha256": self.weights_sha256,
            "tokenizer_sha256": self.tokenizer_sha256,
            **({"memory": asdict(self.memory)} if self.memory is not None else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes, path: str = "the model file") -> Manifest:
        """Parse and check ``manifest.json``; an ArtifactError names ``path`` and what is wrong."""
        try:
            data = json.loads(text)
        except ValueError:
            raise ArtifactError(f"damaged model file: {path} has an unreadable {MANIFEST_FILE}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            raise ArtifactError(f"not a nextword model file: {path} (manifest format {found!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{path} has format version {data.get('format_version')}; "
                f"this nextword reads version {FORMAT_VERSION}: re-export it"
            )
        try:
            network, tokenizer = data["model"], data["tokenizer"]
            provenance = dict(data.get("provenance") or {})
            if "validation_perplexity" in provenance:  # files written before the figure was named for its kind
                provenance["stream_validation_perplexity"] = provenance.pop("validation_perplexity")
            known = {f.name for f in fields(Provenance)}
            manifest = cls(
                network=dict(network),
                parameters=int(data["parameters"]),
                state_size=int(data["state_size"]),
                tokenizer=TokenizerSpec(
                    kind=str(tokenizer["kind"]),
                    vocab_size=int(tokenizer["vocab_size"]),
                    lowercase=bool(tokenizer.get("lowercase", False)),
                    special_ids=dict(tokenizer.get("special_ids") or {}),
                ),
                provenance=Provenance(**{k: v for k, v in provenance.items() if k in known}),
                quantization=str(data.get("quantization", "none")),
                created=str(data.get("created", "")),
                torch_version=str(data.get("torch_version", "")),
                weights_sha256=str(data.get("weights_sha256", "")),
                tokenizer_sha256=str(data.get("tokenizer_sha256", "")),
                memory=MemorySpec(**data["memory"]) if data.get("memory") else None,
                format_version=data["format_version"],
            )
            missing = [key for key in ("cell", "num_layers", "hidden_size", "vocab_size") if key not in network]
            if missing:
                raise KeyError(f"model.{missing[0]}")
        except (KeyError, TypeError, ValueError) as error:
            raise ArtifactError(
                f"damaged model file: {path} has an incomplete {MANIFEST_FILE} ({type(error).__name__}: {error})"
            ) from None
        if manifest.memory is not None and manifest.memory.rule not in MIX_RULES:
            raise ArtifactError(
                f"{path} mixes its n-gram memory by the rule {manifest.memory.rule!r}, which this nextword does not "
                f"serve ({', '.join(MIX_RULES)}): upgrade nextword or re-export the file"
            )
        return manifest


@dataclass
class Artifact:
    path: str
    model: torch.jit.ScriptModule
    manifest: Manifest
    tokenizer: Tokenizer
    memory: NgramMemory | None = None

    @property
    def torch_ao_int8(self) -> bool:
        """int8 layers in torch.ao's packed form, which torch deprecates: what ``--quantize int8`` wrote
        before nextword's own int8 layers (training/int8.py). Such files still load and serve."""
        return any(True for _ in _packed_weights(self.model))


def _digest_value(digest, value) -> None:
    """Float tensors as float32 bytes; int8-quantised ones as their integers and scales; packed
    parameters (int8 layers) through their serialised state; other values by their repr."""
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu")
        if value.is_quantized:
            digest.update(value.int_repr().contiguous().numpy().tobytes())
            value = (
                value.q_per_channel_scales()
                if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
                else torch.tensor([value.q_scale()])
            )
        digest.update(value.to(torch.float32).contiguous().numpy().tobytes())
    elif isinstance(value, (tuple, list)):
        for item in value:
            _digest_value(digest, item)
    elif isinstance(value, torch.ScriptObject) and hasattr(value, "__getstate__"):
        _digest_value(digest, value.__getstate__())
    else:
        digest.update(repr(value).encode())


def _packed_weights(module: torch.nn.Module):
    """The int8 weights of a scripted quantised model, which its state_dict does not list."""
    for name, sub in module.named_modules():
        c = getattr(sub, "_c", None)
        if c is None:
            continue
        if "_weight_bias" in c._method_names():  # int8 Linear
            yield name, c._get_method("_weight_bias")()
        param = getattr(sub, "param", None)
        if isinstance(param, torch.ScriptObject):  # int8 LSTM/GRU/RNN cell parameters
            yield name, param.__getstate__()


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (and int8 packed weights), by name."""
    digest = hashlib.sha256()
    for name, value in [*sorted(module.state_dict().items()), *_packed_weights(module)]:
        digest.update(name.encode())
        _digest_value(digest, value)
    return digest.hexdigest()


def write_artifact(
    path: str,
    scripted: torch.jit.ScriptModule,
    manifest: Manifest,
    tokenizer: Tokenizer,
    verify: Callable[[str], None] | None = None,
    memory: NgramMemory | None = None,
) -> Manifest:
    """Write the file (atomically; ``verify(temporary_path)`` may refuse it); returns the manifest as written.
    With ``memory``, ``manifest.memory`` must describe it; its checksum is filled in here."""
    tokenizer_bytes = tokenizer.to_bytes()
    manifest = replace(
        manifest, weights_sha256=weights_digest(scripted), tokenizer_sha256=hashlib.sha256(tokenizer_bytes).hexdigest()
    )
    extra: dict[str, Any] = {TOKENIZER_FILE: tokenizer_bytes}
    if memory is not None:
        if manifest.memory is None:
            raise ValueError("an n-gram memory needs its MemorySpec in the manifest")
        extra[MEMORY_FILE] = memory.to_bytes()
        manifest = replace(
            manifest, memory=replace(manifest.memory, sha256=hashlib.sha256(extra[MEMORY_FILE]).hexdigest())
        )
    extra[MANIFEST_FILE] = manifest.to_json()
    atomic_write(path, lambda handle: torch.jit.save(scripted, handle, _extra_files=extra), verify)
    return manifest


def load_artifact(path: str, device: str | torch.device = "cpu") -> Artifact:
    if not os.path.isfile(path):
        raise ArtifactError(f"model file not found: {path}")
    extra: dict[str, Any] = {MANIFEST_FILE: "", TOKENIZER_FILE: "", MEMORY_FILE: ""}
    try:
        model = torch.jit.load(path, map_location=device, _extra_files=extra)
    except (RuntimeError, ValueError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ArtifactError(f"not a nextword model file, or a damaged one: {path} ({first})") from None
    if not extra[MANIFEST_FILE]:
        raise ArtifactError(
            f"not a nextword model file: {path} has no {MANIFEST_FILE} (export it with nextword-export)"
        )
    manifest = Manifest.from_json(extra[MANIFEST_FILE], path)
    tokenizer_bytes = extra[TOKENIZER_FILE]  # torch.jit.load fills extra files with bytes
    if hashlib.sha256(tokenizer_bytes).hexdigest() != manifest.tokenizer_sha256:
        raise ArtifactError(f"damaged model file: {path} (the tokenizer's checksum does not match)")
    if weights_digest(model) != manifest.weights_sha256:
        raise ArtifactError(f"damaged model file: {path} (the weights' checksum does not match)")
    try:
        tokenizer = load_tokenizer(tokenizer_bytes)
    except (ValueError, RuntimeError) as error:
        raise ArtifactError(f"damaged model file: {path} (tokenizer: {error})") from None
    memory = None
    if manifest.memory is not None:
        data = extra[MEMORY_FILE]
        if hashlib.sha256(data).hexdigest() != manifest.memory.sha256:
            raise ArtifactError(f"damaged model file: {path} (the n-gram memory's checksum does not match)")
        try:
            memory = NgramMemory.from_bytes(data)
        except ValueError as error:
            raise ArtifactError(f"damaged model file: {path} ({error})") from None
        if memory.vocab_size != tokenizer.vocab_size or memory.order != len(manifest.memory.weights):
            raise ArtifactError(f"damaged model file: {path} (the n-gram memory does not fit the model)")
    if manifest.quantization == "float16":
        model.float()  # stored as float16 (half the room), served as float32
    model.eval()
    return Artifact(path=path, model=model, manifest=manifest, tokenizer=tokenizer, memory=memory)
