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


async def observed_infer(
    backend: InferenceBackend, inputs: dict[str, np.ndarray], batch_size: int
) -> dict[str, np.ndarray]:
    """`backend.infer`, recording its duration and batch size."""
    started = time.perf_counter()
    outputs = await backend.infer(inputs)
    model = backend.spec.name
    INFERENCE_SECONDS.labels(model).observe(time.perf_counter() - started)
    INFERENCE_BATCH_SIZE.labels(model).observe(batch_size)
    return outputs
