"""The served model file: one TorchScript archive with its manifest and tokenizer inside.

    model.pt (zip, written by torch.jit.save)
    ├── the scripted network: forward(tokens [B, T], state [L, B, S]) -> (logits [B, T, V], state)
    │                         init_state(batch) -> state [L, B, S]  (where every text starts)
    └── extra files
        ├── manifest.json   format version, model config, tokenizer kind and special ids,
        │                   provenance (corpus names and hashes, steps, validation perplexity),
        │                   creation time, torch version, checksums of the weights and tokenizer
        └── tokenizer.bin   service.tokenizer.Tokenizer.to_bytes()

This module is the only reader and writer of the format, and needs torch,
sentencepiece and the standard library alone (never training/).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from service.tokenizer import Tokenizer, load_tokenizer

FORMAT = "nextword-model"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.bin"


class ArtifactError(ValueError):
    """A model file cannot be loaded; the message names the file and the problem."""


@dataclass
class Artifact:
    path: str
    model: torch.jit.ScriptModule
    manifest: dict[str, Any]
    tokenizer: Tokenizer


def atomic_write(path: str, write: Callable, verify: Callable[[str], None] | None = None) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file, check it, then rename.

    A crash at any moment leaves the old file or the new one, never half of one;
    if ``verify(temporary_path)`` raises, no file is left behind.
    """
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if verify is not None:
            verify(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _digest_value(digest, value) -> None:
    """Float tensors as float32 bytes; int8-quantised ones as their integers and scales; packed
    parameters (int8 layers) through their serialised state; other values by their repr."""
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu")
        if value.is_quantized:
            digest.update(value.int_repr().contiguous().numpy().tobytes())
            value = value.q_per_channel_scales() if value.qscheme() in (
                torch.per_channel_affine, torch.per_channel_symmetric) else torch.tensor([value.q_scale()])
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
        if "_weight_bias" in c._method_names():          # int8 Linear
            yield name, c._get_method("_weight_bias")()
        param = getattr(sub, "param", None)
        if isinstance(param, torch.ScriptObject):          # int8 LSTM/GRU/RNN cell parameters
            yield name, param.__getstate__()


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (and int8 packed weights), by name."""
    digest = hashlib.sha256()
    for name, value in [*sorted(module.state_dict().items()), *_packed_weights(module)]:
        digest.update(name.encode())
        _digest_value(digest, value)
    return digest.hexdigest()


def write_artifact(path: str, scripted: torch.jit.ScriptModule, manifest: dict[str, Any], tokenizer: Tokenizer,
                   verify: Callable[[str], None] | None = None) -> None:
    tokenizer_bytes = tokenizer.to_bytes()
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **manifest,
        "weights_sha256": weights_digest(scripted),
        "tokenizer_sha256": hashlib.sha256(tokenizer_bytes).hexdigest(),
    }
    extra = {MANIFEST_FILE: json.dumps(manifest, indent=2, ensure_ascii=False), TOKENIZER_FILE: tokenizer_bytes}
    atomic_write(path, lambda handle: torch.jit.save(scripted, handle, _extra_files=extra), verify)


def load_artifact(path: str, device: str | torch.device = "cpu") -> Artifact:
    if not os.path.isfile(path):
        raise ArtifactError(f"model file not found: {path}")
    extra = {MANIFEST_FILE: "", TOKENIZER_FILE: ""}
    try:
        model = torch.jit.load(path, map_location=device, _extra_files=extra)
    except (RuntimeError, ValueError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ArtifactError(f"not a nextword model file, or a damaged one: {path} ({first})") from None
    if not extra[MANIFEST_FILE]:
        raise ArtifactError(f"not a nextword model file: {path} has no {MANIFEST_FILE} (export it with nextword-export)")
    try:
        manifest = json.loads(extra[MANIFEST_FILE])
    except ValueError:
        raise ArtifactError(f"damaged model file: {path} has an unreadable {MANIFEST_FILE}") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"not a nextword model file: {path} (manifest format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path} has format version {manifest.get('format_version')}; "
                            f"this nextword reads version {FORMAT_VERSION}: re-export it")
    tokenizer_bytes = extra[TOKENIZER_FILE]  # torch.jit.load fills extra files with bytes
    if hashlib.sha256(tokenizer_bytes).hexdigest() != manifest.get("tokenizer_sha256"):
        raise ArtifactError(f"damaged model file: {path} (the tokenizer's checksum does not match)")
    if weights_digest(model) != manifest.get("weights_sha256"):
        raise ArtifactError(f"damaged model file: {path} (the weights' checksum does not match)")
    try:
        tokenizer = load_tokenizer(tokenizer_bytes)
    except (ValueError, RuntimeError) as error:
        raise ArtifactError(f"damaged model file: {path} (tokenizer: {error})") from None
    model.eval()
    return Artifact(path=path, model=model, manifest=manifest, tokenizer=tokenizer)
