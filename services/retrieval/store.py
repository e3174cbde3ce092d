"""Catalogues as Milvus collections, through pymilvus's synchronous MilvusClient.

The same code serves milvus-lite (a local .db file) and a Milvus server (an http(s) URI):
only the URI differs, plus the string-literal dialect of filters (see filters.py) and
stopping milvus-lite's process on close. Methods block: the service runs them in threads.

No call needs `flush` for a read to see an earlier write: milvus-lite 2.5.1 answers every
read with all writes before it (and keeps them without a flush, even when killed), and on a
server every read asks for Strong consistency.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException

from services.common.catalogs import CATALOG_PATTERN, DEFAULT_CATALOG
from services.common.config import ConfigError
from services.retrieval import codes
from services.retrieval.filters import quote
from services.retrieval.settings import MILVUS_MAX_TOPK, RetrievalSettings

log = logging.getLogger(__name__)

Row = dict[str, Any]

# The ANN field: binary sign codes or the float vector (settings.candidate_code).
CODE = "code"
# The full-precision vector as stored for ranking (after database-side augmentation), and the
# vector as embedded ("" when the two are the same), both as base64 text (codes.py).
VECTOR = "vector"
RAW = "raw"
# Every field but the vectors: what lookups and searches return.
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
# Separates the prefix from the catalogue name in a collection name.
SEPARATOR = "__"
# Rows read per page when the batch job walks a catalogue.
PAGE = 1000
# Rows written per call by the batch job. milvus-lite's upsert is a delete then an insert, so a
# search meanwhile can miss the rows of the call in progress: small calls keep that to a few
# items at a time.
WRITE_PAGE = 64


class StoreUnavailable(Exception):
    """Milvus failed or is not reachable; the message names the URI, never the token."""


class CatalogNotFound(LookupError):
    """A read named a catalogue that does not exist (writes create theirs)."""


class MilvusStore:
    """Every method takes a catalogue name (already validated) and blocks: the service runs
    them in threads. A catalogue's collection is created by the first write into it."""

    def __init__(self, settings: RetrievalSettings) -> None:
        self.settings = settings
        self._client: MilvusClient | None = None
        # Collections known to exist and be loaded, with their index types.
        self._loaded: dict[str, str] = {}
        self._lock = threading.Lock()

    @property
    def code_bytes(self) -> int:
        if self.settings.candidate_code == "binary":
            return codes.code_bits(self.settings.dim) // 8
        return 4 * self.settings.dim

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        """Connect, and make sure the default catalogue exists and is loaded."""
        s = self.settings
        if s.is_lite:
            Path(s.milvus_uri).parent.mkdir(parents=True, exist_ok=True)
        with self._errors("connect"):
            self._client = MilvusClient(
                uri=s.milvus_uri, token=s.milvus_token, db_name=s.db_name, timeout=s.timeout_seconds
            )
        self.collection(DEFAULT_CATALOG, create=True)
        log.info(
            "connected",
            extra={"uri": s.milvus_uri, "catalogs": self.catalogs(), "code": s.candidate_code},
        )

    def close(self) -> None:
        client, self._client = self._client, None
        self._loaded.clear()
        if client is None:
            return
        client.close()
        if self.settings.is_lite:
            # Stop milvus-lite's process now rather than at interpreter exit, so that a new
            # store on the same file (a restart) opens it afresh.
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(self.settings.milvus_uri)

    # -- catalogues --------------------------------------------------------------------------

    def collection_name(self, catalog: str) -> str:
        return f"{self.settings.collection_prefix}{SEPARATOR}{catalog}"

    def collection(self, catalog: str, *, create: bool) -> str:
        """The catalogue's collection, loaded; created first when `create`."""
        name = self.collection_name(catalog)
        if name in self._loaded:
            return name
        s, client = self.settings, self._require()
        with self._lock, self._errors("open catalogue"):
            if name in self._loaded:
                return name
            if client.has_collection(name, timeout=s.timeout_seconds):
                self._check_schema(name)
            elif create:
                self._create(name)
            else:
                raise CatalogNotFound(f"catalog {catalog!r} does not exist")
            # Also when a start-up died between creating the collection and its indexes.
            if CODE not in client.list_indexes(name, timeout=s.timeout_seconds):
                self._create_indexes(name)
            client.load_collection(name, timeout=s.timeout_seconds)
            index = client.describe_index(name, CODE, timeout=s.timeout_seconds) or {}
            index_type = str(index.get("index_type", s.index_type))
            if index_type != s.index_type:
                log.warning(
                    "catalogue has another index type than configured; re-create it to change",
                    extra={"collection": name, "index_type": index_type},
                )
            self._loaded[name] = index_type
        return name

    def catalogs(self) -> list[str]:
        prefix = self.collection_name("")
        with self._errors("list catalogues"):
            names = self._require().list_collections(timeout=self.settings.timeout_seconds)
        return sorted(
            n[len(prefix) :]
            for n in names
            if n.startswith(prefix) and CATALOG_PATTERN.fullmatch(n[len(prefix) :])
        )

    def drop(self, catalog: str) -> bool:
        s, name = self.settings, self.collection_name(catalog)
        with self._lock, self._errors("drop catalogue"):
            self._loaded.pop(name, None)
            client = self._require()
            if not client.has_collection(name, timeout=s.timeout_seconds):
                return False
            client.drop_collection(name, timeout=s.timeout_seconds)
        log.info("catalogue dropped", extra={"collection": name})
        return True

    def index_type(self, catalog: str) -> str:
        return self._loaded.get(self.collection(catalog, create=False), self.settings.index_type)

    def _create(self, name: str) -> None:
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
        if s.candidate_code == "binary":
            schema.add_field(CODE, DataType.BINARY_VECTOR, dim=codes.code_bits(s.dim))
        else:
            schema.add_field(CODE, DataType.FLOAT_VECTOR, dim=s.dim)
        schema.add_field(VECTOR, DataType.VARCHAR, max_length=codes.encoded_length(s.dim))
        schema.add_field(RAW, DataType.VARCHAR, max_length=codes.encoded_length(s.dim))
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("content_hash", DataType.VARCHAR, max_length=64)
        schema.add_field("model_version", DataType.VARCHAR, max_length=64)
        schema.add_field("image_width", DataType.INT32)
        schema.add_field("image_height", DataType.INT32)
        # Strong: a search or lookup right after a write sees it (milvus-lite always does; a
        # server's default, Bounded, may not).
        client.create_collection(
            name, schema=schema, consistency_level="Strong", timeout=s.timeout_seconds
        )
        log.info("catalogue created", extra={"collection": name, "dim": s.dim})

    def _metric(self) -> str:
        return "HAMMING" if self.settings.candidate_code == "binary" else "IP"

    def _create_indexes(self, name: str) -> None:
        s, client = self.settings, self._require()
        # Every index before the first load: a Milvus 2.3 server refuses to load a collection
        # whose indexes changed while it was loaded.
        index = client.prepare_index_params()
        index.add_index(
            CODE, index_type=s.index_type, metric_type=self._metric(), params=s.index_params
        )
        client.create_index(name, index, timeout=s.timeout_seconds)
        for field in SCALAR_INDEXED:
            scalar = client.prepare_index_params()
            # No index type: each Milvus picks its default for VARCHAR (Trie in milvus-lite).
            scalar.add_index(field)
            try:
                client.create_index(name, scalar, timeout=s.timeout_seconds)
            except MilvusException as error:
                log.info("no scalar index", extra={"field": field, "reason": error.message})

    def _check_schema(self, name: str) -> None:
        s = self.settings
        description = self._require().describe_collection(name, timeout=s.timeout_seconds)
        fields = {f.get("name"): f for f in description.get("fields", [])}
        want_type = (
            DataType.BINARY_VECTOR if s.candidate_code == "binary" else DataType.FLOAT_VECTOR
        )
        want_dim = codes.code_bits(s.dim) if s.candidate_code == "binary" else s.dim
        code = fields.get(CODE)
        found = (
            (code.get("type"), int(code.get("params", {}).get("dim", 0)))
            if code and VECTOR in fields and RAW in fields
            else None
        )
        if found != (want_type, want_dim):
            raise ConfigError(
                f"collection {name!r} at {s.milvus_uri} was not made by this configuration "
                f"(LOUPE_EMBEDDING_DIM={s.dim}, LOUPE_RETRIEVAL_CANDIDATE_CODE="
                f"{s.candidate_code}; or by an older Loupe): index into a new catalogue, or "
                "fix the settings"
            )

    # -- reads and writes --------------------------------------------------------------------

    def codes_of(self, vectors: np.ndarray) -> list[bytes] | list[list[float]]:
        """What the ANN field holds for each row of `vectors` [n, dim]."""
        if self.settings.candidate_code == "binary":
            return codes.binary_codes(vectors)
        result: list[list[float]] = np.asarray(vectors, np.float32).tolist()
        return result

    def item_rows(self, catalog: str, item_id: str, *, vectors: bool) -> list[Row]:
        """Every row of the item, object 0 first ([] when the catalogue does not exist)."""
        try:
            name = self.collection(catalog, create=False)
        except CatalogNotFound:
            return []
        rows = self._query(name, f"item_id == {self._quote(item_id)}", vectors, MAX_OBJECTS)
        return sorted(rows, key=lambda r: r["object_index"])

    def rows_by_hash(
        self, catalog: str, content_hash: str, limit: int, *, vectors: bool
    ) -> list[Row]:
        """Every row of up to `limit` items with the content hash, grouped by item."""
        try:
            name = self.collection(catalog, create=False)
        except CatalogNotFound:
            return []
        firsts = self._query(
            name, f"content_hash == {self._quote(content_hash)} and object_index == 0", False, limit
        )
        item_ids = sorted({r["item_id"] for r in firsts})
        if not item_ids:
            return []
        ids = ", ".join(self._quote(i) for i in item_ids)
        rows = self._query(name, f"item_id in [{ids}]", vectors, MILVUS_MAX_TOPK)
        return sorted(rows, key=lambda r: (r["item_id"], r["object_index"]))

    def replace_item(self, catalog: str, item_id: str, rows: list[Row]) -> bool:
        """Write the item's rows, then drop its rows beyond them; True if it existed before.

        Upsert before delete, so a reader never finds the item missing.
        """
        s, client = self.settings, self._require()
        name = self.collection(catalog, create=True)
        existed = bool(self._query(name, f"item_id == {self._quote(item_id)}", False, 1))
        with self._errors("upsert"):
            client.upsert(name, rows, timeout=s.timeout_seconds)
            client.delete(
                name,
                filter=f"item_id == {self._quote(item_id)} and object_index >= {len(rows)}",
                timeout=s.timeout_seconds,
            )
        return existed

    def delete_item(self, catalog: str, item_id: str) -> int:
        """Delete every row of the item; the number of rows it had."""
        s, client = self.settings, self._require()
        try:
            name = self.collection(catalog, create=False)
        except CatalogNotFound:
            return 0
        expression = f"item_id == {self._quote(item_id)}"
        with self._errors("delete"):
            rows = self._count(name, expression)
            if rows:
                client.delete(name, filter=expression, timeout=s.timeout_seconds)
        return rows

    def search(
        self,
        catalog: str,
        vector: np.ndarray,
        limit: int,
        expression: str,
        params: dict[str, Any],
        *,
        vectors: bool,
        raw: bool = False,
        distinct_items: bool = False,
    ) -> list[Row]:
        """The nearest rows, best first, each with its `score` (a cosine estimate).

        With `distinct_items`, `limit` counts items: each item's best row only. Milvus has no
        grouping that milvus-lite and a 2.3 server share, so the search widens until enough
        items are found or the catalogue runs out.
        """
        name = self.collection(catalog, create=False)
        code = self.codes_of(vector[None, :])[0]
        fetch = limit
        while True:
            rows = self._search(
                name, code, min(fetch, MILVUS_MAX_TOPK), expression, params, vectors, raw
            )
            if not distinct_items:
                return rows
            best: dict[str, Row] = {}
            for row in rows:
                best.setdefault(row["item_id"], row)
            exhausted = len(rows) < min(fetch, MILVUS_MAX_TOPK) or fetch >= MILVUS_MAX_TOPK
            if len(best) >= limit or exhausted:
                return list(best.values())[:limit]
            fetch *= 2

    def _search(
        self,
        name: str,
        code: bytes | list[float],
        limit: int,
        expression: str,
        params: dict[str, Any],
        vectors: bool,
        raw: bool,
    ) -> list[Row]:
        s, client = self.settings, self._require()
        extra = [VECTOR, RAW] if vectors and raw else [VECTOR] if vectors else []
        with self._errors("search"):
            results = client.search(
                name,
                data=[code],
                anns_field=CODE,
                limit=limit,
                filter=expression,
                filter_params=params,
                output_fields=[*FIELDS, *extra],
                search_params={"metric_type": self._metric(), "params": dict(s.search_params)},
                consistency_level="Strong",
                timeout=s.timeout_seconds,
            )
        bits = codes.code_bits(s.dim)
        rows = []
        for hit in results[0]:
            row = {**hit["entity"]}
            if s.candidate_code == "binary":
                row["score"] = codes.hamming_to_cosine(float(hit["distance"]), bits)
            else:
                row["score"] = float(hit["distance"])
            if raw and vectors and row.get(RAW):
                row[VECTOR] = row[RAW]
            row.pop(RAW, None)
            rows.append(row)
        return rows

    def whole_image_rows(self, catalog: str) -> list[Row]:
        """Every whole-image row of the catalogue, with its vectors (the batch job's input)."""
        s, client = self.settings, self._require()
        name = self.collection(catalog, create=False)
        rows: list[Row] = []
        with self._errors("read catalogue"):
            iterator = client.query_iterator(
                name,
                batch_size=PAGE,
                filter="object_index == 0",
                output_fields=["pk", *FIELDS, CODE, VECTOR, RAW],
                timeout=s.timeout_seconds,
            )
            try:
                while page := iterator.next():
                    rows.extend(page)
            finally:
                iterator.close()
        return rows

    def write_rows(self, catalog: str, rows: list[Row]) -> None:
        s, client = self.settings, self._require()
        name = self.collection(catalog, create=False)
        with self._errors("upsert"):
            for start in range(0, len(rows), WRITE_PAGE):
                client.upsert(name, rows[start : start + WRITE_PAGE], timeout=s.timeout_seconds)

    def count(self, catalog: str, expression: str = "") -> int:
        name = self.collection(catalog, create=False)
        with self._errors("count"):
            return self._count(name, expression)

    # -- helpers -----------------------------------------------------------------------------

    def _quote(self, text: str) -> str:
        return quote(text, lite=self.settings.is_lite)

    def _count(self, name: str, expression: str) -> int:
        s = self.settings
        result = self._require().query(
            name,
            filter=expression,
            output_fields=["count(*)"],
            consistency_level="Strong",
            timeout=s.timeout_seconds,
        )
        return int(result[0]["count(*)"])

    def _query(self, name: str, expression: str, vectors: bool, limit: int) -> list[Row]:
        s, client = self.settings, self._require()
        with self._errors("query"):
            return list(
                client.query(
                    name,
                    filter=expression,
                    output_fields=[*FIELDS, VECTOR] if vectors else FIELDS,
                    limit=limit,
                    consistency_level="Strong",
                    timeout=s.timeout_seconds,
                )
            )

    def _require(self) -> MilvusClient:
        if self._client is None:
            raise StoreUnavailable(f"Milvus at {self.settings.milvus_uri}: not connected yet")
        return self._client

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except MilvusException as error:
            raise StoreUnavailable(
                f"Milvus at {self.settings.milvus_uri}: {action} failed: {error.message}"
            ) from None
