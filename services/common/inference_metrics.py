"""Inference metrics shared by the model services, labelled by model name.

Defined once here because a Prometheus registry refuses a second metric of the same name:
the detection and embedding services differ only in the `model` label.
"""

from __future__ import annotations

import time

import numpy as np
from prometheus_client import Histogram

from services.common.inference import InferenceBackend

INFERENCE_SECONDS = Histogram(
    "loupe_inference_duration_seconds",
    "Time of one inference backend call, by model.",
    ["model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
INFERENCE_BATCH_SIZE = Histogram(
    "loupe_inference_batch_size",
    "Images in one inference backend call, by model.",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
INFERENCE_QUEUE_SECONDS = Histogram(
    "loupe_inference_queue_seconds",
    "Time a request waited in the in-process micro-batcher before its batch ran, by model.",
    ["model"],
    buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)


class ObservedBackend:
    """A backend whose every call records its duration and batch size. It wraps the backend
    that runs the model, under any micro-batcher, so the batch size is what really ran."""

    def __init__(self, inner: InferenceBackend) -> None:
        self.inner = inner
        self.spec = inner.spec
        self._seconds = INFERENCE_SECONDS.labels(inner.spec.name)
        self._batch_size = INFERENCE_BATCH_SIZE.labels(inner.spec.name)

    async def infer(
        self, inputs: dict[str, np.ndarray], *, timeout: float | None = None
    ) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        outputs = await self.inner.infer(inputs, timeout=timeout)
        self._seconds.observe(time.perf_counter() - started)
        # max_batch_size 0: the model's leading axis is part of its shape, one image per call.
        size = len(next(iter(inputs.values()))) if self.spec.max_batch_size > 0 else 1
        self._batch_size.observe(size)
        return outputs

    async def check_ready(self) -> None:
        await self.inner.check_ready()

    async def close(self) -> None:
        await self.inner.close()
