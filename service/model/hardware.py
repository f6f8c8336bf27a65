"""Where torch runs: the device, and how many CPU threads each thread of a server gets.

Why a thread plan: OpenMP teams belong to the thread that starts them, and once the
threads of all teams outnumber the cores, GNU OpenMP stops spinning between parallel
regions, so a small forward (many short regions) slows down (docs/performance.md). A batching
server therefore gives the model worker all the intra-op threads and every other
thread (request threads, the main thread) one, so that only one team exists. Without
batching, request threads run the model themselves and share torch's setting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

MAX_DEFAULT_WORKERS = 4  # on the CPU: each worker holds a copy of the model in memory
MAX_DEFAULT_CUDA_WORKERS = 16  # on CUDA: the most measured (docs/performance.md, GPU hosts)
GPU_MEMORY_PER_WORKER = 2 << 30  # bytes: a worker's CUDA context and model held 0.8 GB idle, 1.75 GB at most


def resolve_device(name: str) -> str:
    """ "auto" -> "cuda" when available, else "cpu"; "cuda" without a CUDA device is a ValueError."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


# What torch's messages say when the GPU itself failed, also inside a TorchScript traceback: a CUDA context
# that has seen one of these usually stays broken, so the process restarts (service/api/server.py)
_DEVICE_FAILURES = (
    "CUDA error",
    "CUDA out of memory",
    "CUDA driver error",
    "cuDNN error",
    "CUDNN_STATUS_",
    "CUBLAS_STATUS_",
)


DEVICE_FAILED_EXIT = 3  # the exit status of a server process whose GPU failed


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the GPU running out of memory: it fails the calls of one batch, and the device, the
    worker and the calls after it go on (unlike ``device_failure``)."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "CUDA out of memory" in str(error)
    )


def device_failure(error: BaseException) -> str | None:
    """What went wrong when ``error`` is the GPU failing (the line of torch's message that says so), else None."""
    if not isinstance(error, RuntimeError):
        return None
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    said = [line for line in lines if any(marker in line for marker in _DEVICE_FAILURES)]
    if said:
        return said[-1]
    return (lines[0] if lines else "CUDA out of memory") if isinstance(error, torch.cuda.OutOfMemoryError) else None


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container's cpuset limits)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def gpu_memory() -> int:
    """Bytes of memory on the first CUDA device (0 when none can be read)."""
    try:
        return torch.cuda.get_device_properties(0).total_memory
    except (AssertionError, RuntimeError):
        return 0


def default_workers(device: str) -> int:
    """--workers 0: one server process per usable core, at most MAX_DEFAULT_WORKERS (each holds a copy of the
    model); on CUDA at most MAX_DEFAULT_CUDA_WORKERS, which share the GPU: there the per-call Python, not the
    model, sets the pace, so every core that runs a worker adds answers (``python -m benchmarks.scale``:
    16 workers answered 2.1x as many calls as 4 at 256 clients on a 16-core H200 host), and no more than
    one per GPU_MEMORY_PER_WORKER of the GPU's memory. docs/performance.md has the measurements."""
    if device == "cuda":
        fit = gpu_memory() // GPU_MEMORY_PER_WORKER or MAX_DEFAULT_WORKERS
        return max(1, min(usable_cores(), MAX_DEFAULT_CUDA_WORKERS, fit))
    return max(1, min(usable_cores(), MAX_DEFAULT_WORKERS))


def use_native_rnn_kernels() -> None:
    """Run CPU recurrent layers (LSTM, GRU, RNN) on ATen's own kernels instead of oneDNN's (torch's default).

    For a model run on one intra-op thread (a default worker here): oneDNN's RNN primitive carries a fixed
    cost per layer call, most of a step of one row and one token (a generated token, a keystroke after a
    word), and it is no faster at any other shape a server runs. With more threads oneDNN parallelises a
    multi-token or multi-row forward better, so ``ThreadPlan.choose_rnn_kernels`` keeps it there
    (``python -m benchmarks.kernels [--threads N]``; docs/performance.md). Process-wide: torch reads the
    setting at each call. A float32 network uses oneDNN for nothing else here (its linear layers run on
    MKL's GEMM), an int8 one's products run on oneDNN whatever it says, and CUDA ignores it."""
    torch.backends.mkldnn.enabled = False  # type: ignore[assignment] # a settable flag


def use_intra_op_threads(count: int) -> None:
    """Give the calling thread ``count`` intra-op threads for torch's CPU kernels."""
    torch.get_num_threads()  # torch's once-per-thread default runs now, so it cannot undo this later
    torch.set_num_threads(count)


@dataclass(frozen=True)
class ThreadPlan:
    """Intra-op threads per kind of thread (see the module docstring for why)."""

    worker: int | None  # the model worker's (batching); None: no worker
    others: int | None  # every other thread's; None: leave torch's setting

    @classmethod
    def for_server(cls, threads: int, batching: bool, workers: int = 1) -> ThreadPlan:
        """``threads``: the --threads flag (0 = torch's default for this machine, shared by ``workers`` processes,
        so that their OpenMP teams together do not outnumber the cores)."""
        if not threads and workers > 1:
            threads = max(1, torch.get_num_threads() // workers)
        if batching:
            return cls(worker=threads or torch.get_num_threads(), others=1)
        return cls(worker=None, others=threads or None)

    def apply_here(self) -> None:
        """For a thread that is not the model worker (the main thread, a request thread)."""
        if self.others is not None:
            use_intra_op_threads(self.others)

    def choose_rnn_kernels(self) -> None:
        """ATen's recurrent kernels when the threads that run the model have one intra-op thread each
        (``use_native_rnn_kernels``); otherwise torch's default."""
        if (self.worker if self.worker is not None else self.others) == 1:
            use_native_rnn_kernels()
