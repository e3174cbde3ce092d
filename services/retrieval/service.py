"""RetrievalService: validation and proto conversion around the Milvus store."""

from __future__ import annotations

import asyncio
import functools
import math
import unicodedata
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np

from loupe.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc
from services.retrieval import metadata
from services.retrieval.filters import InvalidFilter, build_filter
from services.retrieval.metadata import InvalidMetadata
from services.retrieval.settings import RetrievalSettings
from services.retrieval.store import (
    MAX_ITEM_ID_CHARS,
    MAX_OBJECTS,
    MilvusStore,
    Row,
    StoreUnavailable,
)

# Indexes that keep the raw float vectors and score candidates with them. Anything else
# (quantised, or AUTOINDEX, whose choice depends on the Milvus at hand) gets re-scored.
EXACT_SCORE_INDEXES = frozenset({"FLAT", "IVF_FLAT", "HNSW"})
DEFAULT_LOOKUP_LIMIT = 10
MAX_LOOKUP_LIMIT = 100
# VARCHAR(64) fields of the schema; a Milvus server counts their length in UTF-8 bytes.
MAX_SHORT_TEXT_BYTES = 64

Request = TypeVar("Request")
Response = TypeVar("Response")


class InvalidRequest(ValueError):
    """The caller's request is malformed; the message says what to fix."""


CALLER_ERRORS = (InvalidRequest, InvalidFilter, InvalidMetadata)


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

    def register(self, server: grpc.aio.Server) -> None:
        retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(self, server)

    async def start(self) -> None:
        await asyncio.to_thread(self.store.open)

    async def close(self) -> None:
        await asyncio.to_thread(self.store.close)

    @_rpc
    async def Upsert(self, request: retrieval_pb2.UpsertRequest) -> retrieval_pb2.UpsertResponse:
        rows = self._rows(request.item)
        replaced = await asyncio.to_thread(self.store.replace_item, request.item.item_id, rows)
        return retrieval_pb2.UpsertResponse(rows=len(rows), replaced=replaced)

    @_rpc
    async def Delete(
        self, request: retrieval_pb2.DeleteItemRequest
    ) -> retrieval_pb2.DeleteItemResponse:
        item_id = _item_id(request.item_id)
        deleted = await asyncio.to_thread(self.store.delete_item, item_id)
        return retrieval_pb2.DeleteItemResponse(rows_deleted=deleted)

    @_rpc
    async def Lookup(self, request: retrieval_pb2.LookupRequest) -> retrieval_pb2.LookupResponse:
        vectors = request.include_vectors
        key = request.WhichOneof("key")
        if key == "item_id":
            rows = await asyncio.to_thread(
                self.store.item_rows, _item_id(request.item_id), vectors=vectors
            )
        elif key == "content_hash":
            limit = request.limit or DEFAULT_LOOKUP_LIMIT
            if not request.content_hash or not 0 < limit <= MAX_LOOKUP_LIMIT:
                raise InvalidRequest(
                    f"lookup by content_hash needs a non-empty hash and a limit of 1 to "
                    f"{MAX_LOOKUP_LIMIT} (got {request.limit}; 0 means {DEFAULT_LOOKUP_LIMIT})"
                )
            rows = await asyncio.to_thread(
                self.store.rows_by_hash, request.content_hash, limit, vectors=vectors
            )
        else:
            raise InvalidRequest("set item_id or content_hash")
        return retrieval_pb2.LookupResponse(items=_items(rows))

    @_rpc
    async def Search(
        self, request: retrieval_pb2.RetrievalSearchRequest
    ) -> retrieval_pb2.RetrievalSearchResponse:
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
            query,
            request.limit,
            expression,
            params,
            vectors=request.include_vectors,
        )
        return retrieval_pb2.RetrievalSearchResponse(candidates=[_candidate(r) for r in rows])

    @_rpc
    async def Stats(self, request: retrieval_pb2.StatsRequest) -> retrieval_pb2.StatsResponse:
        rows = await asyncio.to_thread(self.store.count)
        return retrieval_pb2.StatsResponse(
            rows=rows,
            collection=self.settings.collection,
            dimension=self.settings.dim,
            index_type=self.store.index_type,
            exact_scores=self.store.index_type in EXACT_SCORE_INDEXES,
        )

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
        for obj in item.objects:
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
                    "vector": _unit_vector(obj.vector.values, self.settings.dim, where),
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


def _unit_vector(values: Sequence[float], dim: int, where: str) -> list[float]:
    """The vector scaled to unit length, so that inner product is cosine similarity."""
    if len(values) != dim:
        raise InvalidRequest(f"{where}: vector has {len(values)} values; expected {dim}")
    vector = np.asarray(values, dtype=np.float64)
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(vector).all() or norm == 0.0:
        raise InvalidRequest(f"{where}: vector must be finite and not all zeros")
    result: list[float] = (vector / norm).astype(np.float32).tolist()
    return result


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
                vector=common_pb2.Vector(values=row["vector"]) if "vector" in row else None,
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
        vector=common_pb2.Vector(values=row["vector"]) if "vector" in row else None,
    )
    metadata.to_proto(row["metadata"], candidate.metadata)
    return candidate
