"""The gateway: Loupe's public API, orchestrating detection, embedding, retrieval and ranking.

Search, in order: resolve the query to vectors (an item's stored vectors, or the image's,
from the embedding cache or the embedding service, after detection when objects are asked
for) -> candidates from retrieval's compact index (K' items) with their full-precision
vectors -> ranking (query expansion, full-precision similarity and metadata signals, one hit
per item) -> top_k. Whole results are cached by request, per catalogue. A search goes on
without detection (whole image only) or ranking (retrieval's order) when either fails, and
says so (SearchResponse.degraded); such an answer is not cached.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager

import grpc
import numpy as np

from loupe.v1 import (
    common_pb2,
    detection_pb2,
    embedding_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    ranking_pb2,
    retrieval_pb2,
)
from services.common import cache_keys, vectors
from services.gateway import auth
from services.gateway.backends import Backends, RequestError
from services.gateway.cache import Cache
from services.gateway.coalescing import Coalescer
from services.gateway.metrics import (
    CACHE_HITS,
    CACHE_MISSES,
    DEGRADED_RESPONSES,
    DUPLICATES,
    INDEX_FAILURES,
    ITEMS_INDEXED,
    STAGE_SECONDS,
)
from services.gateway.originals import OriginalsError, OriginalsStore
from services.gateway.settings import GatewaySettings
from services.gateway.validation import (
    check_filter,
    check_item_id,
    check_metadata,
    check_source_uri,
    invalid,
    resolve_catalog,
    resolve_top_k,
)

log = logging.getLogger(__name__)
NO_DETECTOR = "-"
# Item ids per Lookup (retrieval's limit per call).
LOOKUP_IDS = 1000
# Items per coalesced call to retrieval (coalescing.py), and how long an item of a stream
# waits for others to be written with.
COALESCED_ITEMS = 256
BULK_WRITE_DELAY_SECONDS = 0.1
STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}
# K' is at least this many times top_k: on Corel-1k, 2 x top_k loses 0.001 of mAP@100
# against 4 x for 2.4 times less latency, and 1 x loses 0.016 (docs/quality.md).
CANDIDATES_PER_RESULT = 2


@contextmanager
def stage(name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        STAGE_SECONDS.labels(name).observe(time.perf_counter() - started)


def content_hash_of(image: bytes) -> str:
    return hashlib.sha256(image).hexdigest()


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, settings: GatewaySettings, backends: Backends, cache: Cache) -> None:
        self.settings = settings
        self.backends = backends
        self.cache = cache
        # Indexing's two calls to retrieval, each batched across concurrent items; items of a
        # stream (bulk ingestion) wait a little for company before they are written.
        self.stored_items = Coalescer(self._lookup_items, max_items=COALESCED_ITEMS)
        self.writes = Coalescer(self._upsert_items, max_items=COALESCED_ITEMS)
        self.bulk_writes = Coalescer(
            self._upsert_items, max_items=COALESCED_ITEMS, max_delay=BULK_WRITE_DELAY_SECONDS
        )
        # Where IndexRequest.keep_original keeps image bytes (LOUPE_ORIGINALS_URI); None: refused.
        self.originals = OriginalsStore(settings.originals_uri) if settings.originals_uri else None

    # ---- RPCs ---------------------------------------------------------------------------

    async def Index(
        self, request: gateway_pb2.IndexRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.IndexResponse:
        try:
            return await self._index(request, context)
        except RequestError as error:
            INDEX_FAILURES.labels(error.code.name).inc()
            await context.abort(error.code, error.message)
            raise  # unreachable: abort raises

    async def IndexStream(
        self,
        request_iterator: AsyncIterator[gateway_pb2.IndexRequest],
        context: grpc.aio.ServicerContext,
    ) -> gateway_pb2.IndexStreamResponse:
        # Items are indexed concurrently, but only `index_concurrency` at a time are held in
        # memory: the stream is not read further until a slot frees up.
        slots = asyncio.Semaphore(self.settings.index_concurrency)
        tasks: list[asyncio.Task[gateway_pb2.IndexResult]] = []
        received = 0
        async for request in request_iterator:
            received += 1
            if received > self.settings.max_stream_items:
                tasks.append(asyncio.create_task(self._over_limit(request.item_id)))
                continue
            await slots.acquire()
            tasks.append(asyncio.create_task(self._index_result(request, context, slots)))
        results = await asyncio.gather(*tasks)
        indexed = sum(1 for r in results if r.code == 0)
        return gateway_pb2.IndexStreamResponse(
            results=results, indexed=indexed, failed=len(results) - indexed
        )

    async def Delete(
        self, request: gateway_pb2.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.DeleteResponse:
        try:
            check_item_id(request.item_id)
            catalog = resolve_catalog(request.catalog)
            with stage("delete"):
                # Retrieval, which owns the rows, invalidates cached results.
                reply = await self.backends.call(
                    "retrieval writer",
                    self.backends.retrieval_writer.Delete,
                    retrieval_pb2.DeleteItemRequest(item_id=request.item_id, catalog=catalog),
                    context,
                )
            return gateway_pb2.DeleteResponse(deleted=reply.rows_deleted > 0)
        except RequestError as error:
            await context.abort(error.code, error.message)
            raise

    async def Get(
        self, request: gateway_pb2.GetRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GetResponse:
        try:
            check_item_id(request.item_id)
            item = await self._stored_item(
                request.item_id, resolve_catalog(request.catalog), context, include_vectors=False
            )
            return gateway_pb2.GetResponse(
                item_id=item.item_id,
                content_hash=item.content_hash,
                model_version=item.model_version,
                metadata=item.metadata,
                image_width=item.image_width,
                image_height=item.image_height,
                objects=[
                    gateway_pb2.ItemObject(
                        object_index=o.object_index,
                        box=o.box,
                        label=o.label,
                        score=o.detection_score,
                    )
                    for o in item.objects
                    if o.object_index > 0
                ],
            )
        except RequestError as error:
            await context.abort(error.code, error.message)
            raise

    async def Detect(
        self, request: detection_pb2.DetectRequest, context: grpc.aio.ServicerContext
    ) -> detection_pb2.DetectResponse:
        try:
            if not request.image:
                raise invalid("image is empty")
            with stage("detect"):
                return await self.backends.call(
                    "detection", self.backends.detection.Detect, request, context
                )
        except RequestError as error:
            await context.abort(error.code, error.message)
            raise

    async def Search(
        self, request: gateway_pb2.SearchRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.SearchResponse:
        try:
            try:
                return await self._search(request, context)
            except RequestError as error:
                if error.code != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                # A migration switched or dropped a model since the record was read: read it
                # again and retry once.
                self.backends.forget_record(resolve_catalog(request.catalog))
                return await self._search(request, context)
        except RequestError as error:
            await context.abort(error.code, error.message)
            raise

    async def ListCatalogs(
        self, request: gateway_pb2.ListCatalogsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListCatalogsResponse:
        try:
            reply = await self.backends.call(
                "retrieval",
                self.backends.retrieval.ListCatalogs,
                retrieval_pb2.RetrievalListCatalogsRequest(),
                context,
            )
        except RequestError as error:
            await context.abort(error.code, error.message)
            raise
        return gateway_pb2.ListCatalogsResponse(
            catalogs=[
                gateway_pb2.Catalog(
                    name=c.catalog,
                    items=c.items,
                    rows=c.rows,
                    dimension=c.dimension,
                    index_type=c.index_type,
                    candidate_code=c.candidate_code,
                    code_bytes=c.code_bytes,
                    full_vector_bytes=c.full_vector_bytes,
                    dba_neighbours=c.dba_neighbours,
                    code=c.code,
                    vector_store=c.vector_store,
                    stored_vector_bytes=c.stored_vector_bytes,
                    oversampling=c.oversampling,
                    indexed_rows=c.indexed_rows,
                    embedder=c.record.live.embedder,
                    preprocessing=c.record.live.preprocessing,
                    detector=c.record.live.detector,
                    next_embedder=c.record.next.embedder,
                    previous_embedder=c.record.previous.embedder,
                    next_items=c.next_items,
                )
                for c in reply.catalogs
            ]
        )

    async def DropCatalog(
        self, request: gateway_pb2.DropCatalogRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.DropCatalogResponse:
        try:
            if not request.catalog:
                # An empty name would mean the default catalogue: too easy to send by mistake.
                raise invalid("name the catalog to drop (the default one is 'default')")
            catalog = resolve_catalog(request.catalog)
            reply = await self.backends.call(
                "retrieval writer",
                self.backends.retrieval_writer.DropCatalog,
                retrieval_pb2.RetrievalDropCatalogRequest(catalog=catalog),
                context,
            )
        except RequestError as error:
            await context.abort(error.code, error.message)
            raise
        return gateway_pb2.DropCatalogResponse(dropped=reply.dropped)

    async def AugmentCatalog(
        self, request: gateway_pb2.AugmentCatalogRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.AugmentCatalogResponse:
        try:
            catalog = resolve_catalog(request.catalog)
            with stage("augment"):
                reply = await self.backends.call(
                    "retrieval writer",
                    self.backends.retrieval_writer.Augment,
                    retrieval_pb2.AugmentRequest(
                        catalog=catalog, neighbours=request.neighbours, alpha=request.alpha
                    ),
                    context,
                    # A batch job over the whole catalogue: the caller's deadline bounds it,
                    # not the per-call backend timeout.
                    long=True,
                )
        except RequestError as error:
            await context.abort(error.code, error.message)
            raise
        return gateway_pb2.AugmentCatalogResponse(items=reply.items, seconds=reply.seconds)

    async def MigrateCatalog(
        self, request: retrieval_pb2.MigrateCatalogRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.CatalogRecord:
        """Passed to retrieval: STATUS to a reader, the changes to the writer (whose queue
        they run in)."""
        try:
            if not request.catalog:
                raise invalid("name the catalog (the default one is 'default')")
            forward = retrieval_pb2.MigrateCatalogRequest()
            forward.CopyFrom(request)
            forward.catalog = resolve_catalog(request.catalog)
            if request.action == retrieval_pb2.MigrateCatalogRequest.BEGIN:
                await self._served_binding(forward.binding, context)
            status = request.action == retrieval_pb2.MigrateCatalogRequest.STATUS
            backend = "retrieval" if status else "retrieval writer"
            stub = self.backends.retrieval if status else self.backends.retrieval_writer
            reply: retrieval_pb2.CatalogRecord = await self.backends.call(
                backend, stub.MigrateCatalog, forward, context
            )
        except RequestError as error:
            await context.abort(error.code, error.message)
            raise
        self.backends.forget_record(forward.catalog)
        return reply

    async def _served_binding(
        self, binding: retrieval_pb2.ModelBinding, context: grpc.aio.ServicerContext
    ) -> None:
        """A BEGIN that names its model only ("name" or "name/version", as `loupe reindex`
        sends it) gets the served model's version, dimension and preprocessing: a client does
        not know them, and a model this deployment does not serve cannot be re-indexed to."""
        if binding.dimension:
            return
        served = await self.backends.served_embedders(context, fresh=True)
        named = [m for m in served if binding.embedder in (m, m.split("/")[0])]
        if not named:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {binding.embedder!r} is not served by this deployment; it serves "
                f"{', '.join(served)} (serve it too: LOUPE_EMBEDDING_EXTRA_MODELS)",
            )
        info = served[named[0]]
        binding.embedder = named[0]
        binding.dimension = info.dimension
        binding.preprocessing = binding.preprocessing or info.preprocessing

    async def ListItems(
        self, request: retrieval_pb2.ListItemsRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.ListItemsResponse:
        try:
            forward = retrieval_pb2.ListItemsRequest()
            forward.CopyFrom(request)
            forward.catalog = resolve_catalog(request.catalog)
            if request.after_item_id:
                check_item_id(request.after_item_id)
            reply: retrieval_pb2.ListItemsResponse = await self.backends.call(
                "retrieval", self.backends.retrieval.ListItems, forward, context
            )
        except RequestError as error:
            await context.abort(error.code, error.message)
            raise
        return reply

    # ---- search -------------------------------------------------------------------------

    async def _search(
        self, request: gateway_pb2.SearchRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.SearchResponse:
        top_k = resolve_top_k(request.top_k, self.settings.default_top_k, self.settings.max_top_k)
        query = request.WhichOneof("query")
        if query is None:
            raise invalid("set the query: image bytes or item_id")
        if query == "item_id":
            check_item_id(request.item_id)
            if request.HasField("crop"):
                raise invalid("crop applies to image queries only, not to item_id")
        elif not request.image:
            raise invalid("image is empty")
        check_metadata(request.context_metadata, "context_metadata")
        check_filter(request.filter)
        catalog = resolve_catalog(request.catalog)
        if request.candidates and not top_k <= request.candidates <= self.settings.max_candidates:
            raise invalid(
                f"candidates={request.candidates}: expected {top_k} (top_k) to "
                f"{self.settings.max_candidates}, or 0 for the default"
            )
        image_hash = content_hash_of(request.image) if query == "image" else ""

        current = await self.cache.generation(catalog)
        # The catalogue's live embedder: queries are embedded by it and searched in its
        # collection, whatever the deployment's default model is.
        embedder = await self._search_embedder(catalog, current, context)
        # What the answer was made without: a backend that failed (did not answer, or its
        # breaker is open) and that a search can do without. Detection: the whole image is
        # still searched, and no objects; ranking: retrieval's order. Such an answer is
        # flagged degraded and never cached, so the full answer follows once it is back.
        degraded: set[str] = set()
        detector = NO_DETECTOR
        # A crop's label comes from detecting its image (settings.query_labels).
        crop_label = query == "image" and request.HasField("crop") and self.settings.query_labels
        if (request.objects or crop_label) and query == "image":
            try:
                detector = await self.backends.model_info("detection", context)
            except RequestError as error:
                if error.backend != "detection":
                    raise
                degraded.add("detection")

        # The cache key is the request with the image replaced by its hash, plus the models,
        # under the current index generation.
        key = None
        generation = None if degraded else current
        if generation is not None:
            normalised = gateway_pb2.SearchRequest()
            normalised.CopyFrom(request)
            normalised.top_k = top_k
            normalised.catalog = catalog
            normalised.ClearField("image")  # its hash stands for it
            material = normalised.SerializeToString(deterministic=True)
            key = cache_keys.search_key(
                generation,
                b"|".join([material, image_hash.encode(), embedder.encode(), detector.encode()]),
            )
            with stage("cache"):
                cached = await self.cache.get_search(key)
            if cached is not None:
                CACHE_HITS.labels("search").inc()
                response = gateway_pb2.SearchResponse.FromString(cached)
                response.cached = True
                return response
            CACHE_MISSES.labels("search").inc()

        query_label = ""
        if query == "image":
            # The crop's label is detected while the crop is embedded.
            labelled = (
                asyncio.ensure_future(self._crop_label(request, degraded, context))
                if crop_label and detector != NO_DETECTOR
                else None
            )
            try:
                main_vector, object_queries = await self._image_query(
                    request, image_hash, embedder, detector, degraded, context
                )
            except BaseException:
                if labelled is not None:
                    labelled.cancel()
                raise
            if labelled is not None:
                query_label = await labelled
            exclude: list[str] = []
            query_metadata = dict(request.context_metadata)
        else:
            item = await self._stored_item(
                request.item_id, catalog, context, include_vectors=True, model=embedder
            )
            main_vector = item.objects[0].vector
            object_queries = [
                (self._detection_of(o), o.vector) for o in item.objects[1:] if request.objects
            ][: self.settings.max_query_objects]
            exclude = [item.item_id]
            query_metadata = {**item.metadata, **request.context_metadata}

        response = gateway_pb2.SearchResponse(model_version=embedder)
        # A whole image is compared with whole images only, so that indexing objects never
        # changes whole-image results; a crop or a detected object is compared with objects
        # too (Flashlight, Similar Looks), each item counted once.
        whole = not request.HasField("crop")
        searches = [
            self._search_vector(
                main_vector,
                top_k,
                request,
                catalog,
                exclude,
                query_metadata,
                whole,
                degraded,
                context,
                same_bytes_first=image_hash if whole else "",
                model=embedder,
                query_label=query_label,
            )
        ]
        searches += [
            self._search_vector(
                vector,
                top_k,
                request,
                catalog,
                exclude,
                query_metadata,
                False,
                degraded,
                context,
                model=embedder,
                query_label=detection.label if self.settings.query_labels else "",
            )
            for detection, vector in object_queries
        ]
        results = await asyncio.gather(*searches)
        response.results.extend(results[0])
        for (detection, _), hits in zip(object_queries, results[1:], strict=True):
            response.objects.add(detection=detection, results=hits)

        if degraded:
            response.degraded = True
            response.degraded_reasons.extend(sorted(degraded))
            for reason in degraded:
                DEGRADED_RESPONSES.labels(reason).inc()
        elif key is not None:
            await self.cache.set_search(key, response.SerializeToString())
        return response

    async def _search_embedder(
        self, catalog: str, generation: int | None, context: grpc.aio.ServicerContext
    ) -> str:
        """The embedder searches of the catalogue use: the one its live collection is bound
        to (the default served one for a catalogue not bound yet), which this deployment must
        serve."""
        record = await self.backends.catalog_record(catalog, generation, context)
        if record is None or not record.live.embedder:
            return await self.backends.model_info("embedding", context)
        live = record.live.embedder
        served = await self.backends.served_embedders(context)
        if live not in served:
            served = await self.backends.served_embedders(context, fresh=True)
        if live not in served:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"catalog {catalog!r} is bound to {live}; this deployment serves "
                f"{', '.join(served)} (serve {live} too: LOUPE_EMBEDDING_EXTRA_MODELS, or "
                f"re-index the catalogue: loupe reindex {catalog} --model ...)",
            )
        return live

    async def _image_query(
        self,
        request: gateway_pb2.SearchRequest,
        image_hash: str,
        embedder: str,
        detector: str,
        degraded: set[str],
        context: grpc.aio.ServicerContext,
    ) -> tuple[common_pb2.Vector, list[tuple[common_pb2.Detection, common_pb2.Vector]]]:
        """Vectors for an image query: the whole image or its crop, and detected objects (none
        when detection fails: the answer is then degraded)."""
        objects: list[tuple[common_pb2.Detection, common_pb2.Vector]] = []
        whole_vector = None
        if detector != NO_DETECTOR and request.objects:
            try:
                item, _ = await self._image_vectors(
                    request.image,
                    image_hash,
                    embedder,
                    detector,
                    self.settings.max_query_objects,
                    context,
                )
                whole_vector = item.objects[0].vector
                objects = [(self._detection_of(o), o.vector) for o in item.objects[1:]]
            except RequestError as error:
                if error.backend != "detection":
                    raise
                degraded.add("detection")
        if whole_vector is None and not request.HasField("crop"):
            # Cached under no detector, as an Index without detection would be.
            item, _ = await self._image_vectors(
                request.image,
                image_hash,
                embedder,
                NO_DETECTOR,
                self.settings.max_query_objects,
                context,
            )
            whole_vector = item.objects[0].vector
        if not request.HasField("crop"):
            assert whole_vector is not None
            return whole_vector, objects
        with stage("embed"):
            reply = await self.backends.call(
                "embedding",
                self.backends.embedding.Embed,
                embedding_pb2.EmbedRequest(
                    image=request.image, regions=[request.crop], model=embedder
                ),
                context,
            )
        return reply.regions[0], objects

    async def _search_vector(
        self,
        vector: common_pb2.Vector,
        top_k: int,
        request: gateway_pb2.SearchRequest,
        catalog: str,
        exclude: list[str],
        query_metadata: dict[str, common_pb2.Value],
        whole_images_only: bool,
        degraded: set[str],
        context: grpc.aio.ServicerContext,
        same_bytes_first: str = "",
        model: str = "",
        query_label: str = "",
    ) -> list[common_pb2.Hit]:
        """Candidates, then ranking. Items stored with the content hash `same_bytes_first` come
        first: query expansion and DBA rank by neighbourhoods, which can put a close sibling
        above the image itself, and a caller who searches with a catalogue's own photo expects
        that photo first."""
        candidates_wanted = request.candidates or max(
            self.settings.min_candidates, CANDIDATES_PER_RESULT * top_k
        )
        with stage("retrieve"):
            # Vectors always: ranking re-scores the candidates with them, and query expansion
            # needs them. They come as packed bytes, passed on to ranking as they are.
            found = await self.backends.call(
                "retrieval",
                self.backends.retrieval.Search,
                retrieval_pb2.RetrievalSearchRequest(
                    query=vector,
                    limit=candidates_wanted,
                    filter=request.filter,
                    exclude_item_ids=exclude,
                    include_vectors=True,
                    catalog=catalog,
                    whole_images_only=whole_images_only,
                    distinct_items=not whole_images_only,
                    raw_vectors=not whole_images_only and self.settings.object_search_raw_vectors,
                    # The query's vector space: retrieval searches the collection bound to it.
                    model=model,
                ),
                context,
            )
        if not found.candidates:
            return []
        item_labels = (
            await self._item_labels(found.candidates, catalog, model, context)
            if query_label
            else {}
        )
        try:
            fields = await self.backends.ranking_fields(context)
            with stage("rank"):
                ranked = await self.backends.call(
                    "ranking",
                    self.backends.ranking.Rank,
                    ranking_pb2.RankRequest(
                        query=vector,
                        candidates=[
                            _for_ranking(c, fields, item_labels.get(c.item_id, ()))
                            for c in found.candidates
                        ],
                        vectors=found.vectors,
                        top_k=top_k,
                        query_metadata=_only(query_metadata, fields),
                        query_label=query_label,
                    ),
                    context,
                )
        except RequestError as error:
            if error.backend != "ranking":
                raise
            degraded.add("ranking")
            ranked = _unranked(vector, found, top_k)
        # Ranking saw only what it needs: the rest of each hit comes from its candidate.
        by_row = {(c.item_id, c.object_index): c for c in found.candidates}
        hits = []
        for hit in ranked.hits:
            candidate = by_row[(hit.item_id, hit.object_index)]
            hit.metadata.clear()
            for key, value in candidate.metadata.items():
                hit.metadata[key].CopyFrom(value)
            if candidate.object_index > 0:
                hit.label = candidate.label
                if candidate.HasField("box"):
                    hit.box.CopyFrom(candidate.box)
            hits.append(hit)
        if same_bytes_first:
            exact = {c.item_id for c in found.candidates if c.content_hash == same_bytes_first}
            hits.sort(key=lambda hit: hit.item_id not in exact)  # stable: the rest keep order
        return hits

    # ---- indexing -----------------------------------------------------------------------

    async def _index(
        self,
        request: gateway_pb2.IndexRequest,
        context: grpc.aio.ServicerContext,
        *,
        bulk: bool = False,
    ) -> gateway_pb2.IndexResponse:
        """Index one item: skip it if it is stored with these bytes already, else detect and
        embed, then hand it to retrieval, which finds its duplicates and neighbours in the same
        batch write."""
        check_item_id(request.item_id)
        check_metadata(request.metadata)
        check_source_uri(request.source_uri)
        catalog = resolve_catalog(request.catalog)
        if not request.image:
            raise invalid("image is empty")
        content_hash = content_hash_of(request.image)
        if self._keeps_original(request):
            await self._keep_original(request.image, content_hash)
        detector = (
            await self.backends.model_info("detection", context) if request.detect else NO_DETECTOR
        )
        try:
            return await self._index_models(request, catalog, content_hash, detector, context, bulk)
        except RequestError as error:
            if error.code != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            # A migration began, switched or ended since the record was read: read it again
            # and retry once.
            self.backends.forget_record(catalog)
            return await self._index_models(request, catalog, content_hash, detector, context, bulk)

    async def _index_models(
        self,
        request: gateway_pb2.IndexRequest,
        catalog: str,
        content_hash: str,
        detector: str,
        context: grpc.aio.ServicerContext,
        bulk: bool,
    ) -> gateway_pb2.IndexResponse:
        """Index the item with every model the catalogue is bound to (during a migration,
        the live one and the other: dual writes, so that no write exists in one vector space
        only), the live one first; or, for a re-index write (IndexRequest.model), with that
        model only. Acknowledged when every write is done."""
        generation = await self.cache.generation(catalog)
        targets = await self._index_targets(request, catalog, generation, context)

        async def write(target: tuple[str, common_pb2.ModelInfo]) -> gateway_pb2.IndexResponse:
            model, info = target
            return await self._index_with(
                request, catalog, content_hash, model, info, detector, context, bulk
            )

        if len(targets) == 1:
            return await write(targets[0])
        if request.skip_duplicates:
            # Whether the item is written at all is the live collection's answer (a duplicate
            # found there): the others follow it.
            response = await write(targets[0])
            if not response.indexed:
                return response
            others = await asyncio.gather(*(write(target) for target in targets[1:]))
        else:
            # Each collection independently, at once: a write during a migration costs one
            # embedding time more in CPU, not in latency.
            response, *others = await asyncio.gather(*(write(target) for target in targets))
        response.indexed = all(r.indexed for r in others)
        response.unchanged = response.unchanged and all(r.unchanged for r in others)
        response.embedding_cached = response.embedding_cached and all(
            r.embedding_cached for r in others
        )
        return response

    async def _index_targets(
        self,
        request: gateway_pb2.IndexRequest,
        catalog: str,
        generation: int | None,
        context: grpc.aio.ServicerContext,
    ) -> list[tuple[str, common_pb2.ModelInfo]]:
        """('name/version', its info) of each embedder the item is written with."""
        served = await self.backends.served_embedders(context)
        if request.model:
            if request.if_live_content_hash and len(request.if_live_content_hash) > 64:
                raise invalid("if_live_content_hash: at most 64 characters (a SHA-256 in hex)")
            for fresh in (False, True):
                if fresh:
                    served = await self.backends.served_embedders(context, fresh=True)
                named = [
                    m for m in served if m == request.model or m.split("/")[0] == request.model
                ]
                if named:
                    return [(named[0], served[named[0]])]
            raise invalid(
                f"model {request.model!r} is not served by this deployment; it serves "
                f"{', '.join(served)}"
            )
        if request.if_live_content_hash:
            raise invalid("if_live_content_hash applies to re-index writes only: set model too")
        record = await self.backends.catalog_record(catalog, generation, context)
        if record is None or not record.live.embedder:
            default = next(iter(served))
            return [(default, served[default])]
        bound = [record.live.embedder]
        for role in ("next", "previous"):
            if record.HasField(role) and getattr(record, role).embedder:
                bound.append(getattr(record, role).embedder)
        if any(model not in served for model in bound):
            served = await self.backends.served_embedders(context, fresh=True)
        missing = [model for model in bound if model not in served]
        if missing:
            hint = (
                f" or drop the previous collection: loupe reindex {catalog} --drop-previous"
                if record.HasField("previous") and record.previous.embedder in missing
                else ""
            )
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"catalog {catalog!r} is bound to {' and '.join(bound)}; this deployment "
                f"serves {', '.join(served)}: serve {', '.join(missing)} too "
                f"(LOUPE_EMBEDDING_EXTRA_MODELS){hint}",
            )
        return [(model, served[model]) for model in bound]

    async def _index_with(
        self,
        request: gateway_pb2.IndexRequest,
        catalog: str,
        content_hash: str,
        embedder: str,
        info: common_pb2.ModelInfo,
        detector: str,
        context: grpc.aio.ServicerContext,
        bulk: bool,
    ) -> gateway_pb2.IndexResponse:
        """Index the item with one embedder, into the catalogue's collection bound to it."""
        response = gateway_pb2.IndexResponse(
            item_id=request.item_id, content_hash=content_hash, model_version=embedder
        )
        if not request.if_live_content_hash and await self._already_stored(
            request, catalog, content_hash, embedder, context
        ):
            response.indexed = response.unchanged = True
            return response

        vectors, response.embedding_cached = await self._image_vectors(
            request.image,
            content_hash,
            embedder,
            detector,
            self.settings.max_index_objects,
            context,
        )
        response.objects.extend(self._detection_of(o) for o in vectors.objects[1:])
        item = retrieval_pb2.StoredItem(
            item_id=request.item_id,
            content_hash=content_hash,
            model_version=embedder,
            metadata=request.metadata,
            image_width=vectors.image_width,
            image_height=vectors.image_height,
            objects=vectors.objects,
            source_uri=request.source_uri,
        )
        with stage("upsert"):
            writes = self.bulk_writes if bulk else self.writes
            written = await writes.submit(
                None,
                retrieval_pb2.UpsertRequest(
                    item=item,
                    catalog=catalog,
                    near_duplicate_threshold=self.settings.duplicate_threshold,
                    skip_duplicates=request.skip_duplicates,
                    binding=retrieval_pb2.ModelBinding(
                        embedder=embedder,
                        dimension=info.dimension,
                        preprocessing=info.preprocessing,
                        detector="" if detector == NO_DETECTOR else detector,
                    ),
                    if_live_content_hash=request.if_live_content_hash,
                ),
            )
        if isinstance(written, RequestError):
            raise written
        response.skipped = written.skipped
        for duplicate in written.duplicates:
            kind = gateway_pb2.Duplicate.EXACT if duplicate.exact else gateway_pb2.Duplicate.NEAR
            response.duplicates.add(
                item_id=duplicate.item_id, kind=kind, similarity=duplicate.similarity
            )
            DUPLICATES.labels(gateway_pb2.Duplicate.Kind.Name(kind)).inc()
        response.unchanged = written.same_content
        response.indexed = written.written
        if written.written:
            ITEMS_INDEXED.inc()
        return response

    def _keeps_original(self, request: gateway_pb2.IndexRequest) -> bool:
        """Whether this item's bytes go to the originals store (LOUPE_ORIGINALS_KEEP): asked
        for, or by policy: an item without a source can be re-embedded only from them."""
        keep = self.settings.originals_keep
        return (
            request.keep_original
            or keep == "always"
            or (keep == "unsourced" and not request.source_uri)
        )

    async def _keep_original(self, image: bytes, content_hash: str) -> None:
        """Keep the bytes in the originals store before anything is written: an item that is
        acknowledged with keep_original can always be embedded again."""
        if self.originals is None:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "keep_original is set but this gateway has no originals store: set "
                "LOUPE_ORIGINALS_URI (a folder, or s3://bucket/prefix; `loupe up` uses "
                "<data-dir>/originals), or index without it and give source_uri",
            )
        try:
            with stage("originals"):
                await asyncio.to_thread(self.originals.keep, image, content_hash)
        except OriginalsError as error:
            log.warning("cannot keep an original: %s", error)
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(error)) from None

    async def _already_stored(
        self,
        request: gateway_pb2.IndexRequest,
        catalog: str,
        content_hash: str,
        embedder: str,
        context: grpc.aio.ServicerContext,
    ) -> bool:
        """Whether the item is stored with these bytes by this embedder (and, when objects are
        asked for, with objects): then nothing is embedded again, and only changed metadata or
        source is rewritten. A re-run of a bulk load costs a lookup per item."""
        with stage("lookup"):
            stored = await self.stored_items.submit((catalog, embedder), request.item_id)
        if stored is None:
            return False
        if stored.content_hash != content_hash or stored.model_version != embedder:
            return False
        if request.detect and len(stored.objects) < 2:
            return False  # indexed without objects, or none were found: detect again
        if dict(stored.metadata) != dict(request.metadata) or (
            request.source_uri and stored.source_uri != request.source_uri
        ):
            with stage("upsert"):
                await self.backends.call(
                    "retrieval writer",
                    self.backends.retrieval_writer.UpdateItem,
                    retrieval_pb2.UpdateItemRequest(
                        item_id=request.item_id,
                        catalog=catalog,
                        metadata=request.metadata,
                        source_uri=request.source_uri or stored.source_uri,
                    ),
                    context,
                )
        return True

    async def _lookup_items(
        self, key: tuple[str, str], item_ids: list[str]
    ) -> list[retrieval_pb2.StoredItem | None]:
        """The items with these ids stored in the catalogue's collection of this embedder
        (None for those not stored), in one call."""
        catalog, model = key
        found = await self.backends.call(
            "retrieval",
            self.backends.retrieval.Lookup,
            retrieval_pb2.LookupRequest(
                item_ids=retrieval_pb2.ItemIds(ids=item_ids), catalog=catalog, model=model
            ),
            None,
        )
        by_id = {item.item_id: item for item in found.items}
        return [by_id.get(item_id) for item_id in item_ids]

    async def _upsert_items(
        self, _: None, requests: list[retrieval_pb2.UpsertRequest]
    ) -> list[retrieval_pb2.UpsertResponse | RequestError]:
        """Write these items in one call; each gets its response or its own error."""
        reply = await self.backends.call(
            "retrieval writer",
            self.backends.retrieval_writer.UpsertItems,
            retrieval_pb2.UpsertItemsRequest(items=requests),
            None,
        )
        return [
            result.response
            if result.code == 0
            else RequestError(STATUS_CODES[result.code], result.error)
            for result in reply.results
        ]

    async def _index_result(
        self,
        request: gateway_pb2.IndexRequest,
        context: grpc.aio.ServicerContext,
        slots: asyncio.Semaphore,
    ) -> gateway_pb2.IndexResult:
        try:
            response = await self._index(request, context, bulk=True)
            return gateway_pb2.IndexResult(item_id=request.item_id, response=response)
        except RequestError as error:
            INDEX_FAILURES.labels(error.code.name).inc()
            return gateway_pb2.IndexResult(
                item_id=request.item_id, code=error.code.value[0], error=error.message
            )
        except Exception:
            # One broken item must not fail the stream; the log has the traceback.
            log.exception("indexing an item failed", extra={"item_id": request.item_id})
            INDEX_FAILURES.labels("INTERNAL").inc()
            return gateway_pb2.IndexResult(
                item_id=request.item_id,
                code=grpc.StatusCode.INTERNAL.value[0],
                error="internal error while indexing this item",
            )
        finally:
            slots.release()

    async def _over_limit(self, item_id: str) -> gateway_pb2.IndexResult:
        INDEX_FAILURES.labels("RESOURCE_EXHAUSTED").inc()
        return gateway_pb2.IndexResult(
            item_id=item_id,
            code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
            error=f"a stream takes at most {self.settings.max_stream_items} items; "
            "send the rest in another stream",
        )

    # ---- vectors ------------------------------------------------------------------------

    async def _image_vectors(
        self,
        image: bytes,
        content_hash: str,
        embedder: str,
        detector: str,
        max_objects: int,
        context: grpc.aio.ServicerContext,
    ) -> tuple[retrieval_pb2.StoredItem, bool]:
        """Object 0 (the whole image) and, with a detector, each detected object, with vectors;
        and whether they came from the cache.

        The same bytes under the same models are embedded once: the result is cached by
        content hash.
        """
        key = cache_keys.embedding_key(embedder, detector, content_hash)
        with stage("cache"):
            cached = await self.cache.get_embedding(key)
        if cached is not None:
            CACHE_HITS.labels("embedding").inc()
            return retrieval_pb2.StoredItem.FromString(cached), True
        CACHE_MISSES.labels("embedding").inc()

        detections: list[common_pb2.Detection] = []
        if detector != NO_DETECTOR:
            with stage("detect"):
                found = await self.backends.call(
                    "detection",
                    self.backends.detection.Detect,
                    detection_pb2.DetectRequest(image=image),
                    context,
                )
            side = self.settings.min_object_pixels
            detections = [
                d
                for d in found.detections
                if d.box.x1 - d.box.x0 >= side and d.box.y1 - d.box.y0 >= side
            ][:max_objects]
        with stage("embed"):
            embedded = await self.backends.call(
                "embedding",
                self.backends.embedding.Embed,
                embedding_pb2.EmbedRequest(
                    image=image,
                    whole_image=True,
                    regions=[d.box for d in detections],
                    model=embedder,
                ),
                context,
            )
        item = retrieval_pb2.StoredItem(
            image_width=embedded.image_width, image_height=embedded.image_height
        )
        item.objects.add(object_index=0, vector=embedded.whole_image)
        for index, (detection, vector) in enumerate(
            zip(detections, embedded.regions, strict=True), start=1
        ):
            item.objects.add(
                object_index=index,
                box=detection.box,
                label=detection.label,
                detection_score=detection.score,
                vector=vector,
            )
        await self.cache.set_embedding(key, item.SerializeToString())
        return item, False

    async def _stored_item(
        self,
        item_id: str,
        catalog: str,
        context: grpc.aio.ServicerContext,
        *,
        include_vectors: bool,
        model: str = "",
    ) -> retrieval_pb2.StoredItem:
        with stage("lookup"):
            found = await self.backends.call(
                "retrieval",
                self.backends.retrieval.Lookup,
                retrieval_pb2.LookupRequest(
                    item_id=item_id, include_vectors=include_vectors, catalog=catalog, model=model
                ),
                context,
            )
        if not found.items:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND, f"no item with id {item_id!r} in catalog {catalog!r}"
            )
        return found.items[0]

    async def _crop_label(
        self,
        request: gateway_pb2.SearchRequest,
        degraded: set[str],
        context: grpc.aio.ServicerContext,
    ) -> str:
        """The label of the detection of the query's image that best overlaps its crop (IoU
        at least settings.query_label_iou); failing that (settings.crop_detection), the best
        detection within the crop; "" when there is none or detection failed (the answer is
        then degraded). The image's own detections come first: seen in context, they are
        labelled right more often than the crop alone (tools/objects_offline.py)."""
        try:
            with stage("detect"):
                found = await self.backends.call(
                    "detection",
                    self.backends.detection.Detect,
                    detection_pb2.DetectRequest(image=request.image),
                    context,
                )
                # Detections come best first: of equal overlaps (one box kept for two
                # classes), the likelier label.
                best, label = 0.0, ""
                for detection in found.detections:
                    overlap = _iou(detection.box, request.crop)
                    if overlap > best:
                        best, label = overlap, detection.label
                if best >= self.settings.query_label_iou:
                    return label
                if not self.settings.crop_detection:
                    return ""
                within = await self.backends.call(
                    "detection",
                    self.backends.detection.Detect,
                    detection_pb2.DetectRequest(image=request.image, region=request.crop),
                    context,
                )
        except RequestError as error:
            if error.backend != "detection":
                raise
            degraded.add("detection")
            return ""
        return within.detections[0].label if within.detections else ""

    async def _item_labels(
        self,
        candidates: Sequence[retrieval_pb2.Candidate],
        catalog: str,
        model: str,
        context: grpc.aio.ServicerContext,
    ) -> dict[str, list[str]]:
        """Each candidate item's object labels: retrieval's candidates carry only their own
        row's, and an item whose whole image wins for a crop may hold the object too."""
        ids = list(dict.fromkeys(c.item_id for c in candidates))
        with stage("lookup"):
            replies = await asyncio.gather(
                *(
                    self.backends.call(
                        "retrieval",
                        self.backends.retrieval.Lookup,
                        retrieval_pb2.LookupRequest(
                            item_ids=retrieval_pb2.ItemIds(ids=ids[start : start + LOOKUP_IDS]),
                            catalog=catalog,
                            model=model,
                        ),
                        context,
                    )
                    for start in range(0, len(ids), LOOKUP_IDS)
                )
            )
        return {
            item.item_id: sorted({o.label for o in item.objects if o.object_index > 0})
            for reply in replies
            for item in reply.items
        }

    @staticmethod
    def _detection_of(stored: retrieval_pb2.StoredObject) -> common_pb2.Detection:
        return common_pb2.Detection(
            box=stored.box, label=stored.label, score=stored.detection_score
        )


def _unranked(
    query: common_pb2.Vector, found: retrieval_pb2.RetrievalSearchResponse, top_k: int
) -> ranking_pb2.RankResponse:
    """What is answered while ranking is down: retrieval's candidates in its order (by
    full-precision similarity, one row per item), the first top_k, each scored by that
    cosine; no query expansion and no metadata signals."""
    candidates = found.candidates[:top_k]
    try:
        matrix = vectors.unpack(found.vectors, len(found.candidates))[: len(candidates)]
        scores = vectors.unit_rows(matrix) @ vectors.unit_rows(vectors.as_array(query)[None])[0]
    except vectors.InvalidVectors:
        scores = np.array([c.ann_score for c in candidates], dtype=np.float32)
    return ranking_pb2.RankResponse(
        hits=[
            common_pb2.Hit(
                item_id=c.item_id,
                object_index=c.object_index,
                score=float(score),
                parts=common_pb2.ScoreParts(similarity=float(score)),
            )
            for c, score in zip(candidates, scores, strict=True)
        ]
    )


def _iou(a: common_pb2.Box, b: common_pb2.Box) -> float:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    union = (a.x1 - a.x0) * (a.y1 - a.y0) + (b.x1 - b.x0) * (b.y1 - b.y0) - inter
    return inter / union if union > 0 else 0.0


def _only(
    metadata: dict[str, common_pb2.Value], fields: set[str] | None
) -> dict[str, common_pb2.Value]:
    """The metadata fields ranking reads (all of them for a ranking that does not say)."""
    if fields is None:
        return metadata
    return {key: value for key, value in metadata.items() if key in fields}


def _for_ranking(
    candidate: retrieval_pb2.Candidate,
    fields: set[str] | None,
    item_labels: Sequence[str] = (),
) -> retrieval_pb2.Candidate:
    """What ranking needs of a candidate: its row, its index score, the metadata its
    signals read (its vector travels in the packed matrix beside the list), and for a
    query with a label, its row's and its item's object labels."""
    return retrieval_pb2.Candidate(
        item_id=candidate.item_id,
        object_index=candidate.object_index,
        ann_score=candidate.ann_score,
        metadata=_only(dict(candidate.metadata), fields),
        label=candidate.label,
        item_labels=item_labels,
    )


class GatewayService:
    name = "gateway"
    grpc_services = [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name]

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        # First: a missing or bad keys file stops start-up before anything else is built.
        self.auth = auth.from_settings(settings)
        self.backends = Backends(settings)
        self.cache = Cache(
            settings.redis_url,
            settings.redis_password,
            settings.redis_timeout_seconds,
            settings.redis_retry_seconds,
            settings.embedding_cache_ttl_seconds,
            settings.search_cache_ttl_seconds,
            settings.tls,
        )

    def register(self, server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_GatewayServicer_to_server(
            GatewayServicer(self.settings, self.backends, self.cache), server
        )

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [self.auth] if self.auth is not None else []

    async def start(self) -> None:
        if self.auth is not None:
            self.auth.start()  # keys rotate while the backends are awaited, too
        # SERVING means a search can succeed: every backend must be up first.
        await self.backends.wait_until_serving()

    async def close(self) -> None:
        if self.auth is not None:
            await self.auth.close()
        await self.backends.close()
        await self.cache.close()
