"""In-process micro-batching: concurrent calls share one model run.

With ONNX Runtime in process, every call used to run the model on its own images. Under
concurrency that means many small runs competing for the same cores, each paying the
per-run overhead (thread pool wake-up, allocation, Python). The batcher queues calls and runs
them together, up to a maximum number of images or a maximum delay after the oldest call
arrived, whichever comes first. One batch runs at a time: the cores are ONNX Runtime's
intra-op threads' already, and calls that arrive while a batch runs form the next one, so
under load nobody waits for the delay.

Triton has its own dynamic batcher; this one is for the in-process backend (see
`InferenceSettings.batches`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from services.common.inference import InferenceBackend, InferenceUnavailable
from services.common.inference_metrics import INFERENCE_QUEUE_SECONDS

log = logging.getLogger(__name__)


@dataclass
class _Call:
    inputs: dict[str, np.ndarray]
    size: int
    future: asyncio.Future[dict[str, np.ndarray]]
    enqueued: float


class MicroBatcher:
    """An `InferenceBackend` that coalesces concurrent `infer` calls into batches for
    `inner`. Each caller gets its own rows of the outputs, in the order it sent them."""

    def __init__(
        self, inner: InferenceBackend, max_batch_size: int, max_delay_seconds: float
    ) -> None:
        if max_batch_size < 1 or max_delay_seconds < 0:
            raise ValueError("max_batch_size must be >= 1 and max_delay_seconds >= 0")
        self.inner = inner
        self.spec = inner.spec
        self.max_batch_size = max_batch_size
        self.max_delay_seconds = max_delay_seconds
        self._queue: deque[_Call] = deque()
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._queue_seconds = INFERENCE_QUEUE_SECONDS.labels(inner.spec.name)

    async def infer(
        self, inputs: dict[str, np.ndarray], *, timeout: float | None = None
    ) -> dict[str, np.ndarray]:
        # `timeout` is not passed on: a batch serves several callers, and the in-process
        # backend cannot stop a run anyway. A caller whose deadline passes is cancelled by
        # gRPC; if its call is still queued, it is dropped from the batch.
        if self._closed:
            raise InferenceUnavailable(f"model {self.spec.name} is shutting down")
        loop = asyncio.get_running_loop()
        call = _Call(inputs, len(next(iter(inputs.values()))), loop.create_future(), 0.0)
        call.enqueued = time.perf_counter()
        self._queue.append(call)
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._run(), name=f"batcher-{self.spec.name}")
        return await call.future

    async def check_ready(self) -> None:
        await self.inner.check_ready()

    async def close(self) -> None:
        self._closed = True
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        while self._queue:
            call = self._queue.popleft()
            if not call.future.done():
                call.future.set_exception(
                    InferenceUnavailable(f"model {self.spec.name} is shutting down")
                )
        await self.inner.close()

    # --- the worker ---------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            # The oldest call sets the deadline: a call that arrived while the previous
            # batch ran is past it already and goes at once with whatever else is waiting.
            deadline = self._queue[0].enqueued + self.max_delay_seconds
            while self._waiting_images() < self.max_batch_size:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:  # not the builtin before Python 3.11
                    break
            batch = self._take()
            if batch:
                await self._execute(batch)

    def _waiting_images(self) -> int:
        return sum(c.size for c in self._queue if not c.future.done())

    def _take(self) -> list[_Call]:
        """The oldest calls that fit in one batch; a call larger than a batch runs alone.
        Calls whose caller has gone (cancelled) are dropped."""
        batch: list[_Call] = []
        images = 0
        while self._queue:
            call = self._queue[0]
            if call.future.done():
                self._queue.popleft()
                continue
            if batch and images + call.size > self.max_batch_size:
                break
            batch.append(self._queue.popleft())
            images += call.size
        return batch

    async def _execute(self, batch: list[_Call]) -> None:
        started = time.perf_counter()
        for call in batch:
            self._queue_seconds.observe(started - call.enqueued)
        try:
            if len(batch) == 1:
                inputs = batch[0].inputs
            else:
                # Copying a batch of images together takes milliseconds: not on the loop.
                inputs = await asyncio.to_thread(_concatenate, [c.inputs for c in batch])
            outputs = await self.inner.infer(inputs)
        except asyncio.CancelledError:
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(
                        InferenceUnavailable(f"model {self.spec.name} is shutting down")
                    )
            raise
        except Exception as error:
            # Every caller of the batch gets the error: each decides what it means for it.
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(error)
            return
        start = 0
        for call in batch:
            end = start + call.size
            if not call.future.done():
                call.future.set_result({name: value[start:end] for name, value in outputs.items()})
            start = end


def _concatenate(inputs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([i[name] for i in inputs]) for name in inputs[0]}
