"""Scores as pure numpy functions: score = similarity + popularity + category + label."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def cosine(query: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Cosine similarity of `query` (d,) with each row of `vectors` (n, d), in float64."""
    q = np.asarray(query, dtype=np.float64)
    m = np.asarray(vectors, dtype=np.float64).reshape(-1, q.shape[0])
    norms = np.linalg.norm(m, axis=1) * np.linalg.norm(q)
    dots = m @ q
    # A zero vector is similar to nothing rather than NaN.
    safe = np.where(norms > 0, norms, 1.0)
    return np.where(norms > 0, dots / safe, 0.0)


def popularity(values: np.ndarray, weight: float, scale: float) -> np.ndarray:
    """weight * min(1, log1p(p) / log1p(scale)); NaN (no popularity) and p <= 0 give 0."""
    p = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)
    return weight * np.minimum(1.0, np.log1p(np.maximum(p, 0.0)) / np.log1p(scale))


def same_label(
    query_label: str, labels: Sequence[str], item_labels: Sequence[Sequence[str]], weight: float
) -> np.ndarray:
    """`weight` for each candidate whose row's label or any of its item's object labels is
    the query's label, else 0; all 0 without a query label. Item-wide rather than the row's
    own: a whole-image row that wins for a crop still shows the object (measured in
    tools/objects_offline.py: the row's label alone gave about half the gain)."""
    if not query_label or weight == 0.0:
        return np.zeros(len(labels))
    return np.array(
        [
            weight if label == query_label or query_label in others else 0.0
            for label, others in zip(labels, item_labels, strict=True)
        ]
    )


def best_per_item(
    scores: np.ndarray, item_ids: Sequence[str], object_indexes: Sequence[int], top_k: int
) -> list[int]:
    """Positions of the best row of each item, best first, at most `top_k`.

    Ties go to the smaller item id, and within an item to the smaller object index, so the
    order never depends on the order candidates arrived in.
    """
    order = np.lexsort(
        (np.asarray(object_indexes), np.asarray(item_ids, dtype=str), -np.asarray(scores))
    )
    chosen: list[int] = []
    seen: set[str] = set()
    for position in order.tolist():
        if item_ids[position] not in seen:
            seen.add(item_ids[position])
            chosen.append(position)
            if len(chosen) == top_k:
                break
    return chosen


def expand_query(
    query: np.ndarray,
    vectors: np.ndarray,
    similarity: np.ndarray,
    item_ids: Sequence[str],
    object_indexes: Sequence[int],
    neighbours: int,
    alpha: float,
) -> np.ndarray:
    """alpha-QE (Radenovic et al. 2018): the query plus its `neighbours` best items' vectors,
    each weighted by similarity ** alpha, normalised. One row per item, so that an item's
    detected objects do not count as several neighbours."""
    q = np.asarray(query, dtype=np.float64)
    q = q / np.linalg.norm(q)
    best = best_per_item(similarity, item_ids, object_indexes, neighbours)
    if not best:
        return q
    rows = np.asarray(vectors, dtype=np.float64)[best]
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    weights = np.maximum(similarity[best], 0.0) ** alpha
    expanded = q + weights @ rows
    return expanded / np.linalg.norm(expanded)
