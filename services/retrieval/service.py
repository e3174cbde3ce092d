"""RetrievalService: validation and proto conversion around the Milvus store.

Writes (Upsert) are coalesced into batches (writes.py); searches ask the compact index for
`oversampling` x K' candidates and return the K' best by their full vectors, as packed
float16 bytes beside the candidate list. A `reader` replica serves reads only; the one
writer (role `all`) also runs the whole-catalogue jobs, so they run once per catalogue
however many replicas serve searches.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np

from loupe.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc
from services.common import vectors
from services.common.catalogs import InvalidCatalog, resolve_catalog
from services.common.items import InvalidItem, check_item_id, check_source_uri
from services.retrieval import dba, metadata, watch
from services.retrieval.filters import InvalidFilter, build_filter
from services.retrieval.gate import CatalogGate
from services.retrieval.invalidation import CacheInvalidator
from services.retrieval.metadata import InvalidMetadata
from services.retrieval.settings import RetrievalSettings
from services.retrieval.store import (
    MAX_OBJECTS,
    MILVUS_ERRORS,
    CatalogNotFound,
    MilvusStore,
    Row,
    StoreUnavailable,
    WrongDimension,
    milvus_failure,
    row_key,
)
from services.retrieval.writes import Outcome, PendingItem, WriteQueue, write_batch

DEFAULT_LOOKUP_LIMIT = 10
MAX_LOOKUP_LIMIT = 100
# Items per Lookup by item_ids and per UpsertItems call.
MAX_ITEMS_PER_CALL = 1000
# VARCHAR(64) fields of the schema; a Milvus server counts their length in UTF-8 bytes.
MAX_SHORT_TEXT_BYTES = 64
# How long writes must pause before a server's growing segments are sealed (flushed) when
# the DBA refresh, which also waits for a pause, is turned off.
DEFAULT_QUIET_SECONDS = 5.0
# While the batch job runs, cached results are invalidated at least this often: rows it
# rewrote make them stale.
INVALIDATE_EVERY_SECONDS = 30.0

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")


class InvalidRequest(ValueError):
    """The caller's request is malformed; the message says what to fix."""


class ReadOnlyReplica(Exception):
    """A write sent to a replica that only reads."""


CALLER_ERRORS = (
    InvalidRequest,
    InvalidFilter,
    InvalidMetadata,
    InvalidCatalog,
    InvalidItem,
    WrongDimension,
    vectors.InvalidVectors,
)


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
        except ReadOnlyReplica as error:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        except StoreUnavailable as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        except MILVUS_ERRORS as error:
            # The store maps what its calls raise; this catches one it left out, never an
            # INTERNAL for Milvus's fault (retrieval calls no other gRPC server).
            failure = milvus_failure(self.settings, method.__name__, error)
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(failure))
        raise AssertionError("unreachable: abort raises")

    return handler


class RetrievalService(retrieval_pb2_grpc.RetrievalServiceServicer):
    name = "retrieval"
    grpc_services = [retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"].full_name]

    def __init__(self, settings: RetrievalSettings) -> None:
        self.settings = settings
        self.store = MilvusStore(settings)
        self.gate = CatalogGate()
        self.writes = WriteQueue(self._write_batch, settings.write_batch_items)
        self.invalidator = CacheInvalidator(
            settings.redis_url, settings.redis_password, settings.redis_timeout_seconds
        )
        # Whole images written per catalogue since its DBA batch last ran, and the pending
        # automatic run of each.
        self._written: dict[str, int] = {}
        self._refreshes: dict[str, asyncio.Task[None]] = {}

    def register(self, server: grpc.aio.Server) -> None:
        retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(self, server)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return []

    async def start(self) -> None:
        await asyncio.to_thread(self.store.open)

    async def watch_readiness(self, report: Callable[[bool], Awaitable[None]]) -> None:
        """Health follows Milvus, and a milvus-lite that dies or hangs is started again."""
        await watch.watch_milvus(self.store, self.settings, report)

    async def close(self) -> None:
        await self.writes.close()
        for task in self._refreshes.values():
            task.cancel()
        await asyncio.gather(*self._refreshes.values(), return_exceptions=True)
        await self.invalidator.close()
        await asyncio.to_thread(self.store.close)

    def _require_writer(self, action: str) -> None:
        if not self.settings.writes:
            raise ReadOnlyReplica(
                f"this retrieval replica only reads (LOUPE_RETRIEVAL_ROLE=reader): send {action} "
                "to the writer (the gateway's LOUPE_RETRIEVAL_WRITER_ADDR)"
            )

    # -- writes ------------------------------------------------------------------------------

    @_rpc
    async def Upsert(self, request: retrieval_pb2.UpsertRequest) -> retrieval_pb2.UpsertResponse:
        self._require_writer("Upsert")
        return await self._upsert(request)

    @_rpc
    async def UpsertItems(
        self, request: retrieval_pb2.UpsertItemsRequest
    ) -> retrieval_pb2.UpsertItemsResponse:
        """Each item as its own Upsert, all queued at once so they share batches."""
        self._require_writer("UpsertItems")
        if len(request.items) > MAX_ITEMS_PER_CALL:
            raise InvalidRequest(
                f"{len(request.items)} items; at most {MAX_ITEMS_PER_CALL} per UpsertItems"
            )

        async def one(item: retrieval_pb2.UpsertRequest) -> retrieval_pb2.UpsertItemResult:
            try:
                return retrieval_pb2.UpsertItemResult(response=await self._upsert(item))
            except CALLER_ERRORS as error:
                code, message = grpc.StatusCode.INVALID_ARGUMENT, str(error)
            except StoreUnavailable as error:
                code, message = grpc.StatusCode.UNAVAILABLE, str(error)
            except MILVUS_ERRORS as error:
                failure = milvus_failure(self.settings, "upsert", error)
                code, message = grpc.StatusCode.UNAVAILABLE, str(failure)
            return retrieval_pb2.UpsertItemResult(code=code.value[0], error=message)

        results = await asyncio.gather(*(one(item) for item in request.items))
        return retrieval_pb2.UpsertItemsResponse(results=results)

    async def _upsert(self, request: retrieval_pb2.UpsertRequest) -> retrieval_pb2.UpsertResponse:
        catalog = resolve_catalog(request.catalog)
        if not 0 <= request.near_duplicate_threshold <= 1:
            raise InvalidRequest(
                f"near_duplicate_threshold={request.near_duplicate_threshold}: expected 0 to 1"
            )
        pending = self._pending(request.item, await self._dimension(catalog))
        pending.near_duplicate_threshold = request.near_duplicate_threshold
        pending.skip_duplicates = request.skip_duplicates
        outcome = await self.writes.submit(catalog, pending)
        return retrieval_pb2.UpsertResponse(
            rows=len(pending.rows) if outcome.written else 0,
            replaced=outcome.replaced,
            written=outcome.written,
            same_content=outcome.same_content,
            duplicates=[
                retrieval_pb2.DuplicateItem(
                    item_id=d.item_id, exact=d.exact, similarity=d.similarity
                )
                for d in outcome.duplicates
            ],
        )

    @contextlib.asynccontextmanager
    async def _changing(self, catalog: str) -> AsyncIterator[None]:
        """Around a change to the catalogue's rows: when it fails, they may have changed all
        the same (the sidecar goes first, and a Milvus that answered too late still carries
        the call out), so cached results are invalidated before the error goes on."""
        try:
            yield
        except BaseException:
            await self.invalidator.changed(catalog)
            raise

    async def _write_batch(self, catalog: str, items: list[PendingItem]) -> list[Outcome]:
        async with self._changing(catalog), self.gate.shared(catalog):
            outcomes = await asyncio.to_thread(
                write_batch, self.store, self.settings, catalog, items
            )
        written = sum(o.written for o in outcomes)
        if written:
            await self.invalidator.changed(catalog)
            self._written[catalog] = self._written.get(catalog, 0) + written
            self._schedule_refresh(catalog)
        return outcomes

    async def _dimension(self, catalog: str) -> int:
        """The catalogue's vector dimension; the configured one for a catalogue not made yet."""
        known = self.store.opened(catalog)
        if known is not None:
            return known.layout.dim
        try:
            opened = await asyncio.to_thread(self.store.collection, catalog, create=False)
        except CatalogNotFound:
            return self.settings.dim
        return opened.layout.dim

    @_rpc
    async def UpdateItem(
        self, request: retrieval_pb2.UpdateItemRequest
    ) -> retrieval_pb2.UpdateItemResponse:
        self._require_writer("UpdateItem")
        catalog = resolve_catalog(request.catalog)
        item_id = check_item_id(request.item_id)
        changes = {
            "metadata": metadata.to_json(request.metadata),
            "source_uri": check_source_uri(request.source_uri),
        }
        async with self._changing(catalog), self.gate.shared(catalog):
            found = await asyncio.to_thread(self._update_item, catalog, item_id, changes)
        if found:
            await self.invalidator.changed(catalog)
        return retrieval_pb2.UpdateItemResponse(found=found)

    def _update_item(self, catalog: str, item_id: str, changes: dict[str, Any]) -> bool:
        """Rewrite the item's rows with new metadata (every row) and source (object 0)."""
        try:
            own, _ = self.store.existing(catalog, [item_id], [])
        except CatalogNotFound:
            return False
        if not own:
            return False
        rows = self.store.rows_by_pks(catalog, [r["pk"] for r in own], code=False)
        stored_pks, stored = self.store.full_vectors(catalog, [r["pk"] for r in rows], raw=False)
        raw_pks, raw = self.store.full_vectors(catalog, stored_pks, raw=True)
        by_pk = {r["pk"]: r for r in rows}
        rows = [by_pk[pk] for pk in stored_pks]
        for row in rows:
            row["metadata"] = changes["metadata"]
            if row["object_index"] == 0:
                row["source_uri"] = changes["source_uri"]
        raw_by_pk = dict(zip(raw_pks, raw, strict=True))
        originals = [
            raw_by_pk[pk] if not np.array_equal(raw_by_pk[pk], vector) else None
            for pk, vector in zip(stored_pks, stored, strict=True)
        ]
        self.store.write(catalog, rows, stored, originals)
        return True

    @_rpc
    async def Delete(
        self, request: retrieval_pb2.DeleteItemRequest
    ) -> retrieval_pb2.DeleteItemResponse:
        self._require_writer("Delete")
        item_id = check_item_id(request.item_id)
        catalog = resolve_catalog(request.catalog)
        async with self._changing(catalog), self.gate.shared(catalog):
            deleted = await asyncio.to_thread(self._delete_item, catalog, item_id)
        if deleted:
            await self.invalidator.changed(catalog)
        return retrieval_pb2.DeleteItemResponse(rows_deleted=deleted)

    def _delete_item(self, catalog: str, item_id: str) -> int:
        own, _ = self.store.existing(catalog, [item_id], [])
        self.store.delete_pks(catalog, [r["pk"] for r in own])
        return len(own)

    # -- reads -------------------------------------------------------------------------------

    @_rpc
    async def Lookup(self, request: retrieval_pb2.LookupRequest) -> retrieval_pb2.LookupResponse:
        catalog = resolve_catalog(request.catalog)
        key = request.WhichOneof("key")
        if key == "item_id":
            read = functools.partial(
                self.store.item_rows,
                catalog,
                check_item_id(request.item_id),
                vectors=request.include_vectors,
            )
        elif key == "item_ids":
            ids = [check_item_id(i) for i in request.item_ids.ids]
            if len(ids) > MAX_ITEMS_PER_CALL:
                raise InvalidRequest(f"{len(ids)} item ids; at most {MAX_ITEMS_PER_CALL}")
            read = functools.partial(
                self.store.items_rows, catalog, ids, vectors=request.include_vectors
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
            raise InvalidRequest("set item_id, item_ids or content_hash")
        rows = await asyncio.to_thread(read)
        if not rows and self.gate.busy(catalog):
            # The batch job rewrites rows, and milvus-lite's upsert is a delete then an
            # insert: a row can be missing for a moment. Ask again once the page is done.
            await self.gate.wait_idle(catalog)
            rows = await asyncio.to_thread(read)
        return retrieval_pb2.LookupResponse(items=_items(rows))

    @_rpc
    async def Search(
        self, request: retrieval_pb2.RetrievalSearchRequest
    ) -> retrieval_pb2.RetrievalSearchResponse:
        catalog = resolve_catalog(request.catalog)
        if not 0 < request.limit <= self.settings.max_limit:
            raise InvalidRequest(
                f"limit={request.limit}: expected 1 to {self.settings.max_limit} "
                "(LOUPE_RETRIEVAL_MAX_LIMIT)"
            )
        query = _unit_vector(vectors.as_array(request.query), "query")
        expression, _ = build_filter(
            request.filter if request.HasField("filter") else None,
            request.exclude_item_ids,
            request.whole_images_only,
            lite=self.settings.is_lite,
        )
        rows, matrix = await asyncio.to_thread(
            self.store.search,
            catalog,
            query,
            request.limit,
            expression,
            distinct_items=request.distinct_items,
        )
        response = retrieval_pb2.RetrievalSearchResponse(candidates=[_candidate(r) for r in rows])
        if request.include_vectors and rows:
            response.vectors.CopyFrom(vectors.pack(matrix, vectors.FLOAT16))
        return response

    @_rpc
    async def Stats(self, request: retrieval_pb2.StatsRequest) -> retrieval_pb2.StatsResponse:
        return await asyncio.to_thread(self._stats, resolve_catalog(request.catalog))

    def _stats(self, catalog: str) -> retrieval_pb2.StatsResponse:
        opened = self.store.collection(catalog, create=False)
        layout = opened.layout
        return retrieval_pb2.StatsResponse(
            catalog=catalog,
            rows=self.store.count(catalog),
            items=self.store.count(catalog, "object_index == 0"),
            collection=opened.name,
            dimension=layout.dim,
            index_type=opened.index_type,
            # Candidates come back re-scored by their full vectors (or from an exact index).
            exact_scores=True,
            candidate_code="binary" if layout.binary else "float",
            code_bytes=layout.code_bytes,
            full_vector_bytes=4 * layout.dim,
            dba_neighbours=self.settings.dba_neighbours,
            code=layout.code,
            vector_store=layout.vectors,
            stored_vector_bytes=layout.stored_vector_bytes,
            oversampling=self.store.oversampling(catalog),
            indexed_rows=self.store.index_progress(catalog)[0],
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

    # -- whole catalogues --------------------------------------------------------------------

    @_rpc
    async def DropCatalog(
        self, request: retrieval_pb2.RetrievalDropCatalogRequest
    ) -> retrieval_pb2.RetrievalDropCatalogResponse:
        self._require_writer("DropCatalog")
        catalog = resolve_catalog(request.catalog)
        async with self._changing(catalog), self.gate.exclusive(catalog):
            dropped = await asyncio.to_thread(self.store.drop, catalog)
            self._written.pop(catalog, None)
        await self.invalidator.changed(catalog)
        return retrieval_pb2.RetrievalDropCatalogResponse(dropped=dropped)

    @_rpc
    async def Augment(self, request: retrieval_pb2.AugmentRequest) -> retrieval_pb2.AugmentResponse:
        self._require_writer("Augment")
        catalog = resolve_catalog(request.catalog)
        k = request.neighbours or self.settings.dba_neighbours
        alpha = request.alpha or self.settings.dba_alpha
        if not 0 <= k <= 100 or not 0 <= alpha <= 100:
            raise InvalidRequest(f"neighbours={k}, alpha={alpha}: expected 0-100 each")
        started = time.perf_counter()
        await asyncio.to_thread(self.store.collection, catalog, create=False)
        items = await self._augment_catalog(catalog, k, alpha)
        return retrieval_pb2.AugmentResponse(items=items, seconds=time.perf_counter() - started)

    async def _augment_catalog(self, catalog: str, k: int, alpha: float) -> int:
        """The DBA batch job (dba.py), a page at a time; writes wait only for the page in
        progress."""
        self._written[catalog] = 0
        pages = self.store.whole_image_pks(catalog, dba.PAGE)
        done, invalidated = 0, time.monotonic()
        started = time.monotonic()
        async with self._changing(catalog):
            while (pks := await asyncio.to_thread(next, pages, None)) is not None:
                async with self.gate.exclusive(catalog):
                    done += await asyncio.to_thread(
                        dba.augment_page, self.store, catalog, pks, k, alpha
                    )
                if time.monotonic() - invalidated > INVALIDATE_EVERY_SECONDS:
                    await self.invalidator.changed(catalog)
                    invalidated = time.monotonic()
            await asyncio.to_thread(self.store.flush, catalog)
        await self.invalidator.changed(catalog)
        log.info(
            "catalogue augmented",
            extra={
                "catalog": catalog,
                "items": done,
                "k": k,
                "seconds": round(time.monotonic() - started, 1),
            },
        )
        return done

    def _schedule_refresh(self, catalog: str) -> None:
        """(Re)start the catalogue's quiet-period timer: a bulk load triggers one flush (a
        server) and one DBA batch job, after its last write."""
        pending = self._refreshes.get(catalog)
        if pending is not None and not pending.done():
            pending.cancel()
        self._refreshes[catalog] = asyncio.create_task(self._refresh_when_quiet(catalog))

    async def _refresh_when_quiet(self, catalog: str) -> None:
        s = self.settings
        await asyncio.sleep(s.dba_refresh_seconds or DEFAULT_QUIET_SECONDS)
        try:
            # Seal what the load wrote, so that a server builds its index on it.
            await asyncio.to_thread(self.store.flush, catalog)
            if s.dba_neighbours == 0 or s.dba_refresh_seconds == 0:
                return
            items = await asyncio.to_thread(self.store.count, catalog, "object_index == 0")
            written = self._written.get(catalog, 0)
            if items == 0 or written < max(1.0, s.dba_refresh_growth * items):
                return
            await self._augment_catalog(catalog, s.dba_neighbours, s.dba_alpha)
        except (CatalogNotFound, StoreUnavailable, *MILVUS_ERRORS) as error:
            # The next write schedules it again.
            log.warning("automatic DBA skipped", extra={"catalog": catalog, "reason": str(error)})

    # -- validation --------------------------------------------------------------------------

    def _pending(self, item: retrieval_pb2.StoredItem, dim: int) -> PendingItem:
        """Validate an item and turn it into one row per object and their vectors."""
        item_id = check_item_id(item.item_id)
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
        source_uri = check_source_uri(item.source_uri)
        rows: list[Row] = []
        embedded = []
        for obj in sorted(item.objects, key=lambda o: o.object_index):
            where = f"object {obj.object_index}"
            box: dict[str, float] = {}
            if obj.object_index > 0:
                if not obj.HasField("box"):
                    raise InvalidRequest(f"{where} has no box: detected objects need one")
                box = {k: getattr(obj.box, k) for k in ("x0", "y0", "x1", "y1")}
                if not all(math.isfinite(v) for v in box.values()):
                    raise InvalidRequest(f"{where}: box coordinates must be finite")
            values = vectors.as_array(obj.vector)
            if len(values) != dim:
                raise InvalidRequest(f"{where}: vector has {len(values)} values; expected {dim}")
            embedded.append(_unit_vector(values, where))
            rows.append(
                {
                    **shared,
                    "pk": row_key(item_id, obj.object_index),
                    "object_index": obj.object_index,
                    "label": _short_text(obj.label, f"{where} label"),
                    "detection_score": obj.detection_score,
                    "box": box,
                    "source_uri": source_uri if obj.object_index == 0 else "",
                }
            )
        return PendingItem(item_id, item.content_hash, rows, np.stack(embedded))


def build() -> RetrievalService:
    return RetrievalService(RetrievalSettings.from_env())


# -- validation -------------------------------------------------------------------------------


def _short_text(text: str, name: str) -> str:
    size = len(text.encode())
    if size > MAX_SHORT_TEXT_BYTES:
        raise InvalidRequest(f"{name} is {size} bytes in UTF-8; at most {MAX_SHORT_TEXT_BYTES}")
    return text


def _unit_vector(values: np.ndarray, where: str) -> np.ndarray:
    """The vector scaled to unit length, so that inner product is cosine similarity."""
    vector = np.asarray(values, dtype=np.float64)
    norm = float(np.linalg.norm(vector))
    if vector.size == 0 or not np.isfinite(vector).all() or norm == 0.0:
        raise InvalidRequest(f"{where}: vector must be non-empty, finite and not all zeros")
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
                source_uri=row.get("source_uri", ""),
            )
            metadata.to_proto(row["metadata"], item.metadata)
        item.objects.append(
            retrieval_pb2.StoredObject(
                object_index=row["object_index"],
                box=_box(row),
                label=row["label"],
                detection_score=row["detection_score"],
                vector=vectors.to_vector(row["vector"]) if "vector" in row else None,
            )
        )
    return list(items.values())


def _candidate(row: Row) -> retrieval_pb2.Candidate:
    candidate = retrieval_pb2.Candidate(
        item_id=row["item_id"],
        object_index=row["object_index"],
        box=_box(row),
        label=row["label"],
        ann_score=row["score"],
        content_hash=row["content_hash"],
    )
    metadata.to_proto(row["metadata"], candidate.metadata)
    return candidate
