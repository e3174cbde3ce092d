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
from dataclasses import replace
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
from services.retrieval.records import (
    Binding,
    CatalogRecords,
    MigrationError,
    ModelMismatch,
    Record,
    catalog_of,
    check_binding,
    generation_key,
)
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
DEFAULT_LIST_ITEMS = 500
MAX_LIST_ITEMS = 5000
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
        except (ReadOnlyReplica, ModelMismatch, MigrationError) as error:
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
        self.records = CatalogRecords(self.store, settings)
        self._refresh_records: asyncio.Task[None] | None = None
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
        await self.records.refresh(force=True)
        self._refresh_records = asyncio.create_task(self._keep_records_fresh())

    async def _keep_records_fresh(self) -> None:
        """Re-read the records in the background too, so that the model metrics follow a
        migration made through another replica while this one serves nothing."""
        while True:
            await asyncio.sleep(self.settings.catalog_refresh_seconds)
            try:
                await self.records.refresh()
            except (StoreUnavailable, *MILVUS_ERRORS) as error:
                log.info("catalogue records not refreshed", extra={"reason": str(error)})

    async def watch_readiness(self, report: Callable[[bool], Awaitable[None]]) -> None:
        """Health follows Milvus, and a milvus-lite that dies or hangs is started again."""
        await watch.watch_milvus(self.store, self.settings, report)

    async def close(self) -> None:
        if self._refresh_records is not None:
            self._refresh_records.cancel()
            await asyncio.gather(self._refresh_records, return_exceptions=True)
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
            except ModelMismatch as error:
                code, message = grpc.StatusCode.FAILED_PRECONDITION, str(error)
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
        model = request.item.model_version
        binding = request.binding if request.HasField("binding") else None
        if binding is not None and binding.embedder and binding.embedder != model:
            raise InvalidRequest(
                f"binding.embedder {binding.embedder!r} differs from item.model_version "
                f"{model!r}: they name the same model"
            )
        # The dimension to check the vectors against: the bound collection's (checked again,
        # with the record, when the write runs: a migration may come in between).
        record = await self.records.get(catalog)
        if record is None:
            dim = (binding.dimension if binding else 0) or self.settings.dim
        else:
            bound = await self._bound(catalog, record, model, "write's vectors")
            dim = bound.dimension or self.settings.dim
        pending = self._pending(request.item, dim)
        pending.near_duplicate_threshold = request.near_duplicate_threshold
        pending.skip_duplicates = request.skip_duplicates
        pending.model = model
        pending.binding = binding
        pending.if_live_content_hash = request.if_live_content_hash
        outcome = await self.writes.submit(catalog, pending)
        return retrieval_pb2.UpsertResponse(
            rows=len(pending.rows) if outcome.written else 0,
            replaced=outcome.replaced,
            written=outcome.written,
            same_content=outcome.same_content,
            skipped=outcome.skipped,
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
        """Route each item to the collection bound to its embedder and write each group.
        Runs under the catalogue's shared gate: MigrateCatalog (exclusive) never interleaves,
        so an item is routed and written with one record."""
        async with self._changing(catalog), self.gate.shared(catalog):
            record = await self._record_for_writes(catalog, items)
            outcomes: list[Outcome | None] = [None] * len(items)
            groups: dict[str, list[int]] = {}
            for position, item in enumerate(items):
                try:
                    binding = self._write_binding(record, item)
                except ModelMismatch as error:
                    outcomes[position] = Outcome.failed(error)
                    continue
                groups.setdefault(binding.key, []).append(position)
            await self._guard(record, items, outcomes)
            written: dict[str, int] = {}
            for key, positions in groups.items():
                todo = [p for p in positions if outcomes[p] is None]
                if not todo:
                    continue
                results = await asyncio.to_thread(
                    write_batch, self.store, self.settings, key, [items[p] for p in todo]
                )
                for position, outcome in zip(todo, results, strict=True):
                    outcomes[position] = outcome
                written[key] = sum(o.written for o in results)
        done = [
            o if o is not None else Outcome.failed(AssertionError("unrouted")) for o in outcomes
        ]
        if any(written.values()):
            await self.invalidator.changed(catalog)
        for key, count in written.items():
            if count:
                self._written[key] = self._written.get(key, 0) + count
                self._schedule_refresh(key)
        return done

    async def _bound(self, catalog: str, record: Record, model: str, what: str) -> Binding:
        """The collection bound to `model`, re-reading the records once before refusing
        (another replica may have begun or switched a migration)."""
        binding = record.for_model(model)
        if binding is None:
            fresh = await self.records.get(catalog, refresh=True)
            record = fresh or record
            binding = record.for_model(model)
        if binding is None:
            raise ModelMismatch(f"{record.describe()}; this {what} come from {model}")
        return binding

    async def _record_for_writes(self, catalog: str, items: list[PendingItem]) -> Record:
        """The catalogue's record, made or completed by these writes where it must be: a new
        catalogue is bound by its first write, an unbound one (empty) by its first embedder,
        a collection's detector by its first write with objects."""
        record = await self.records.get(catalog)
        if (
            record is not None
            and record.stored
            and record.live.embedder
            and not any(self._detector_to_record(record, item) for item in items)
        ):
            return record
        async with self.records.lock:
            record = await self.records.get(catalog)
            first = next((item for item in items if item.model), None)
            if record is None or (not record.live.embedder and first is not None):
                model = first.model if first is not None else ""
                wanted = first.binding if first is not None else None
                dim = (
                    int(first.vectors.shape[1]) if first is not None else items[0].vectors.shape[1]
                )
                live = Binding(
                    embedder=model,
                    dimension=dim,
                    preprocessing=wanted.preprocessing if wanted else "",
                    key=catalog,
                )
                if record is None:
                    await asyncio.to_thread(self.store.collection, catalog, create=True, dim=dim)
                    record = Record(catalog, live)
                else:
                    record = record.with_binding(record.live, live)
                if model:
                    record = await self.records.save(record)
                    log.info("catalogue bound", extra={"catalog": catalog, "embedder": model})
            changed = False
            for item in items:
                binding = self._detector_to_record(record, item)
                if binding is not None:
                    detector = item.binding.detector if item.binding else ""
                    record = record.with_binding(binding, replace(binding, detector=detector))
                    changed = True
            if changed:
                record = await self.records.save(record)
            self.records.forget(catalog)
            return record

    @staticmethod
    def _detector_to_record(record: Record, item: PendingItem) -> Binding | None:
        """The binding whose detector this item records: the first write with objects."""
        if len(item.rows) < 2 or item.binding is None or not item.binding.detector:
            return None
        binding = record.for_model(item.model)
        if binding is None or binding.detector or not record.live.embedder:
            return None
        return binding

    @staticmethod
    def _write_binding(record: Record, item: PendingItem) -> Binding:
        binding = record.for_model(item.model)
        if binding is None:
            raise ModelMismatch(f"{record.describe()}; this write's vectors come from {item.model}")
        if item.vectors.shape[1] != binding.dimension and binding.dimension:
            raise ModelMismatch(
                f"{record.describe()}: its {binding.embedder or 'live'} collection holds "
                f"{binding.dimension}-value vectors; this write's have {item.vectors.shape[1]}"
            )
        if item.binding is not None:
            check_binding(record, binding, item.binding)
            detector = item.binding.detector
            if (
                len(item.rows) > 1
                and detector
                and binding.detector
                and detector != binding.detector
            ):
                raise ModelMismatch(
                    f"{record.describe()}, its objects found by detector {binding.detector}; "
                    f"this write's objects come from {detector}"
                )
        return binding

    async def _guard(
        self, record: Record, items: list[PendingItem], outcomes: list[Outcome | None]
    ) -> None:
        """if_live_content_hash: skip re-index writes whose item changed or went away in the
        live collection (read within the batch, so no write of the item interleaves)."""
        guarded = [
            p for p, item in enumerate(items) if item.if_live_content_hash and outcomes[p] is None
        ]
        if not guarded:
            return
        own, _ = await asyncio.to_thread(
            self.store.existing, record.live.key, [items[p].item_id for p in guarded], []
        )
        live = {r["item_id"]: r["content_hash"] for r in own if r["object_index"] == 0}
        for position in guarded:
            item = items[position]
            stored = live.get(item.item_id)
            if stored is None or stored != item.if_live_content_hash:
                outcomes[position] = Outcome(
                    written=False,
                    replaced=False,
                    same_content=False,
                    skipped="deleted" if stored is None else "changed",
                )

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
            record = await self.records.get(catalog)
            found = False
            # Every collection: a rollback or switch must find the same metadata.
            for key in record.keys() if record is not None else []:
                found |= await asyncio.to_thread(self._update_item, key, item_id, changes)
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
            record = await self.records.get(catalog)
            deleted = 0
            # Every collection: a re-index must not bring the item back, nor a rollback.
            for key in record.keys() if record is not None else []:
                deleted = max(deleted, await asyncio.to_thread(self._delete_item, key, item_id))
        if deleted:
            await self.invalidator.changed(catalog)
        return retrieval_pb2.DeleteItemResponse(rows_deleted=deleted)

    def _delete_item(self, catalog: str, item_id: str) -> int:
        try:
            own, _ = self.store.existing(catalog, [item_id], [])
        except CatalogNotFound:
            return 0
        self.store.delete_pks(catalog, [r["pk"] for r in own])
        return len(own)

    # -- reads -------------------------------------------------------------------------------

    @_rpc
    async def Lookup(self, request: retrieval_pb2.LookupRequest) -> retrieval_pb2.LookupResponse:
        catalog = resolve_catalog(request.catalog)
        record = await self.records.get(catalog)
        if record is None:
            return retrieval_pb2.LookupResponse()
        bound = await self._bound(catalog, record, request.model, "lookup's rows would")
        collection = bound.key
        key = request.WhichOneof("key")
        if key == "item_id":
            read = functools.partial(
                self.store.item_rows,
                collection,
                check_item_id(request.item_id),
                vectors=request.include_vectors,
            )
        elif key == "item_ids":
            ids = [check_item_id(i) for i in request.item_ids.ids]
            if len(ids) > MAX_ITEMS_PER_CALL:
                raise InvalidRequest(f"{len(ids)} item ids; at most {MAX_ITEMS_PER_CALL}")
            read = functools.partial(
                self.store.items_rows, collection, ids, vectors=request.include_vectors
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
                collection,
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
        record = await self.records.get(catalog)
        if record is None:
            raise CatalogNotFound(f"catalog {catalog!r} does not exist")
        bound = await self._bound(catalog, record, request.model, "query's vectors")
        rows, matrix = await asyncio.to_thread(
            self.store.search,
            bound.key,
            query,
            request.limit,
            expression,
            distinct_items=request.distinct_items,
            raw=request.raw_vectors,
        )
        response = retrieval_pb2.RetrievalSearchResponse(candidates=[_candidate(r) for r in rows])
        if request.include_vectors and rows:
            response.vectors.CopyFrom(vectors.pack(matrix, vectors.FLOAT16))
        return response

    @_rpc
    async def Stats(self, request: retrieval_pb2.StatsRequest) -> retrieval_pb2.StatsResponse:
        catalog = resolve_catalog(request.catalog)
        record = await self.records.get(catalog)
        if record is None:
            raise CatalogNotFound(f"catalog {catalog!r} does not exist")
        return await asyncio.to_thread(self._stats, record)

    def record_proto(self, record: Record) -> retrieval_pb2.CatalogRecord:
        name = self.store.collection_name
        proto = retrieval_pb2.CatalogRecord(
            catalog=record.catalog, live=record.live.to_proto(name(record.live.key))
        )
        if record.next is not None:
            proto.next.CopyFrom(record.next.to_proto(name(record.next.key)))
        if record.previous is not None:
            proto.previous.CopyFrom(record.previous.to_proto(name(record.previous.key)))
        return proto

    def _stats(self, record: Record) -> retrieval_pb2.StatsResponse:
        """The live collection's figures, with the record."""
        catalog = record.live.key
        opened = self.store.collection(catalog, create=False)
        layout = opened.layout
        next_items = 0
        if record.next is not None:
            with contextlib.suppress(CatalogNotFound):
                next_items = self.store.count(record.next.key, "object_index == 0")
        return retrieval_pb2.StatsResponse(
            record=self.record_proto(record),
            next_items=next_items,
            catalog=record.catalog,
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
        await self.records.refresh()
        # Catalogues with a record, and collections made before records (adopted on use).
        names = sorted({*self.records.known(), *await asyncio.to_thread(self.store.catalogs)})
        found = []
        for catalog in names:
            try:
                record = await self.records.get(catalog)
                if record is not None:
                    found.append(await asyncio.to_thread(self._stats, record))
            except CatalogNotFound:  # dropped meanwhile
                continue
        return retrieval_pb2.RetrievalListCatalogsResponse(catalogs=found)

    # -- whole catalogues --------------------------------------------------------------------

    @_rpc
    async def DropCatalog(
        self, request: retrieval_pb2.RetrievalDropCatalogRequest
    ) -> retrieval_pb2.RetrievalDropCatalogResponse:
        self._require_writer("DropCatalog")
        catalog = resolve_catalog(request.catalog)
        async with self._changing(catalog), self.gate.exclusive(catalog), self.records.lock:
            record = await self.records.get(catalog)
            dropped = False
            for key in record.keys() if record is not None else []:
                dropped |= await asyncio.to_thread(self.store.drop, key)
                self._written.pop(key, None)
            if record is not None and record.stored:
                await self.records.delete(catalog)
            self.records.forget(catalog)
        await self.invalidator.changed(catalog)
        return retrieval_pb2.RetrievalDropCatalogResponse(dropped=dropped)

    @_rpc
    async def MigrateCatalog(
        self, request: retrieval_pb2.MigrateCatalogRequest
    ) -> retrieval_pb2.CatalogRecord:
        """The lifecycle's state machine (records.py). Changes run under the catalogue's
        exclusive gate: every write batch in flight finishes first, and those after it are
        routed with the new record."""
        catalog = resolve_catalog(request.catalog)
        action = request.action
        Action = retrieval_pb2.MigrateCatalogRequest.Action
        if action == Action.STATUS:
            record = await self.records.get(catalog, refresh=True)
            if record is None:
                raise CatalogNotFound(f"catalog {catalog!r} does not exist")
            return self.record_proto(record)
        if action not in (
            Action.BEGIN,
            Action.SWITCH,
            Action.ROLLBACK,
            Action.DROP_PREVIOUS,
            Action.ABORT,
        ):
            raise InvalidRequest(
                "action: expected BEGIN, SWITCH, ROLLBACK, DROP_PREVIOUS, ABORT or STATUS"
            )
        self._require_writer("MigrateCatalog")
        async with self._changing(catalog), self.gate.exclusive(catalog), self.records.lock:
            record = await self.records.get(catalog, refresh=True)
            if record is None:
                raise CatalogNotFound(f"catalog {catalog!r} does not exist")
            if not record.live.embedder:
                raise MigrationError(
                    f"catalog {catalog!r} holds no items yet: it is bound by its first write, "
                    "so there is nothing to migrate"
                )
            changed = await self._migrate(record, action, request.binding)
            if changed is not record:
                record = await self.records.save(changed)
                self.records.forget(catalog)
                log.info(
                    "catalogue migration",
                    extra={
                        "catalog": catalog,
                        "action": Action.Name(action),
                        "live": record.live.embedder,
                        "next": record.next.embedder if record.next else "",
                        "previous": record.previous.embedder if record.previous else "",
                    },
                )
        # SWITCH, ROLLBACK: cached results were answered by the other model. BEGIN, ABORT,
        # DROP_PREVIOUS: gateways re-read the record at once (where writes must go).
        await self.invalidator.changed(catalog)
        return self.record_proto(record)

    async def _migrate(
        self, record: Record, action: int, wanted: retrieval_pb2.ModelBinding
    ) -> Record:
        """The record after the action (the same object when nothing changes); collections
        are created before the record names them and dropped after it stops naming them."""
        Action = retrieval_pb2.MigrateCatalogRequest.Action
        catalog = record.catalog
        how_to_drop = f"loupe reindex {catalog} --drop-previous"
        if action == Action.BEGIN:
            if not wanted.embedder or wanted.dimension <= 0:
                raise InvalidRequest(
                    "BEGIN needs binding.embedder ('name/version') and binding.dimension > 0"
                )
            if record.next is not None:
                if record.next.embedder == wanted.embedder:
                    return record  # a re-index resumed
                raise MigrationError(
                    f"{record.describe()}: finish or abort that re-index first "
                    f"(loupe reindex {catalog} --abort)"
                )
            if record.previous is not None:
                raise MigrationError(
                    f"{record.describe()}: drop the previous collection first: {how_to_drop}"
                )
            if wanted.embedder == record.live.embedder:
                raise MigrationError(f"{record.describe()} already")
            generation = record.generation + 1
            key = generation_key(catalog, generation)
            await asyncio.to_thread(self.store.collection, key, create=True, dim=wanted.dimension)
            binding = Binding(
                embedder=wanted.embedder,
                dimension=wanted.dimension,
                preprocessing=wanted.preprocessing,
                detector=wanted.detector,
                key=key,
            )
            return replace(record, next=binding, generation=generation)
        if action == Action.SWITCH:
            if record.next is None:
                raise MigrationError(f"{record.describe()}: no re-index to switch to")
            if record.previous is not None:
                raise MigrationError(
                    f"{record.describe()}: drop the previous collection first: {how_to_drop}"
                )
            return replace(record, live=record.next, next=None, previous=record.live)
        if action == Action.ROLLBACK:
            if record.previous is None:
                raise MigrationError(
                    f"{record.describe()}: no previous collection to roll back to (it was "
                    "dropped, or the catalogue was never switched)"
                )
            return replace(record, live=record.previous, previous=record.live)
        if action == Action.DROP_PREVIOUS:
            if record.previous is None:
                raise MigrationError(f"{record.describe()}: no previous collection to drop")
            changed = await self.records.save(replace(record, previous=None))
            await asyncio.to_thread(self.store.drop, record.previous.key)
            self._written.pop(record.previous.key, None)
            return changed
        # ABORT
        if record.next is None:
            raise MigrationError(f"{record.describe()}: no re-index to abort")
        changed = await self.records.save(replace(record, next=None))
        await asyncio.to_thread(self.store.drop, record.next.key)
        self._written.pop(record.next.key, None)
        return changed

    @_rpc
    async def ListItems(
        self, request: retrieval_pb2.ListItemsRequest
    ) -> retrieval_pb2.ListItemsResponse:
        catalog = resolve_catalog(request.catalog)
        limit = request.limit or DEFAULT_LIST_ITEMS
        if not 0 < limit <= MAX_LIST_ITEMS:
            raise InvalidRequest(
                f"limit={request.limit}: expected 1 to {MAX_LIST_ITEMS} (0 = {DEFAULT_LIST_ITEMS})"
            )
        record = await self.records.get(catalog)
        if record is None:
            raise CatalogNotFound(f"catalog {catalog!r} does not exist")
        bound = await self._bound(catalog, record, request.model, "listing's rows would")

        def page() -> retrieval_pb2.ListItemsResponse:
            ids = self.store.item_ids_after(bound.key, request.after_item_id, limit)
            rows = self.store.items_rows(bound.key, ids, vectors=False) if ids else []
            response = retrieval_pb2.ListItemsResponse(
                next_after_item_id=ids[-1] if len(ids) == limit else ""
            )
            for item in _items(rows):
                listed = response.items.add(
                    item_id=item.item_id,
                    content_hash=item.content_hash,
                    source_uri=item.source_uri,
                    objects=len(item.objects) - 1,
                    model_version=item.model_version,
                )
                for name, value in item.metadata.items():
                    listed.metadata[name].CopyFrom(value)
            return response

        return await asyncio.to_thread(page)

    @_rpc
    async def Augment(self, request: retrieval_pb2.AugmentRequest) -> retrieval_pb2.AugmentResponse:
        self._require_writer("Augment")
        catalog = resolve_catalog(request.catalog)
        k = request.neighbours or self.settings.dba_neighbours
        alpha = request.alpha or self.settings.dba_alpha
        if not 0 <= k <= 100 or not 0 <= alpha <= 100:
            raise InvalidRequest(f"neighbours={k}, alpha={alpha}: expected 0-100 each")
        started = time.perf_counter()
        record = await self.records.get(catalog)
        if record is None:
            raise CatalogNotFound(f"catalog {catalog!r} does not exist")
        items = await self._augment_catalog(record.live.key, k, alpha)
        return retrieval_pb2.AugmentResponse(items=items, seconds=time.perf_counter() - started)

    async def _augment_catalog(self, key: str, k: int, alpha: float) -> int:
        """The DBA batch job (dba.py) on one collection of a catalogue, a page at a time;
        writes wait only for the page in progress."""
        catalog = catalog_of(key)
        self._written[key] = 0
        pages = self.store.whole_image_pks(key, dba.PAGE)
        done, invalidated = 0, time.monotonic()
        started = time.monotonic()
        async with self._changing(catalog):
            while (pks := await asyncio.to_thread(next, pages, None)) is not None:
                async with self.gate.exclusive(catalog):
                    done += await asyncio.to_thread(
                        dba.augment_page, self.store, key, pks, k, alpha
                    )
                if time.monotonic() - invalidated > INVALIDATE_EVERY_SECONDS:
                    await self.invalidator.changed(catalog)
                    invalidated = time.monotonic()
            await asyncio.to_thread(self.store.flush, key)
        await self.invalidator.changed(catalog)
        log.info(
            "catalogue augmented",
            extra={
                "catalog": key,
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
