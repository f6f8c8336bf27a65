"""Writing files so that a crash never leaves half of one."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import BinaryIO


def atomic_write(path: str, write: Callable[[BinaryIO], object], verify: Callable[[str], None] | None = None) -> None:
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
