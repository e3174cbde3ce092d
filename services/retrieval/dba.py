"""The DBA batch job: every whole image's stored vector recomputed from the vectors as
embedded and its nearest neighbours, a page at a time.

Index-time augmentation only sees the items already there when an item arrives; the batch job
makes the result independent of arrival order. Neighbours come from the catalogue's own index
(a shortlist by the compact code, re-scored with the full vectors as embedded), so memory and
each page's work stay bounded whatever the catalogue's size. Each page is read afresh and
written back while writes to the catalogue wait (the service's gate), so a write made
meanwhile is never overwritten by an older copy.
"""

from __future__ import annotations

import numpy as np

from services.retrieval import augmentation
from services.retrieval.store import MilvusStore

# Whole images per page.
PAGE = 256
# The job runs once per bulk load, not per item, so it affords a wider shortlist than index
# time: neighbours examined per neighbour kept.
SHORTLIST_FACTOR = 10


def augment_page(store: MilvusStore, catalog: str, pks: list[str], k: int, alpha: float) -> int:
    """Recompute the stored vectors of these whole-image rows; the number rewritten."""
    current = {row["pk"]: row for row in store.rows_by_pks(catalog, pks, code=False)}
    found, embedded = store.full_vectors(catalog, [pk for pk in pks if pk in current], raw=True)
    if not found:
        return 0
    rows = [current[pk] for pk in found]
    embedded = augmentation.normalise(embedded).astype(np.float32)
    if k == 0:
        store.write(catalog, rows, embedded, [None] * len(rows))
        return len(rows)
    # One more than the shortlist: each row finds itself too.
    shortlists = store.neighbours(catalog, embedded, SHORTLIST_FACTOR * k + 1, []) or []
    union = list(dict.fromkeys(hit.pk for shortlist in shortlists for hit in shortlist))
    known, matrix = store.full_vectors(catalog, union, raw=True)
    position = {pk: i for i, pk in enumerate(known)}
    matrix = augmentation.normalise(matrix).astype(np.float32)
    augmented = embedded.copy()
    for row, (pk, shortlist) in enumerate(zip(found, shortlists, strict=True)):
        others = [position[hit.pk] for hit in shortlist if hit.pk != pk and hit.pk in position]
        if not others:
            continue
        similarities = matrix[others] @ embedded[row]
        nearest = np.argsort(-similarities, kind="stable")[:k]
        augmented[row] = augmentation.augment(
            embedded[row], matrix[others][nearest], similarities[nearest], alpha
        )
    store.write(catalog, rows, augmented, list(embedded))
    return len(rows)
