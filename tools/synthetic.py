"""Clustered synthetic embeddings that look like a real catalogue's, for scale benchmarks.

Real MobileNetV2 vectors (Corel-1k's, embedded by the model in models/) give the shape: their
mean, and the spread along their main directions. Synthetic items are drawn around cluster
centres in that shape, clipped at zero (the features are post-ReLU6 averages) and normalised:
they share the real vectors' positive-orthant offset (hard for sign codes) and are spread like
them, so that mixed into a catalogue they are plausible distractors for the real queries, not
points far away. Nothing here is fitted to labels; only the vectors' first and second moments
are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Directions of the real vectors the synthetic ones vary along.
COMPONENTS = 256
# A cluster's members spread this much relative to the catalogue's spread.
MEMBER_SPREAD = 0.8
# Items per cluster, on average.
CLUSTER_SIZE = 100
# Noise in every direction, so no two items are identical.
ISOTROPIC_NOISE = 0.01


@dataclass(frozen=True)
class Shape:
    mean: np.ndarray
    # [COMPONENTS, dim] directions, each scaled by the real vectors' spread along it.
    axes: np.ndarray

    @classmethod
    def of(cls, real: np.ndarray) -> Shape:
        mean = real.mean(axis=0)
        _, spread, directions = np.linalg.svd(real - mean, full_matrices=False)
        k = min(COMPONENTS, len(spread))
        return cls(mean, (spread[:k, None] / np.sqrt(len(real))) * directions[:k])


class Generator:
    """Draws `count` items around count / CLUSTER_SIZE cluster centres, reproducibly."""

    def __init__(self, real: np.ndarray, count: int, seed: int = 0) -> None:
        self.shape = Shape.of(real)
        self.rng = np.random.default_rng(seed)
        clusters = max(10, count // CLUSTER_SIZE)
        k = len(self.shape.axes)
        self.centres = np.maximum(
            self.shape.mean + self.rng.standard_normal((clusters, k)) @ self.shape.axes, 0
        ).astype(np.float32)

    def draw(self, count: int) -> np.ndarray:
        """[count, dim] unit vectors."""
        k, dim = self.shape.axes.shape
        which = self.rng.integers(0, len(self.centres), count)
        spread = (self.rng.standard_normal((count, k)) * MEMBER_SPREAD) @ self.shape.axes
        noise = ISOTROPIC_NOISE * self.rng.standard_normal((count, dim))
        vectors = np.maximum(self.centres[which] + spread + noise, 0)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def corel_vectors(images: Path, cache: Path) -> tuple[list[Path], np.ndarray]:
    """Corel-1k's images and their vectors, embedded as the embedding service does (its
    preprocessing and the repository's embedder on ONNX Runtime), cached in `cache`."""
    from eval_embeddings import labelled_images, preprocess_all

    paths, _ = labelled_images(images)
    if cache.is_file():
        vectors = np.load(cache)
        if len(vectors) == len(paths):
            return paths, vectors
    import onnxruntime as ort

    from services.common.inference import REPOSITORY_IN_CHECKOUT, load_model_spec
    from services.embedding.preprocess import StretchPreprocessing

    spec = load_model_spec(REPOSITORY_IN_CHECKOUT, "embedder")
    batch = preprocess_all(paths, StretchPreprocessing.from_spec(spec))
    session = ort.InferenceSession(str(spec.path), providers=["CPUExecutionProvider"])
    name = spec.inputs[0].name
    outputs = [session.run(None, {name: batch[i : i + 32]})[0] for i in range(0, len(batch), 32)]
    vectors = np.concatenate(outputs)
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, vectors)
    return paths, vectors
