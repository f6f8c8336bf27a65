"""Training checkpoints: everything needed to resume exactly, written atomically.

A checkpoint is owned by training; the server never reads one (it reads the
artifact that ``training/export.py`` makes from it).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pickle
import zipfile
from typing import Any

import torch

from service.model.artifact import atomic_write

CHECKPOINT_FORMAT = "nextword-checkpoint"
CHECKPOINT_VERSION = 1
LAST, BEST = "checkpoint_last.pt", "checkpoint_best.pt"


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged or of another format."""


def save_checkpoint(path: str, payload: dict[str, Any]) -> None:
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}
    atomic_write(path, lambda handle: torch.save(payload, handle))
    # A process killed while writing leaves its temporary file behind; the checkpoint itself is whole.
    directory, name = os.path.split(os.path.abspath(path))
    for stale in glob.glob(os.path.join(directory, f".{glob.escape(name)}.tmp-*")):
        with contextlib.suppress(OSError):
            os.unlink(stale)


def load_checkpoint(path: str) -> dict[str, Any]:
    if os.path.isdir(path):
        path = os.path.join(path, LAST)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"checkpoint is damaged or not a nextword checkpoint: {path} ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"not a nextword checkpoint: {path}")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {payload.get('version')}; "
            f"this nextword reads version {CHECKPOINT_VERSION}"
        )
    return payload
