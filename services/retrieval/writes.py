"""Writing items in batches: many Upserts, one call each to Milvus.

Concurrent Upsert calls queue here; one worker takes every queued item of a catalogue (up to
LOUPE_RETRIEVAL_WRITE_BATCH_ITEMS) and writes them together: one query for what exists
(the items' own rows and items with the same bytes), one neighbour search for all of them
(which serves both near-duplicate detection and database-side augmentation), one upsert and
at most one delete. Calls that arrive while a batch is being written form the next batch, so
under load batches grow by themselves and nobody waits for a timer.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Histogram

from loupe.v1.retrieval_pb2 import ModelBinding
from services.retrieval import augmentation
from services.retrieval.settings import RetrievalSettings
from services.retrieval.store import SAME_HASH_LIMIT, MilvusStore, Row

log = logging.getLogger(__name__)

# Index-time augmentation looks at this many times the neighbours it keeps, then keeps the
# nearest by full-precision cosine: the codes only shortlist.
DBA_SHORTLIST_FACTOR = 4
# Nearest stored items examined for near duplicates.
NEAR_DUPLICATE_CANDIDATES = 5

BATCH_ITEMS = Histogram(
    "loupe_retrieval_write_batch_items",
    "Items written to Milvus together (concurrent Upserts coalesced into one batch).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
)
BATCH_SECONDS = Histogram(
    "loupe_retrieval_write_batch_seconds",
    "Time to write one batch: what exists, neighbours, vectors, upsert.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


@dataclass
class PendingItem:
    item_id: str
    content_hash: str
    # One row per object (scalar fields, object 0 first) and their vectors as embedded,
    # [objects, dim], unit length.
    rows: list[Row]
    vectors: np.ndarray
    near_duplicate_threshold: float = 0.0
    skip_duplicates: bool = False
    # The embedder the vectors come from (routes the item to its collection, records.py),
    # and the write's own view of its models.
    model: str = ""
    binding: ModelBinding | None = None
    # Write only if the live collection holds the item with this content hash.
    if_live_content_hash: str = ""


@dataclass
class Duplicate:
    item_id: str
    exact: bool
    similarity: float


@dataclass
class Outcome:
    written: bool
    replaced: bool
    same_content: bool
    duplicates: list[Duplicate] = field(default_factory=list)
    # Not written under if_live_content_hash: "changed" or "deleted".
    skipped: str = ""
    # This item alone failed (its model is not bound to the catalogue): its caller gets it.
    error: Exception | None = None

    @classmethod
    def failed(cls, error: Exception) -> Outcome:
        return cls(written=False, replaced=False, same_content=False, error=error)


def write_batch(
    store: MilvusStore, settings: RetrievalSettings, catalog: str, items: list[PendingItem]
) -> list[Outcome]:
    """Write a batch of items (distinct ids) to the catalogue; blocking."""
    ids = [item.item_id for item in items]
    own, same_hash = store.existing(catalog, ids, [item.content_hash for item in items])
    own_pks: dict[str, list[str]] = {}
    stored_hash: dict[str, str] = {}
    for row in own:
        own_pks.setdefault(row["item_id"], []).append(row["pk"])
        if row["object_index"] == 0:
            stored_hash[row["item_id"]] = row["content_hash"]
    by_hash: dict[str, list[str]] = {}
    for row in same_hash:
        by_hash.setdefault(row["content_hash"], []).append(row["item_id"])

    embedded = np.stack([item.vectors[0] for item in items])
    neighbours = _neighbours(store, settings, catalog, items, embedded)

    outcomes: list[Outcome] = []
    rows: list[Row] = []
    stored: list[np.ndarray] = []
    raw: list[np.ndarray | None] = []
    stale: list[str] = []
    new_pks: set[str] = set()
    k, alpha = settings.dba_neighbours, settings.dba_alpha
    for position, item in enumerate(items):
        exact = sorted(i for i in by_hash.get(item.content_hash, []) if i != item.item_id)
        duplicates = [Duplicate(i, True, 1.0) for i in exact[:SAME_HASH_LIMIT]]
        others, similarities, matrix = neighbours[position]
        if item.near_duplicate_threshold > 0:
            seen = set(exact)
            near = [
                (other, float(similarity))
                for other, similarity in zip(others, similarities, strict=True)
                if similarity >= item.near_duplicate_threshold
            ]
            for other, similarity in sorted(near, key=lambda pair: -pair[1]):
                if other not in seen and len(seen) < len(exact) + NEAR_DUPLICATE_CANDIDATES:
                    seen.add(other)
                    duplicates.append(Duplicate(other, False, similarity))
        outcome = Outcome(
            written=not (item.skip_duplicates and duplicates),
            replaced=item.item_id in own_pks,
            same_content=stored_hash.get(item.item_id) == item.content_hash,
            duplicates=duplicates,
        )
        outcomes.append(outcome)
        if not outcome.written:
            continue
        vectors = item.vectors.copy()
        if k > 0 and len(others):
            nearest = np.argsort(-similarities, kind="stable")[:k]
            vectors[0] = augmentation.augment(
                item.vectors[0], matrix[nearest], similarities[nearest], alpha
            )
        for index, row in enumerate(item.rows):
            rows.append(row)
            stored.append(vectors[index])
            # The vector as embedded, kept where augmentation changed it: duplicate detection
            # and the DBA batch job start from it.
            raw.append(item.vectors[0] if index == 0 and k > 0 and len(others) else None)
        keep = {row["pk"] for row in item.rows}
        before = own_pks.get(item.item_id, [])
        stale.extend(pk for pk in before if pk not in keep)
        new_pks.update(keep.difference(before))
    if rows:
        store.write(catalog, rows, np.stack(stored), raw, stale, new_pks=new_pks)
    return outcomes


# Item ids of stored whole images, their cosines with an item, their vectors as embedded.
Neighbours = tuple[list[str], np.ndarray, np.ndarray]


def _neighbours(
    store: MilvusStore,
    settings: RetrievalSettings,
    catalog: str,
    items: list[PendingItem],
    embedded: np.ndarray,
) -> list[Neighbours]:
    """Per item: stored whole images near it, nearest first by the vectors as embedded;
    from one search for the whole batch."""
    empty: Neighbours = ([], np.empty(0), np.empty((0, embedded.shape[1]), np.float32))
    shortlist = max(
        DBA_SHORTLIST_FACTOR * settings.dba_neighbours,
        NEAR_DUPLICATE_CANDIDATES
        if any(item.near_duplicate_threshold > 0 for item in items)
        else 0,
    )
    if shortlist == 0:
        return [empty] * len(items)
    found = store.neighbours(catalog, embedded, shortlist, [item.item_id for item in items])
    if found is None:
        return [empty] * len(items)
    union = list(dict.fromkeys(hit.pk for hits in found for hit in hits))
    known, matrix = store.full_vectors(catalog, union, raw=True)
    position = {pk: i for i, pk in enumerate(known)}
    result: list[Neighbours] = []
    for query, hits in zip(embedded, found, strict=True):
        kept = [hit for hit in hits if hit.pk in position]
        rows = matrix[[position[hit.pk] for hit in kept]]
        similarities = augmentation.normalise(rows) @ query if kept else np.empty(0)
        order = np.argsort(-similarities, kind="stable")
        result.append(([kept[i].item_id for i in order], similarities[order], rows[order]))
    return result


@dataclass
class _Queued:
    catalog: str
    item: PendingItem
    future: asyncio.Future[Outcome]


Run = Callable[[str, list[PendingItem]], Awaitable[list[Outcome]]]


class WriteQueue:
    """Coalesces concurrent writes into batches per catalogue. Up to `max_batches` batches
    are written at once (one searches Milvus while another writes), never two holding the
    same item, so that writes to an item land in the order they were acknowledged."""

    def __init__(self, run: Run, max_items: int, max_batches: int = 2) -> None:
        self._run = run
        self._max_items = max_items
        self._max_batches = max_batches
        self._queue: deque[_Queued] = deque()
        # (catalogue, item id) of the items in batches being written.
        self._in_flight: set[tuple[str, str]] = set()
        self._running: set[asyncio.Task[None]] = set()
        self._dispatch_scheduled = False

    async def submit(self, catalog: str, item: PendingItem) -> Outcome:
        loop = asyncio.get_running_loop()
        queued = _Queued(catalog, item, loop.create_future())
        self._queue.append(queued)
        if not self._dispatch_scheduled:
            # On the loop's next turn: the other items of an UpsertItems call (and any call
            # made meanwhile) are queued by then and join the same batch.
            self._dispatch_scheduled = True
            loop.call_soon(self._dispatch)
        return await queued.future

    def _dispatch(self) -> None:
        self._dispatch_scheduled = False
        while self._queue and len(self._running) < self._max_batches:
            batch = self._take()
            if not batch:
                return  # what is queued waits for an earlier write of the same item
            task = asyncio.get_running_loop().create_task(self._write(batch))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._dispatch()

    async def _write(self, batch: list[_Queued]) -> None:
        keys = {(q.catalog, q.item.item_id) for q in batch}
        self._in_flight |= keys
        BATCH_ITEMS.observe(len(batch))
        try:
            with BATCH_SECONDS.time():
                outcomes = await self._run(batch[0].catalog, [q.item for q in batch])
        except Exception as error:  # every caller of the batch gets the error
            for queued in batch:
                if not queued.future.done():
                    queued.future.set_exception(error)
            return
        finally:
            self._in_flight -= keys
        for queued, outcome in zip(batch, outcomes, strict=True):
            if queued.future.done():
                continue
            if outcome.error is not None:
                queued.future.set_exception(outcome.error)
            else:
                queued.future.set_result(outcome)

    def _take(self) -> list[_Queued]:
        """The oldest catalogue with something writable: its queued items, oldest first, up
        to the maximum, each item id once and none being written now (a later write of an id
        waits for the earlier one)."""
        batch: list[_Queued] = []
        catalog = ""
        blocked: set[tuple[str, str]] = set(self._in_flight)
        rest: deque[_Queued] = deque()
        while self._queue:
            queued = self._queue.popleft()
            key = (queued.catalog, queued.item.item_id)
            taken = (
                key not in blocked
                and len(batch) < self._max_items
                and (not batch or queued.catalog == catalog)
            )
            if taken:
                batch.append(queued)
                catalog = queued.catalog
            else:
                rest.append(queued)
            # Whatever comes later for this item must not overtake this one.
            blocked.add(key)
        self._queue = rest
        return batch

    async def close(self) -> None:
        await asyncio.gather(*self._running, return_exceptions=True)
