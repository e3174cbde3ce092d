"""The in-process micro-batcher: real concurrency, against the real embedder and against a
controllable fake. No assertion depends on timing: a time limit only guards against hangs."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from prometheus_client import REGISTRY

from services.common.batching import MicroBatcher
from services.common.inference import (
    REPOSITORY_IN_CHECKOUT,
    InferenceSettings,
    InferenceUnavailable,
    ModelSpec,
    OnnxRuntimeBackend,
    TensorSpec,
    create_backend,
    load_model_spec,
)
from services.common.inference_metrics import ObservedBackend

T = TypeVar("T")
GUARD_SECONDS = 60
models_built = pytest.mark.skipif(
    not (REPOSITORY_IN_CHECKOUT / "embedder" / "1" / "model.onnx").is_file(),
    reason="models not built: run `python models/build_models.py`",
)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    async def guarded() -> T:
        return await asyncio.wait_for(coroutine, GUARD_SECONDS)

    return asyncio.run(guarded())


class FakeBackend:
    """Doubles its input; each run waits for `gate` when one is set; records batch sizes."""

    def __init__(self, max_batch_size: int = 64) -> None:
        self.spec = ModelSpec(
            name="fake",
            version="1",
            path=Path("/nonexistent"),
            max_batch_size=max_batch_size,
            inputs=(TensorSpec("x", (2,)),),
            outputs=(TensorSpec("y", (2,)),),
        )
        self.batches: list[int] = []
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()
        self.error: Exception | None = None
        self.closed = False

    async def infer(
        self, inputs: dict[str, np.ndarray], *, timeout: float | None = None
    ) -> dict[str, np.ndarray]:
        self.batches.append(len(inputs["x"]))
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return {"y": inputs["x"] * 2}

    async def check_ready(self) -> None:
        return None

    async def close(self) -> None:
        self.closed = True


def rows(start: int, count: int) -> dict[str, np.ndarray]:
    values = np.arange(start, start + count, dtype=np.float32)
    return {"x": np.stack([values, -values], axis=1)}


async def until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0)


# --- against the real embedder ------------------------------------------------------------------


@models_built
def test_concurrent_calls_give_the_vectors_of_batch_one_calls_and_are_batched() -> None:
    spec = load_model_spec(REPOSITORY_IN_CHECKOUT, "embedder")
    rng = np.random.default_rng(7)
    sizes = [1 + i % 3 for i in range(32)]
    images = [rng.standard_normal((n, 3, 224, 224)).astype(np.float32) for n in sizes]

    def batch_size_count() -> float:
        value = REGISTRY.get_sample_value("loupe_inference_batch_size_count", {"model": "embedder"})
        return value or 0.0

    async def scenario() -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
        plain = OnnxRuntimeBackend(spec)
        alone = [(await plain.infer({"images": x}))["embeddings"] for x in images]

        class Spy(ObservedBackend):
            sizes: list[int] = []

            async def infer(
                self, inputs: dict[str, np.ndarray], *, timeout: float | None = None
            ) -> dict[str, np.ndarray]:
                self.sizes.append(len(inputs["images"]))
                return await super().infer(inputs, timeout=timeout)

        spy = Spy(plain)
        batcher = MicroBatcher(spy, max_batch_size=16, max_delay_seconds=0.002)
        together = await asyncio.gather(*(batcher.infer({"images": x}) for x in images))
        await batcher.close()
        return alone, [t["embeddings"] for t in together], spy.sizes

    count_before = batch_size_count()
    alone, together, batch_sizes = run(scenario())

    for x, a, b in zip(images, alone, together, strict=True):
        assert b.shape == (len(x), 1280)
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    assert sum(batch_sizes) == sum(sizes)
    assert max(batch_sizes) > 1 and all(s <= 16 for s in batch_sizes)
    assert len(batch_sizes) < len(images)
    # The batch-size histogram saw the coalesced batches, not the 32 calls.
    assert batch_size_count() - count_before == len(batch_sizes)
    queued = REGISTRY.get_sample_value("loupe_inference_queue_seconds_count", {"model": "embedder"})
    assert queued is not None and queued >= len(images)


@models_built
def test_only_onnxruntime_with_a_batch_axis_is_batched_in_process() -> None:
    embedder = load_model_spec(REPOSITORY_IN_CHECKOUT, "embedder")
    detector = load_model_spec(REPOSITORY_IN_CHECKOUT, "detector")
    settings = InferenceSettings(batch_max_size=8)
    assert settings.batches(embedder) and not settings.batches(detector)
    assert not InferenceSettings(batch_max_size=1).batches(embedder)
    assert not InferenceSettings(backend="triton").batches(embedder)

    async def scenario() -> tuple[object, object]:
        batched = create_backend(settings, embedder)
        unbatched = create_backend(settings, detector)
        await batched.close()
        await unbatched.close()
        return batched, unbatched

    batched, unbatched = run(scenario())
    assert isinstance(batched, MicroBatcher)
    assert isinstance(unbatched, ObservedBackend)


# --- against a fake, to control when a batch runs -------------------------------------------------


def test_a_full_batch_goes_without_waiting_for_the_delay() -> None:
    async def scenario() -> list[int]:
        fake = FakeBackend()
        # An hour of delay: only reaching the maximum size can start this batch.
        batcher = MicroBatcher(fake, max_batch_size=4, max_delay_seconds=3600)
        results = await asyncio.gather(*(batcher.infer(rows(i, 1)) for i in range(4)))
        for i, result in enumerate(results):
            np.testing.assert_array_equal(result["y"], rows(i, 1)["x"] * 2)
        await batcher.close()
        return fake.batches

    assert run(scenario()) == [4]


def test_a_lone_call_goes_when_the_delay_has_passed() -> None:
    async def scenario() -> list[int]:
        fake = FakeBackend()
        batcher = MicroBatcher(fake, max_batch_size=64, max_delay_seconds=0.001)
        result = await batcher.infer(rows(5, 3))
        np.testing.assert_array_equal(result["y"], rows(5, 3)["x"] * 2)
        await batcher.close()
        return fake.batches

    assert run(scenario()) == [3]


def test_calls_arriving_while_a_batch_runs_form_the_next_batch_and_big_calls_run_alone() -> None:
    async def scenario() -> list[int]:
        fake = FakeBackend()
        fake.gate = asyncio.Event()
        batcher = MicroBatcher(fake, max_batch_size=4, max_delay_seconds=0)
        first = asyncio.create_task(batcher.infer(rows(0, 1)))
        await fake.started.wait()
        waiting = [asyncio.create_task(batcher.infer(rows(10 * i, 2))) for i in range(1, 4)]
        big = asyncio.create_task(batcher.infer(rows(100, 9)))
        await asyncio.sleep(0)
        fake.gate.set()
        await asyncio.gather(first, *waiting, big)
        for i, task in enumerate(waiting, start=1):
            np.testing.assert_array_equal(task.result()["y"], rows(10 * i, 2)["x"] * 2)
        np.testing.assert_array_equal(big.result()["y"], rows(100, 9)["x"] * 2)
        await batcher.close()
        return fake.batches

    # 1 alone; then 2+2 fill a batch of 4; the third 2 goes next; 9 > 4 runs by itself.
    assert run(scenario()) == [1, 4, 2, 9]


def test_a_cancelled_caller_does_not_break_the_others() -> None:
    async def scenario() -> list[int]:
        fake = FakeBackend()
        fake.gate = asyncio.Event()
        batcher = MicroBatcher(fake, max_batch_size=8, max_delay_seconds=0)
        running = [asyncio.create_task(batcher.infer(rows(i, 1))) for i in range(2)]
        await fake.started.wait()
        queued = [asyncio.create_task(batcher.infer(rows(10 + i, 1))) for i in range(3)]
        await asyncio.sleep(0)
        # One caller whose batch is running, one still queued: both give up.
        running[0].cancel()
        queued[1].cancel()
        fake.gate.set()
        results = await asyncio.gather(*running, *queued, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError)
        assert isinstance(results[3], asyncio.CancelledError)
        np.testing.assert_array_equal(results[1]["y"], rows(1, 1)["x"] * 2)  # type: ignore[index]
        np.testing.assert_array_equal(results[2]["y"], rows(10, 1)["x"] * 2)  # type: ignore[index]
        np.testing.assert_array_equal(results[4]["y"], rows(12, 1)["x"] * 2)  # type: ignore[index]
        # And the batcher carries on.
        after = await batcher.infer(rows(50, 1))
        np.testing.assert_array_equal(after["y"], rows(50, 1)["x"] * 2)
        await batcher.close()
        return fake.batches

    # The cancelled queued call never reached the model.
    assert run(scenario()) == [2, 2, 1]


def test_an_error_in_inference_reaches_every_caller_of_that_batch() -> None:
    async def scenario() -> None:
        fake = FakeBackend()
        fake.gate = asyncio.Event()
        batcher = MicroBatcher(fake, max_batch_size=8, max_delay_seconds=0)
        blocker = asyncio.create_task(batcher.infer(rows(0, 1)))
        await fake.started.wait()
        doomed = [asyncio.create_task(batcher.infer(rows(i, 1))) for i in range(1, 6)]
        await asyncio.sleep(0)
        fake.error = RuntimeError("model exploded")
        fake.gate.set()
        results = await asyncio.gather(blocker, *doomed, return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "exploded" in str(r) for r in results)
        assert fake.batches == [1, 5]
        fake.error = None
        fine = await batcher.infer(rows(7, 2))
        np.testing.assert_array_equal(fine["y"], rows(7, 2)["x"] * 2)
        await batcher.close()

    run(scenario())


def test_closing_fails_queued_callers_as_unavailable() -> None:
    async def scenario() -> None:
        fake = FakeBackend()
        fake.gate = asyncio.Event()
        batcher = MicroBatcher(fake, max_batch_size=1, max_delay_seconds=0)
        calls = [asyncio.create_task(batcher.infer(rows(i, 1))) for i in range(3)]
        await fake.started.wait()
        await batcher.close()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, InferenceUnavailable) for r in results)
        assert fake.closed
        with pytest.raises(InferenceUnavailable):
            await batcher.infer(rows(9, 1))

    run(scenario())
