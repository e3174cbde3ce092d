"""Offline retrieval quality of embedder models: exact cosine, leave-one-out, no services.

    python tools/eval_embeddings.py [--images ../shared/data/corel1k/images]
        [--repository models] --model embedder --model embedder_gem3 ... [--json]

Every image is embedded with ONNX Runtime after the embedding service's own preprocessing
(services/embedding/preprocess.py, driven by each model's config.pbtxt) and L2-normalised, as
the service does; then each image queries all the others by exact cosine. Relevant = same
class: `id // 100` when every file is named `<number>.<ext>` (Corel-1k), else the first-level
folder under --images. Reports mAP (over the whole ranking), mAP@100 (average precision over the
top 100, divided by min(relevant, 100)), P@1, P@5, P@10 and embedding throughput.

This is the quick offline check; the official figures come from `loupe eval retrieval` through
the gateway.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from services.common.images import DEFAULT_MAX_PIXELS
from services.common.inference import REPOSITORY_IN_CHECKOUT, ModelSpec, load_model_spec
from services.embedding.preprocess import StretchPreprocessing, prepare_batch

DEFAULT_IMAGES = REPOSITORY_IN_CHECKOUT.parents[1] / "shared" / "data" / "corel1k" / "images"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class Scores:
    model: str
    dimension: int
    images: int
    map: float
    map_at_100: float
    p_at_1: float
    p_at_5: float
    p_at_10: float
    images_per_second: float


def labelled_images(directory: Path) -> tuple[list[Path], np.ndarray]:
    """The images under `directory` and their class labels (see the module docstring)."""
    paths = sorted(
        p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not paths:
        raise SystemExit(f"{directory}: no images")
    if all(p.parent == directory and p.stem.isdigit() for p in paths):
        paths.sort(key=lambda p: int(p.stem))
        return paths, np.array([int(p.stem) // 100 for p in paths])
    if any(p.parent == directory for p in paths):
        raise SystemExit(
            f"{directory}: files directly inside must all be named <number>.<ext> (class = "
            "number // 100); otherwise put each class in its own folder"
        )
    folders = [p.relative_to(directory).parts[0] for p in paths]
    names = sorted(set(folders))
    return paths, np.array([names.index(f) for f in folders])


def preprocess_all(paths: Sequence[Path], preprocess: StretchPreprocessing) -> np.ndarray:
    """[N, 3, H, W], each image prepared exactly as the embedding service prepares it."""
    return np.stack(
        [
            prepare_batch(
                p.read_bytes(),
                whole_image=True,
                regions=[],
                preprocess=preprocess,
                max_pixels=DEFAULT_MAX_PIXELS,
            )[1][0]
            for p in paths
        ]
    )


def embed(
    spec: ModelSpec, tensors: np.ndarray, batch: int, threads: int
) -> tuple[np.ndarray, float]:
    """L2-normalised embeddings and images per second (inference only)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(spec.path), options, providers=["CPUExecutionProvider"])
    input_name, output_name = spec.inputs[0].name, spec.outputs[0].name
    batch = min(batch, max(1, spec.max_batch_size))
    started = time.perf_counter()
    outputs = [
        session.run([output_name], {input_name: tensors[i : i + batch]})[0]
        for i in range(0, len(tensors), batch)
    ]
    elapsed = time.perf_counter() - started
    vectors = np.concatenate(outputs).astype(np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors, len(tensors) / elapsed


def retrieval_scores(vectors: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Leave-one-out exact-cosine metrics, every image a query against all the others."""
    count = len(vectors)
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    # Stable sort on the negated similarity: ties keep index order, so runs repeat.
    order = np.argsort(-similarity, axis=1, kind="stable")[:, : count - 1]
    relevant = labels[order] == labels[:, None]  # [N, N-1], query itself excluded
    totals = relevant.sum(axis=1)
    hits = np.cumsum(relevant, axis=1)
    ranks = np.arange(1, count)
    precision = hits / ranks
    ap = (precision * relevant).sum(axis=1) / np.maximum(totals, 1)
    top = min(100, count - 1)
    ap100 = (precision[:, :top] * relevant[:, :top]).sum(axis=1) / np.maximum(
        np.minimum(totals, top), 1
    )
    has_relevant = totals > 0
    return {
        "map": float(ap[has_relevant].mean()),
        "map_at_100": float(ap100[has_relevant].mean()),
        **{
            f"p_at_{k}": float((hits[:, k - 1] / k)[has_relevant].mean())
            for k in (1, 5, 10)
            if k < count
        },
    }


PREPROCESSING_PARAMETERS = ("loupe.color_order", "loupe.resize", "loupe.scale", "loupe.mean")


def preprocessing_key(spec: ModelSpec) -> tuple[object, ...]:
    """Models with equal keys get the same input tensors (pooling or quantization differ)."""
    keys = (*PREPROCESSING_PARAMETERS, "loupe.std")
    return (spec.inputs[0].dims, tuple(spec.parameters.get(k) for k in keys))


def evaluate(
    images: Path, repository: Path, models: Sequence[str], batch: int, threads: int
) -> list[Scores]:
    paths, labels = labelled_images(images)
    specs = [load_model_spec(repository, name) for name in models]
    prepared: dict[tuple[object, ...], np.ndarray] = {}
    results = []
    for spec in specs:
        key = preprocessing_key(spec)
        if key not in prepared:
            prepared.clear()  # one preprocessed set in memory at a time
            started = time.perf_counter()
            prepared[key] = preprocess_all(paths, StretchPreprocessing.from_spec(spec))
            print(
                f"preprocessed {len(paths)} images for {spec.name} in "
                f"{time.perf_counter() - started:.1f}s",
                file=sys.stderr,
                flush=True,
            )
        vectors, speed = embed(spec, prepared[key], batch, threads)
        metrics = retrieval_scores(vectors, labels)
        results.append(
            Scores(
                model=f"{spec.name}/{spec.version}",
                dimension=int(vectors.shape[1]),
                images=len(paths),
                map=metrics["map"],
                map_at_100=metrics["map_at_100"],
                p_at_1=metrics.get("p_at_1", float("nan")),
                p_at_5=metrics.get("p_at_5", float("nan")),
                p_at_10=metrics.get("p_at_10", float("nan")),
                images_per_second=speed,
            )
        )
        print(f"{spec.name}: mAP {metrics['map']:.4f}", file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="labelled images")
    parser.add_argument("--repository", type=Path, default=REPOSITORY_IN_CHECKOUT)
    parser.add_argument(
        "--model", action="append", help="model name in the repository (repeat; default embedder)"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads")
    parser.add_argument("--json", action="store_true", help="one JSON object per model")
    args = parser.parse_args(argv)

    results = evaluate(
        args.images, args.repository, args.model or ["embedder"], args.batch, args.threads
    )
    if args.json:
        for result in results:
            fields = asdict(result)
            # A metric the set is too small for (P@10 with 10 images) is null, not NaN.
            print(json.dumps({k: None if v != v else v for k, v in fields.items()}))
        return 0
    print(f"images: {args.images} ({results[0].images})")
    header = f"{'model':<24} {'dim':>5} {'mAP':>7} {'mAP@100':>8} {'P@1':>6} {'P@5':>6} {'P@10':>6}"
    print(header + f" {'img/s':>7}")
    for r in results:
        print(
            f"{r.model:<24} {r.dimension:>5} {r.map:>7.4f} {r.map_at_100:>8.4f} {r.p_at_1:>6.3f} "
            f"{r.p_at_5:>6.3f} {r.p_at_10:>6.3f} {r.images_per_second:>7.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
