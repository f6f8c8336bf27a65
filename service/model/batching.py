"""Continuous batching: one worker owns the model; every caller's pending step joins one forward.

An RNN's state is a fixed-size tensor per sequence, so the steps of different
requests (a Suggest's context, a beam step, a Generate token, a Type keystroke)
stack along the batch dimension:

    caller threads                     worker thread
    advance(tokens [b1, T], state) --\\
    advance(tokens [b2, 1], state) ---+-> queue -> take what is waiting (up to max_batch_size rows)
    advance(tokens [b3, 1], state) --/            one forward of rows of any lengths
                                                  (packed by length: service/model/steps.py)
                                                  split results -> each caller's future

``max_wait`` = 0 runs at once with whatever is queued: a lone request is never
delayed. A larger value waits up to that long for more rows once the first
request of a batch arrives.

With ``inline``, a step that finds the model idle and nothing queued runs on
its caller's thread (there is nothing to stack it with), which saves the
hand-off to the worker and back. Steps that arrive meanwhile queue for the
worker as before, and once a forward has stacked several callers' steps (the
server is loaded, and the hand-off gathers the next arrivals into one forward)
steps go to the worker until a forward holds one step again. The server sets
it when the worker has one intra-op thread, as the callers have, so that a
forward runs alike on either thread.

A step whose caller has cancelled or passed its deadline while it waited is not
computed (``drop_ended``): under overload the model spends its time on answers
that someone will receive.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import Tensor

from service.model import current_call
from service.model.current_call import CallEnded
from service.model.hardware import use_intra_op_threads
from service.model.steps import StepModel, advance_ragged

log = logging.getLogger("nextword")
WORKER_CHECK_SECONDS = 1.0  # how often a waiting caller checks that the worker still runs


@dataclass
class _Step:
    tokens: Tensor  # [b, T]
    state: Tensor  # [L, b, S]
    wanted: Callable[[], CallEnded | None] | None = None  # the caller's check (service/model/current_call.py)
    future: Future = field(default_factory=Future)


class BatchingModel:
    """A StepModel that batches the calls of many threads into few calls of ``model``."""

    def __init__(
        self,
        model: StepModel,
        max_batch_size: int = 64,
        max_wait: float = 0.0,
        threads: int | None = None,
        drop_ended: bool = True,
        inline: bool = False,
    ) -> None:
        self.model = model
        self.drop_ended = drop_ended  # skip steps whose caller cancelled or passed its deadline
        self.threads = threads  # the worker's intra-op threads (None: leave torch's setting)
        self.vocab_size = model.vocab_size
        self.device = getattr(model, "device", torch.device("cpu"))
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait
        self._queue: queue.SimpleQueue[_Step | None] = queue.SimpleQueue()
        self.batches = 0  # model calls made, for tests and metrics
        self.rows = 0  # sequences stepped, for tests and metrics
        self.dropped = 0  # steps skipped because their caller had gone
        self.on_batch: Callable[[int], None] | None = None  # called with the rows of each forward (metrics)
        self.on_drop: Callable[[], None] | None = None  # called for each step skipped (metrics)
        self._closed = False
        self._busy = threading.Lock()  # held while a forward runs, on the worker or on an idle caller's thread
        self.inline = inline  # a step that finds the model idle and nothing queued runs on its caller's thread
        self._last_steps = 0  # callers' steps in the last forward: more than one means load, so no inline
        self._worker = threading.Thread(target=self._run, name="model-worker", daemon=True)
        self._worker.start()

    def init_state(self, batch_size: int) -> Tensor:
        return self.model.init_state(batch_size)

    def advance(self, tokens: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        if self._closed:
            raise RuntimeError("the model worker has stopped")
        wanted = current_call.still_wanted() if self.drop_ended else None
        if self.inline and self._last_steps <= 1 and self._queue.empty() and self._busy.acquire(blocking=False):
            try:  # nothing else to stack with: no hand-off to the worker and back
                ended = self._ended(wanted)
                if ended is not None:
                    raise ended
                result = self.model.advance(tokens, state)
                self._count(tokens.size(0), 1)
                return result
            finally:
                self._busy.release()
        step = _Step(tokens, state, wanted)
        self._queue.put(step)
        while True:  # however long the forward takes; but a caller never waits on a worker that is gone
            try:
                return step.future.result(timeout=WORKER_CHECK_SECONDS)
            except concurrent.futures.TimeoutError:
                if not self._worker.is_alive():
                    raise RuntimeError("the model worker has stopped") from None

    @property
    def running(self) -> bool:
        """The worker thread is alive (until close())."""
        return self._worker.is_alive()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float = 5.0) -> None:
        """Finish the steps already queued, stop the worker and join it; later steps are refused."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._worker.join(timeout)
        while True:  # steps queued behind the stop: fail them rather than leave their callers waiting
            try:
                step = self._queue.get_nowait()
            except queue.Empty:
                break
            if step is not None and not step.future.done():
                step.future.set_exception(RuntimeError("the model worker has stopped"))

    def _collect(self, first: _Step) -> list[_Step]:
        steps, rows = [first], first.tokens.size(0)
        deadline = time.monotonic() + self.max_wait
        while rows < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                step = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if step is None:
                self._queue.put(None)  # stop after this batch
                break
            steps.append(step)
            rows += step.tokens.size(0)
        return steps

    def _still_wanted(self, group: list[_Step]) -> list[_Step]:
        """The steps whose callers still wait; the others end at once with the reason (CallEnded)."""
        kept = []
        for step in group:
            ended = self._ended(step.wanted)
            if ended is None:
                kept.append(step)
            else:
                step.future.set_exception(ended)
        return kept

    def _run(self) -> None:
        if self.threads:
            use_intra_op_threads(self.threads)
        while True:
            first = self._queue.get()
            if first is None:
                return
            steps = [first]
            try:
                with self._busy:
                    steps = self._collect(first)
                    self._forward(self._still_wanted(steps))
            except Exception as error:
                log.exception("the model worker failed a batch; it goes on")
                for step in steps:
                    if step is not None and not step.future.done():
                        step.future.set_exception(error)

    def _count(self, rows: int, steps: int) -> None:
        self._last_steps = steps
        self.batches += 1
        self.rows += rows
        if self.on_batch is not None:
            self.on_batch(rows)

    def _ended(self, wanted: Callable[[], CallEnded | None] | None) -> CallEnded | None:
        """Why a step's caller is gone (the step is then counted as dropped), or None while it waits."""
        ended = wanted() if wanted is not None else None
        if ended is not None:
            self.dropped += 1
            if self.on_drop is not None:
                self.on_drop()
        return ended

    def _forward(self, steps: list[_Step]) -> None:
        if not steps:
            return
        try:
            # steps of any lengths in one forward where the model can (service/model/steps.py)
            results = advance_ragged(self.model, [(s.tokens, s.state) for s in steps])
            self._count(sum(s.tokens.size(0) for s in steps), len(steps))
            for step, result in zip(steps, results):
                step.future.set_result(result)
        except Exception as error:  # noqa: BLE001 - hand the failure to every caller in the batch
            if isinstance(error, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()  # what the failed batch held goes back before the next one
            for step in steps:
                if not step.future.done():
                    step.future.set_exception(error)
