"""One process or many (torchrun): the device, the rank, and the sums and gathers across ranks."""

from __future__ import annotations

import os

import torch

from service.model.hardware import resolve_device


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what was kept."""


def pick_device(name: str) -> torch.device:
    try:
        name = resolve_device(name)
    except ValueError as error:
        raise TrainingError(str(error)) from None
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per local process
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


class Distributed:
    """Rank and world size under torchrun (WORLD_SIZE set), or a single process."""

    def __init__(self, device: torch.device) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.enabled = self.world_size > 1
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: float) -> list[float]:
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def gather_rows(self, state: torch.Tensor) -> torch.Tensor:
        """Each rank's state [L, b, S] -> the whole batch [L, b*W, S] (on every rank)."""
        if not self.enabled:
            return state
        parts = [torch.empty_like(state) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, state.contiguous())
        return torch.cat(parts, dim=1)

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            # Leave together: a rank that tears down its connections while rank 0 is still
            # writing can abort in Gloo's teardown.
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
