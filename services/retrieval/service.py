"""RetrievalService: validation and proto conversion around the Milvus store."""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import math
import time
import unicodedata
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np

from loupe.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc
from services.common.catalogs import InvalidCatalog, resolve_catalog
from services.retrieval import augmentation, codes, metadata
from services.retrieval.filters import InvalidFilter, build_filter
from services.retrieval.gate import CatalogGate
from services.retrieval.metadata import InvalidMetadata
from services.retrieval.settings import RetrievalSettings
from services.retrieval.store import (
    CODE,
    MAX_ITEM_ID_CHARS,
    MAX_OBJECTS,
    RAW,
    VECTOR,
    CatalogNotFound,
    MilvusStore,
    Row,
    StoreUnavailable,
)

# Float indexes that keep the raw vectors and score candidates with them. Anything else
# (binary codes, quantised, or AUTOINDEX, whose choice depends on the Milvus at hand) gets
# re-scored by ranking.
EXACT_SCORE_INDEXES = frozenset({"FLAT", "IVF_FLAT", "HNSW"})
# Index-time augmentation looks at this many times the neighbours it keeps, then keeps the
# nearest by full-precision cosine: the codes only shortlist.
DBA_SHORTLIST_FACTOR = 4
DEFAULT_LOOKUP_LIMIT = 10
MAX_LOOKUP_LIMIT = 100
# VARCHAR(64) fields of the schema; a Milvus server counts their length in UTF-8 bytes.
MAX_SHORT_TEXT_BYTES = 64

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")


class InvalidRequest(ValueError):
    """The caller's request is malformed; the message says what to fix."""


class CatalogTooLarge(Exception):
    """A whole-catalogue job would not fit; the message names the limit."""


CALLER_ERRORS = (InvalidRequest, InvalidFilter, InvalidMetadata, InvalidCatalog)


def _rpc(
    method: Callable[[Any, Request], Awaitable[Response]],
) -> Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]:
    """Map caller errors to INVALID_ARGUMENT and Milvus failures to UNAVAILABLE."""

    @functools.wraps(method)
    async def handler(self: Any, request: Request, context: grpc.aio.ServicerContext) -> Response:
        try:
            return await method(self, request)
        except CALLER_ERRORS as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except CatalogNotFound as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        except CatalogTooLarge as error:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        except StoreUnavailable as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        raise AssertionError("unreachable: abort raises")

    return handler


class RetrievalService(retrieval_pb2_grpc.RetrievalServiceServicer):
    name = "retrieval"
    grpc_services = [retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"].full_name]

    def __init__(self, settings: RetrievalSettings) -> None:
        self.settings = settings
        self.store = MilvusStore(settings)
        self.gate = CatalogGate()
        # Whole images written per catalogue since its DBA batch last ran, and the pending
        # automatic run of each.
        self._written: dict[str, int] = {}
        self._refreshes: dict[str, asyncio.Task[None]] = {}

    def register(self, server: grpc.aio.Server) -> None:
        retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(self, server)

    async def start(self) -> None:
        await asyncio.to_thread(self.store.open)

    async def close(self) -> None:
        for task in self._refreshes.values():
            task.cancel()
        await asyncio.gather(*self._refreshes.values(), return_exceptions=True)
        await asyncio.to_thread(self.store.close)

    @_rpc
    async def Upsert(self, request: retrieval_pb2.UpsertRequest) -> retrieval_pb2.UpsertResponse:
        catalog = resolve_catalog(request.catalog)
        rows = self._rows(request.item)
        async with self.gate.shared(catalog):
            replaced = await asyncio.to_thread(
                self._write_item, catalog, request.item.item_id, rows
            )
        self._written[catalog] = self._written.get(catalog, 0) + 1
        self._schedule_refresh(catalog)
        return retrieval_pb2.UpsertResponse(rows=len(rows), replaced=replaced)

    def _schedule_refresh(self, catalog: str) -> None:
        """(Re)start the catalogue's quiet-period timer: a bulk load triggers one batch DBA,
        after its last write."""
        s = self.settings
        if s.dba_neighbours == 0 or s.dba_refresh_seconds == 0:
            return
        pending = self._refreshes.get(catalog)
        if pending is not None and not pending.done():
            pending.cancel()
        self._refreshes[catalog] = asyncio.create_task(self._refresh_when_quiet(catalog))

    async def _refresh_when_quiet(self, catalog: str) -> None:
        await asyncio.sleep(self.settings.dba_refresh_seconds)
        try:
            async with self.gate.exclusive(catalog):
                items = await asyncio.to_thread(self.store.count, catalog, "object_index == 0")
                written = self._written.get(catalog, 0)
                if not 0 < items <= self.settings.dba_batch_max_items:
                    return
                if written < max(1.0, self.settings.dba_refresh_growth * items):
                    return
                self._written[catalog] = 0
                k, alpha = self.settings.dba_neighbours, self.settings.dba_alpha
                await asyncio.to_thread(self._augment_catalog, catalog, k, alpha)
        except (CatalogNotFound, StoreUnavailable) as error:
            # The next write schedules it again.
            log.warning("automatic DBA skipped", extra={"catalog": catalog, "reason": str(error)})

    def _write_item(self, catalog: str, item_id: str, rows: list[Row]) -> bool:
        """Augment the whole image's vector with its neighbours' (DBA), encode, write."""
        stored = np.stack([row.pop("unit_vector") for row in rows])
        embedded = stored[:1].copy()
        k = self.settings.dba_neighbours
        if k > 0:
            stored[0] = self._augmented(catalog, item_id, embedded[0], k)
        self._encode(rows, stored, embedded if k > 0 else None)
        return self.store.replace_item(catalog, item_id, rows)

    def _encode(self, rows: list[Row], stored: np.ndarray, embedded: np.ndarray | None) -> None:
        """The fields of each row's vectors: the code and full vector of what is stored, and,
        for the first len(embedded) rows, the vector as embedded (what the DBA batch job
        starts from); "" where the two are the same."""
        for row, vector, code in zip(rows, stored, self.store.codes_of(stored), strict=True):
            row[VECTOR], row[CODE], row[RAW] = codes.encode_vector(vector), code, ""
        for row, raw in zip(rows, embedded if embedded is not None else [], strict=False):
            row[RAW] = codes.encode_vector(raw)

    def _augmented(self, catalog: str, item_id: str, raw: np.ndarray, k: int) -> np.ndarray:
        try:
            expression, params = build_filter(None, [item_id], True, lite=self.settings.is_lite)
            rows = self.store.search(
                catalog, raw, DBA_SHORTLIST_FACTOR * k, expression, params, vectors=True, raw=True
            )
        except CatalogNotFound:
            return raw
        if not rows:
            return raw
        neighbours = np.stack([codes.decode_vector(r[VECTOR]) for r in rows])
        similarities = neighbours @ raw
        nearest = np.argsort(-similarities, kind="stable")[:k]
        return augmentation.augment(
            raw, neighbours[nearest], similarities[nearest], self.settings.dba_alpha
        )

    @_rpc
    async def Delete(
        self, request: retrieval_pb2.DeleteItemRequest
    ) -> retrieval_pb2.DeleteItemResponse:
        item_id = _item_id(request.item_id)
        catalog = resolve_catalog(request.catalog)
        async with self.gate.shared(catalog):
            deleted = await asyncio.to_thread(self.store.delete_item, catalog, item_id)
        return retrieval_pb2.DeleteItemResponse(rows_deleted=deleted)

    @_rpc
    async def Lookup(self, request: retrieval_pb2.LookupRequest) -> retrieval_pb2.LookupResponse:
        catalog = resolve_catalog(request.catalog)
        key = request.WhichOneof("key")
        if key == "item_id":
            read = functools.partial(
                self.store.item_rows,
                catalog,
                _item_id(request.item_id),
                vectors=request.include_vectors,
            )
        elif key == "content_hash":
            limit = request.limit or DEFAULT_LOOKUP_LIMIT
            if not request.content_hash or not 0 < limit <= MAX_LOOKUP_LIMIT:
                raise InvalidRequest(
                    f"lookup by content_hash needs a non-empty hash and a limit of 1 to "
                    f"{MAX_LOOKUP_LIMIT} (got {request.limit}; 0 means {DEFAULT_LOOKUP_LIMIT})"
                )
            read = functools.partial(
                self.store.rows_by_hash,
                catalog,
                request.content_hash,
                limit,
                vectors=request.include_vectors,
            )
        else:
            raise InvalidRequest("set item_id or content_hash")
        rows = await asyncio.to_thread(read)
        if not rows and self.gate.busy(catalog):
            # The batch job rewrites rows, and milvus-lite's upsert is a delete then an
            # insert: a row can be missing for a moment. Ask again once the job is done.
            await self.gate.wait_idle(catalog)
            rows = await asyncio.to_thread(read)
        return retrieval_pb2.LookupResponse(items=_items(rows))

    @_rpc
    async def Search(
        self, request: retrieval_pb2.RetrievalSearchRequest
    ) -> retrieval_pb2.RetrievalSearchResponse:
        catalog = resolve_catalog(request.catalog)
        query = _unit_vector(request.query.values, self.settings.dim, "query")
        if not 0 < request.limit <= self.settings.max_limit:
            raise InvalidRequest(
                f"limit={request.limit}: expected 1 to {self.settings.max_limit} "
                "(LOUPE_RETRIEVAL_MAX_LIMIT)"
            )
        expression, params = build_filter(
            request.filter if request.HasField("filter") else None,
            request.exclude_item_ids,
            request.whole_images_only,
            lite=self.settings.is_lite,
        )
        rows = await asyncio.to_thread(
            self.store.search,
            catalog,
            query,
            request.limit,
            expression,
            params,
            vectors=request.include_vectors,
            raw=request.raw_vectors,
            distinct_items=request.distinct_items,
        )
        return retrieval_pb2.RetrievalSearchResponse(candidates=[_candidate(r) for r in rows])

    @_rpc
    async def Stats(self, request: retrieval_pb2.StatsRequest) -> retrieval_pb2.StatsResponse:
        return await asyncio.to_thread(self._stats, resolve_catalog(request.catalog))

    def _stats(self, catalog: str) -> retrieval_pb2.StatsResponse:
        index_type = self.store.index_type(catalog)
        return retrieval_pb2.StatsResponse(
            catalog=catalog,
            rows=self.store.count(catalog),
            items=self.store.count(catalog, "object_index == 0"),
            collection=self.store.collection_name(catalog),
            dimension=self.settings.dim,
            index_type=index_type,
            exact_scores=self.settings.candidate_code == "float"
            and index_type in EXACT_SCORE_INDEXES,
            candidate_code=self.settings.candidate_code,
            code_bytes=self.store.code_bytes,
            full_vector_bytes=4 * self.settings.dim,
            dba_neighbours=self.settings.dba_neighbours,
        )

    @_rpc
    async def ListCatalogs(
        self, request: retrieval_pb2.RetrievalListCatalogsRequest
    ) -> retrieval_pb2.RetrievalListCatalogsResponse:
        def stats() -> list[retrieval_pb2.StatsResponse]:
            found = []
            for catalog in self.store.catalogs():
                try:
                    found.append(self._stats(catalog))
                except CatalogNotFound:  # dropped meanwhile
                    continue
            return found

        return retrieval_pb2.RetrievalListCatalogsResponse(catalogs=await asyncio.to_thread(stats))

    @_rpc
    async def DropCatalog(
        self, request: retrieval_pb2.RetrievalDropCatalogRequest
    ) -> retrieval_pb2.RetrievalDropCatalogResponse:
        catalog = resolve_catalog(request.catalog)
        async with self.gate.exclusive(catalog):
            dropped = await asyncio.to_thread(self.store.drop, catalog)
            self._written.pop(catalog, None)
        return retrieval_pb2.RetrievalDropCatalogResponse(dropped=dropped)

    @_rpc
    async def Augment(self, request: retrieval_pb2.AugmentRequest) -> retrieval_pb2.AugmentResponse:
        catalog = resolve_catalog(request.catalog)
        k = request.neighbours or self.settings.dba_neighbours
        alpha = request.alpha or self.settings.dba_alpha
        if not 0 <= k <= 100 or not 0 <= alpha <= 100:
            raise InvalidRequest(f"neighbours={k}, alpha={alpha}: expected 0-100 each")
        started = time.perf_counter()
        async with self.gate.exclusive(catalog):
            items = await asyncio.to_thread(self.store.count, catalog, "object_index == 0")
            if items > self.settings.dba_batch_max_items:
                raise CatalogTooLarge(
                    f"catalog {catalog!r} has {items} items; the batch DBA holds every vector "
                    f"in memory and runs on at most {self.settings.dba_batch_max_items} "
                    "(LOUPE_DBA_BATCH_MAX_ITEMS)"
                )
            self._written[catalog] = 0
            items = await asyncio.to_thread(self._augment_catalog, catalog, k, alpha)
        return retrieval_pb2.AugmentResponse(items=items, seconds=time.perf_counter() - started)

    def _augment_catalog(self, catalog: str, k: int, alpha: float) -> int:
        """Recompute every whole image's stored vector from the vectors as embedded: the
        batch form of DBA, independent of the order items arrived in."""
        rows = self.store.whole_image_rows(catalog)
        if not rows:
            return 0
        raws = np.stack([codes.decode_vector(r[RAW] or r[VECTOR]) for r in rows])
        augmented = augmentation.augment_all(raws, k, alpha) if k > 0 else raws
        self._encode(rows, augmented, raws if k > 0 else None)
        self.store.write_rows(catalog, rows)
        log.info("catalogue augmented", extra={"catalog": catalog, "items": len(rows), "k": k})
        return len(rows)

    def _rows(self, item: retrieval_pb2.StoredItem) -> list[Row]:
        """Validate an item and turn it into one row per object."""
        item_id = _item_id(item.item_id)
        for name in ("content_hash", "model_version"):
            _short_text(getattr(item, name), name)
        if item.image_width < 0 or item.image_height < 0:
            raise InvalidRequest("image_width and image_height must not be negative")
        indexes = sorted(o.object_index for o in item.objects)
        if indexes != list(range(len(indexes))) or not indexes:
            raise InvalidRequest(
                f"object indexes {indexes}: expected 0 (the whole image) to n-1, each once"
            )
        if len(indexes) > MAX_OBJECTS:
            raise InvalidRequest(f"{len(indexes)} objects; at most {MAX_OBJECTS} per item")
        # Item fields go on every row, so that filters and lookups work on object rows too.
        shared = {
            "item_id": item_id,
            "metadata": metadata.to_json(item.metadata),
            "content_hash": item.content_hash,
            "model_version": item.model_version,
            "image_width": item.image_width,
            "image_height": item.image_height,
        }
        rows = []
        for obj in sorted(item.objects, key=lambda o: o.object_index):
            where = f"object {obj.object_index}"
            box: dict[str, float] = {}
            if obj.object_index > 0:
                if not obj.HasField("box"):
                    raise InvalidRequest(f"{where} has no box: detected objects need one")
                box = {k: getattr(obj.box, k) for k in ("x0", "y0", "x1", "y1")}
                if not all(math.isfinite(v) for v in box.values()):
                    raise InvalidRequest(f"{where}: box coordinates must be finite")
            rows.append(
                {
                    **shared,
                    "pk": f"{item_id}#{obj.object_index}",
                    "object_index": obj.object_index,
                    "label": _short_text(obj.label, f"{where} label"),
                    "detection_score": obj.detection_score,
                    "box": box,
                    # Encoded (and, for the whole image, augmented) when written.
                    "unit_vector": _unit_vector(obj.vector.values, self.settings.dim, where),
                }
            )
        return rows


def build() -> RetrievalService:
    return RetrievalService(RetrievalSettings.from_env())


# -- validation -------------------------------------------------------------------------------


def _item_id(item_id: str) -> str:
    if not item_id:
        raise InvalidRequest("item_id is empty")
    if len(item_id) > MAX_ITEM_ID_CHARS:
        raise InvalidRequest(f"item_id has {len(item_id)} characters; at most {MAX_ITEM_ID_CHARS}")
    # Ids are identifiers; control characters are never meant, and milvus-lite could not
    # match a carriage return in a filter (filters.py).
    if any(unicodedata.category(c) == "Cc" for c in item_id):
        raise InvalidRequest(f"item_id {item_id!r} contains a control character")
    return item_id


def _short_text(text: str, name: str) -> str:
    size = len(text.encode())
    if size > MAX_SHORT_TEXT_BYTES:
        raise InvalidRequest(f"{name} is {size} bytes in UTF-8; at most {MAX_SHORT_TEXT_BYTES}")
    return text


def _unit_vector(values: Sequence[float], dim: int, where: str) -> np.ndarray:
    """The vector scaled to unit length, so that inner product is cosine similarity."""
    if len(values) != dim:
        raise InvalidRequest(f"{where}: vector has {len(values)} values; expected {dim}")
    vector = np.asarray(values, dtype=np.float64)
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(vector).all() or norm == 0.0:
        raise InvalidRequest(f"{where}: vector must be finite and not all zeros")
    return (vector / norm).astype(np.float32)


# -- rows to protos ---------------------------------------------------------------------------


def _box(row: Row) -> common_pb2.Box | None:
    box = row.get("box") or {}
    if row["object_index"] == 0 or not box:
        return None
    return common_pb2.Box(x0=box["x0"], y0=box["y0"], x1=box["x1"], y1=box["y1"])


def _items(rows: list[Row]) -> list[retrieval_pb2.StoredItem]:
    """Group rows (sorted by item, then object) into items."""
    items: dict[str, retrieval_pb2.StoredItem] = {}
    for row in rows:
        item = items.get(row["item_id"])
        if item is None:
            item = items[row["item_id"]] = retrieval_pb2.StoredItem(
                item_id=row["item_id"],
                content_hash=row["content_hash"],
                model_version=row["model_version"],
                image_width=row["image_width"],
                image_height=row["image_height"],
            )
            metadata.to_proto(row["metadata"], item.metadata)
        item.objects.append(
            retrieval_pb2.StoredObject(
                object_index=row["object_index"],
                box=_box(row),
                label=row["label"],
                detection_score=row["detection_score"],
                vector=_vector(row),
            )
        )
    return list(items.values())


def _vector(row: Row) -> common_pb2.Vector | None:
    """The stored float32 bytes as a Vector message, parsed from its wire form: packed floats
    are those very bytes, so no Python float is made (hundreds of candidates x 1280 values
    per search)."""
    if VECTOR not in row:
        return None
    data = base64.b64decode(row[VECTOR])
    return common_pb2.Vector.FromString(_PACKED_VALUES_TAG + _varint(len(data)) + data)


# Field 1 of Vector (`values`), wire type 2 (length-delimited: packed).
_PACKED_VALUES_TAG = b"\x0a"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _candidate(row: Row) -> retrieval_pb2.Candidate:
    candidate = retrieval_pb2.Candidate(
        item_id=row["item_id"],
        object_index=row["object_index"],
        box=_box(row),
        label=row["label"],
        ann_score=row["score"],
        vector=_vector(row),
        content_hash=row["content_hash"],
    )
    metadata.to_proto(row["metadata"], candidate.metadata)
    return candidate
