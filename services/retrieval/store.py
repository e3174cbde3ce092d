"""The Milvus collection, through pymilvus's synchronous MilvusClient.

The same code serves milvus-lite (a local .db file) and a Milvus server (an http(s) URI):
only the URI differs, plus the string-literal dialect of filters (see filters.py) and
stopping milvus-lite's process on close. Methods block: the service runs them in threads.

No call needs `flush` for a read to see an earlier write: milvus-lite 2.5.1 answers every
read with all writes before it (and keeps them without a flush, even when killed), and on a
server every read asks for Strong consistency.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pymilvus import DataType, MilvusClient, MilvusException

from services.common.config import ConfigError
from services.retrieval.filters import quote
from services.retrieval.settings import MILVUS_MAX_TOPK, RetrievalSettings

log = logging.getLogger(__name__)

Row = dict[str, Any]

VECTOR = "vector"
# Every field but the vector: what lookups and searches return.
FIELDS = [
    "item_id",
    "object_index",
    "label",
    "detection_score",
    "box",
    "metadata",
    "content_hash",
    "model_version",
    "image_width",
    "image_height",
]
MAX_ITEM_ID_CHARS = 512
# Upsert validation keeps items below this, so one query returns every row of an item.
MAX_OBJECTS = 1000
# Indexed when the Milvus at hand can: lookups and deletes filter on them.
SCALAR_INDEXED = ("item_id", "content_hash")


class StoreUnavailable(Exception):
    """Milvus failed or is not reachable; the message names the URI, never the token."""


class MilvusStore:
    def __init__(self, settings: RetrievalSettings) -> None:
        self.settings = settings
        self.index_type = settings.index_type
        self._client: MilvusClient | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        """Connect, create the collection if missing (or check its dimension), and load it."""
        s = self.settings
        if s.is_lite:
            Path(s.milvus_uri).parent.mkdir(parents=True, exist_ok=True)
        with self._errors("connect"):
            self._client = MilvusClient(
                uri=s.milvus_uri, token=s.milvus_token, db_name=s.db_name, timeout=s.timeout_seconds
            )
            if self._client.has_collection(s.collection, timeout=s.timeout_seconds):
                self._check_dimension()
            else:
                self._create()
            # Also when a start-up died between creating the collection and its indexes.
            if VECTOR not in self._client.list_indexes(s.collection, timeout=s.timeout_seconds):
                self._create_indexes()
            self._client.load_collection(s.collection, timeout=s.timeout_seconds)
            index = self._client.describe_index(s.collection, VECTOR, timeout=s.timeout_seconds)
        self.index_type = (index or {}).get("index_type", s.index_type)
        if self.index_type != s.index_type:
            log.warning(
                "collection has another index type than configured; re-create it to change",
                extra={"collection": s.collection, "index_type": self.index_type},
            )
        log.info(
            "collection loaded",
            extra={"uri": s.milvus_uri, "collection": s.collection, "rows": self.count()},
        )

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        client.close()
        if self.settings.is_lite:
            # Stop milvus-lite's process now rather than at interpreter exit, so that a new
            # store on the same file (a restart) opens it afresh.
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(self.settings.milvus_uri)

    def _create(self) -> None:
        s, client = self.settings, self._require()
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        # A server counts max_length in UTF-8 bytes: room for 512 characters of any script.
        schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=2100)
        schema.add_field("item_id", DataType.VARCHAR, max_length=4 * MAX_ITEM_ID_CHARS)
        schema.add_field("object_index", DataType.INT32)
        schema.add_field("label", DataType.VARCHAR, max_length=64)
        schema.add_field("detection_score", DataType.FLOAT)
        # Not nullable (milvus-lite refuses nullable fields): {} when there is no box, and an
        # object, not an array, because the Milvus 2.3 server only stores JSON objects.
        schema.add_field("box", DataType.JSON)
        schema.add_field(VECTOR, DataType.FLOAT_VECTOR, dim=s.dim)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("content_hash", DataType.VARCHAR, max_length=64)
        schema.add_field("model_version", DataType.VARCHAR, max_length=64)
        schema.add_field("image_width", DataType.INT32)
        schema.add_field("image_height", DataType.INT32)
        # Strong: a search or lookup right after a write sees it (milvus-lite always does; a
        # server's default, Bounded, may not).
        client.create_collection(
            s.collection, schema=schema, consistency_level="Strong", timeout=s.timeout_seconds
        )
        log.info("collection created", extra={"collection": s.collection, "dim": s.dim})

    def _create_indexes(self) -> None:
        s, client = self.settings, self._require()
        # Every index before the first load: a Milvus 2.3 server refuses to load a collection
        # whose indexes changed while it was loaded.
        index = client.prepare_index_params()
        index.add_index(VECTOR, index_type=s.index_type, metric_type="IP", params=s.index_params)
        client.create_index(s.collection, index, timeout=s.timeout_seconds)
        for field in SCALAR_INDEXED:
            scalar = client.prepare_index_params()
            # No index type: each Milvus picks its default for VARCHAR (Trie in milvus-lite).
            scalar.add_index(field)
            try:
                client.create_index(s.collection, scalar, timeout=s.timeout_seconds)
            except MilvusException as error:
                log.info("no scalar index", extra={"field": field, "reason": error.message})

    def _check_dimension(self) -> None:
        s = self.settings
        description = self._require().describe_collection(s.collection, timeout=s.timeout_seconds)
        dims = [
            int(f.get("params", {}).get("dim", 0))
            for f in description.get("fields", [])
            if f.get("name") == VECTOR
        ]
        if dims != [s.dim]:
            found = f"vector dimension {dims[0]}" if dims else f"no {VECTOR!r} field"
            raise ConfigError(
                f"collection {s.collection!r} at {s.milvus_uri} has {found}, but "
                f"LOUPE_EMBEDDING_DIM={s.dim}: set LOUPE_MILVUS_COLLECTION to a new collection "
                "(and re-index into it) or fix LOUPE_EMBEDDING_DIM"
            )

    # -- reads and writes --------------------------------------------------------------------

    def item_rows(self, item_id: str, *, vectors: bool) -> list[Row]:
        """Every row of the item, object 0 first."""
        rows = self._query(f"item_id == {self._quote(item_id)}", vectors, MAX_OBJECTS)
        return sorted(rows, key=lambda r: r["object_index"])

    def rows_by_hash(self, content_hash: str, limit: int, *, vectors: bool) -> list[Row]:
        """Every row of up to `limit` items with the content hash, grouped by item."""
        firsts = self._query(
            f"content_hash == {self._quote(content_hash)} and object_index == 0", False, limit
        )
        item_ids = sorted({r["item_id"] for r in firsts})
        if not item_ids:
            return []
        ids = ", ".join(self._quote(i) for i in item_ids)
        rows = self._query(f"item_id in [{ids}]", vectors, MILVUS_MAX_TOPK)
        return sorted(rows, key=lambda r: (r["item_id"], r["object_index"]))

    def replace_item(self, item_id: str, rows: list[Row]) -> bool:
        """Write the item's rows, then drop its rows beyond them; True if it existed before.

        Upsert before delete, so a reader never finds the item missing.
        """
        s, client = self.settings, self._require()
        existed = bool(self._query(f"item_id == {self._quote(item_id)}", False, 1))
        with self._errors("upsert"):
            client.upsert(s.collection, rows, timeout=s.timeout_seconds)
            client.delete(
                s.collection,
                filter=f"item_id == {self._quote(item_id)} and object_index >= {len(rows)}",
                timeout=s.timeout_seconds,
            )
        return existed

    def delete_item(self, item_id: str) -> int:
        """Delete every row of the item; the number of rows it had."""
        s, client = self.settings, self._require()
        expression = f"item_id == {self._quote(item_id)}"
        with self._errors("delete"):
            rows = self._count(expression)
            if rows:
                client.delete(s.collection, filter=expression, timeout=s.timeout_seconds)
        return rows

    def search(
        self,
        vector: list[float],
        limit: int,
        expression: str,
        params: dict[str, Any],
        *,
        vectors: bool,
    ) -> list[Row]:
        """The nearest rows by inner product, best first, each with its `score`."""
        s, client = self.settings, self._require()
        with self._errors("search"):
            results = client.search(
                s.collection,
                data=[vector],
                anns_field=VECTOR,
                limit=limit,
                filter=expression,
                filter_params=params,
                output_fields=[*FIELDS, VECTOR] if vectors else FIELDS,
                search_params={"metric_type": "IP", "params": dict(s.search_params)},
                consistency_level="Strong",
                timeout=s.timeout_seconds,
            )
        return [{**hit["entity"], "score": hit["distance"]} for hit in results[0]]

    def count(self) -> int:
        with self._errors("count"):
            return self._count("")

    # -- helpers -----------------------------------------------------------------------------

    def _quote(self, text: str) -> str:
        return quote(text, lite=self.settings.is_lite)

    def _count(self, expression: str) -> int:
        s = self.settings
        result = self._require().query(
            s.collection,
            filter=expression,
            output_fields=["count(*)"],
            consistency_level="Strong",
            timeout=s.timeout_seconds,
        )
        return int(result[0]["count(*)"])

    def _query(self, expression: str, vectors: bool, limit: int) -> list[Row]:
        s, client = self.settings, self._require()
        with self._errors("query"):
            return list(
                client.query(
                    s.collection,
                    filter=expression,
                    output_fields=[*FIELDS, VECTOR] if vectors else FIELDS,
                    limit=limit,
                    consistency_level="Strong",
                    timeout=s.timeout_seconds,
                )
            )

    def _require(self) -> MilvusClient:
        if self._client is None:
            raise StoreUnavailable(
                f"Milvus at {self.settings.milvus_uri}: the collection is not loaded yet"
            )
        return self._client

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except MilvusException as error:
            raise StoreUnavailable(
                f"Milvus at {self.settings.milvus_uri}: {action} failed: {error.message}"
            ) from None
