"""Database-side augmentation (DBA): a stored vector becomes the similarity-weighted mean of
itself and its nearest neighbours, so that an item is also found through what it resembles.

Weights are similarity ** alpha (alpha-DBA, Radenovic et al. 2018): with alpha > 0, a weak
neighbour contributes little, which keeps items whose class has few members from being pulled
towards unrelated ones.
"""

from __future__ import annotations

import numpy as np

# Rows of the similarity matrix computed at once by the batch job: bounds its extra memory to
# BLOCK x items floats.
BLOCK = 1024


def normalise(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)


def augment(
    vector: np.ndarray, neighbours: np.ndarray, similarities: np.ndarray, alpha: float
) -> np.ndarray:
    """One vector (unit length) with its neighbours' (rows, unit length) added in."""
    weights = np.maximum(np.asarray(similarities, np.float64), 0.0) ** alpha
    total = np.asarray(vector, np.float64) + weights @ np.asarray(neighbours, np.float64)
    return normalise(total).astype(np.float32)


def augment_all(vectors: np.ndarray, neighbours: int, alpha: float) -> np.ndarray:
    """Every row of `vectors` [n, d] (unit length) augmented with its `neighbours` nearest
    other rows, by exact inner product."""
    matrix = np.asarray(vectors, np.float32)
    count = len(matrix)
    k = min(neighbours, count - 1)
    if k <= 0:
        return matrix.copy()
    result = np.empty_like(matrix)
    for start in range(0, count, BLOCK):
        block = matrix[start : start + BLOCK]
        similarities = block @ matrix.T
        rows = np.arange(len(block))
        similarities[rows, start + rows] = -np.inf  # not its own neighbour
        nearest = np.argpartition(-similarities, k - 1, axis=1)[:, :k]
        weights = np.maximum(np.take_along_axis(similarities, nearest, axis=1), 0.0) ** alpha
        total = block.astype(np.float64) + np.einsum(
            "nk,nkd->nd", weights.astype(np.float64), matrix[nearest].astype(np.float64)
        )
        result[start : start + BLOCK] = normalise(total)
    return result
