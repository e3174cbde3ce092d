"""Catalogues as Milvus collections, through pymilvus's synchronous MilvusClient.

The same code serves milvus-lite (a local .db file) and a Milvus server (an http(s) URI):
only the URI differs, plus where full vectors live (vector_store.py), the string-literal
dialect of filters (filters.py) and stopping milvus-lite's process on close. Methods block:
the service runs them in threads. Every method works on batches, so that many items cost one
call each to Milvus, not one each.

Consistency on a server: searches and lookups read at LOUPE_MILVUS_READ_CONSISTENCY (Bounded:
they need not wait for every write in flight, which costs ~200 ms a read under Strong); a
write's own check of what exists reads Strong, so that an item is never duplicated.
milvus-lite always answers with every write before the read.
"""

from __future__ import annotations

import logging
import math
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from pymilvus import Collection, DataType, MilvusClient, MilvusException, connections

from services.common import vectors as packed
from services.common.catalogs import CATALOG_PATTERN, DEFAULT_CATALOG
from services.common.items import MAX_ITEM_ID_CHARS, MAX_SOURCE_URI_BYTES
from services.retrieval import codes, index_params
from services.retrieval.filters import quote
from services.retrieval.layout import ROW_FIELDS, SIDECAR, CatalogLayout, legacy_layout
from services.retrieval.settings import EXACT_INDEXES, MILVUS_MAX_TOPK, RetrievalSettings
from services.retrieval.vector_store import (
    RAW,
    SIDECAR_FIELDS,
    VECTOR,
    FieldVectors,
    SidecarVectors,
    VectorStore,
    sidecar_path,
)

log = logging.getLogger(__name__)

Row = dict[str, Any]

# The ANN field: binary sign codes or the float vector (the catalogue's layout).
CODE = "code"
# Every scalar field: what lookups and searches return.
FIELDS = [f for f in SIDECAR_FIELDS if f != "source_uri"]
SOURCE_URI = "source_uri"
# Upsert validation keeps items below this, so one query returns every row of an item.
MAX_OBJECTS = 1000
# Indexed when the Milvus at hand can: lookups and deletes filter on them.
SCALAR_INDEXED = ("item_id", "content_hash")
# Separates the prefix from the catalogue name in a collection name.
SEPARATOR = "__"
# The catalogue records' collection: PREFIX___catalogs, which no catalogue name can give
# (they start with a letter or digit).
RECORDS = "_catalogs"
RECORD_BYTES = 8192
# Rows per Milvus upsert call, and pks per `pk in [...]` expression; up to FEW_ROWS rows go
# row by row (MilvusStore._send).
WRITE_ROWS = 1000
FEW_ROWS = 8
KEYS_PER_QUERY = 2000
# Items returned per content hash when looking for exact duplicates.
SAME_HASH_LIMIT = 10
# LOUPE_RETRIEVAL_OVERSAMPLING applies at this many items; see MilvusStore.oversampling.
OVERSAMPLING_ITEMS = 1_000_000
MIN_OVERSAMPLING = 4
# How long a catalogue's item count (which sizes the oversampling) is reused.
ITEM_COUNT_SECONDS = 30.0


# How often a probe of Milvus (MilvusStore.probe) looks at milvus-lite's process meanwhile.
PROBE_SLICE_SECONDS = 0.1

# Everything pymilvus raises when Milvus fails.
MILVUS_ERRORS = (MilvusException, grpc.RpcError)


class StoreUnavailable(Exception):
    """Milvus failed or is not reachable; the message names the URI, never the token."""


class CatalogNotFound(LookupError):
    """A read named a catalogue that does not exist (writes create theirs)."""


class WrongDimension(ValueError):
    """A vector's dimension differs from the catalogue's."""


@dataclass(frozen=True)
class Hit:
    """A row the compact index found."""

    pk: str
    item_id: str
    score: float


@dataclass(frozen=True)
class OpenCatalog:
    """A catalogue's collection, loaded, with how it is laid out and searched."""

    name: str
    layout: CatalogLayout
    index_type: str
    search_params: dict[str, Any]
    # For writes: pymilvus's column-based insert converts a batch field by field, where
    # MilvusClient's row-based one converts value by value (0.1 against 0.3-0.7 ms a row).
    columns: Collection
    # Where its full vectors (and, in the sidecar, a copy of its fields) are.
    vectors: VectorStore

    @property
    def sidecar(self) -> SidecarVectors | None:
        return self.vectors if isinstance(self.vectors, SidecarVectors) else None

    @property
    def exact(self) -> bool:
        """Whether the index's scores are exact cosines (no re-scoring needed)."""
        return not self.layout.binary and self.index_type in EXACT_INDEXES


def item_of(pk: str, layout: CatalogLayout) -> str:
    """The item id in a row's primary key (row_key's inverse; catalogues made before it
    hold ids as they are)."""
    item_id = pk.rpartition("#")[0]
    if not layout.source_uri:  # made before layout 2
        return item_id
    return item_id.replace("%27", "'").replace("%25", "%")


def row_key(item_id: str, object_index: int) -> str:
    """A row's primary key: `item_id#object_index`, with ' and % written as %27 and %25.

    milvus-lite deletes rows (and upserts, which delete first) through an SQL statement that
    does not escape quotes in primary keys, so a key with a ' could be written once and never
    replaced or deleted. Ids without ' or % keep the keys they always had.
    """
    return f"{item_id.replace('%', '%25').replace(chr(39), '%27')}#{object_index}"


class MilvusStore:
    """Every method takes a catalogue name (already validated) and blocks: the service runs
    them in threads. A catalogue's collection is created by the first write into it."""

    def __init__(self, settings: RetrievalSettings) -> None:
        self.settings = settings
        self._client: MilvusClient | None = None
        # The same Milvus through pymilvus's ORM connection, for column-based writes.
        self._alias = f"loupe-retrieval-{id(self)}"
        self._open: dict[str, OpenCatalog] = {}
        self._lock = threading.Lock()
        # Items per catalogue, and when they were counted (oversampling).
        self._item_counts: dict[str, tuple[int, float]] = {}
        self._sidecar: SidecarVectors | None = None
        self._stores: dict[str, VectorStore] = {}
        # Why Milvus cannot serve now (set by the watch, watch.py), '' while it can: calls
        # then fail at once, naming Milvus, instead of each waiting out pymilvus's retries.
        self._down = ""
        # Counts reconnections: a call that began on an older connection and fails in some
        # way of its own (its channel closed under it) is Milvus's failure all the same.
        self._generation = 0
        self._restart_lock = threading.Lock()
        self._prober = ThreadPoolExecutor(1, thread_name_prefix="milvus-probe")
        self._probing: Future[Any] | None = None
        self._records_loaded: set[str] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        """Connect, and make sure the default catalogue exists and is loaded."""
        s = self.settings
        if s.is_lite and self._sidecar is None:
            Path(s.milvus_uri).parent.mkdir(parents=True, exist_ok=True)
            self._stores[SIDECAR] = self._sidecar = SidecarVectors(sidecar_path(s.milvus_uri))
        self._connect()
        self.collection(DEFAULT_CATALOG, create=s.writes)
        log.info(
            "connected",
            extra={"uri": s.milvus_uri, "catalogs": self.catalogs(), "code": s.candidate_code},
        )

    def _connect(self) -> None:
        s = self.settings
        with self._errors("connect"):
            client = MilvusClient(
                uri=s.milvus_uri, token=s.milvus_token, db_name=s.db_name, timeout=s.timeout_seconds
            )
            connections.connect(
                alias=self._alias,
                uri=s.milvus_uri,
                token=s.milvus_token,
                db_name=s.db_name,
                timeout=s.timeout_seconds,
            )
        self._client = client

    def _disconnect(self) -> None:
        client, self._client = self._client, None
        self._open.clear()
        self._records_loaded.clear()
        if client is None:
            return
        # Closing may fail on a connection whose server died; nothing is left to save.
        try:
            connections.remove_connection(self._alias)
            client.close()
        except Exception as error:
            log.info("closing the Milvus connection failed", extra={"error": repr(error)})
        if self.settings.is_lite:
            # Stop milvus-lite's process now rather than at interpreter exit, so that a new
            # store on the same file (a restart) opens it afresh.
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(self.settings.milvus_uri)

    def close(self) -> None:
        self._prober.shutdown(wait=False)
        self._disconnect()
        for store in self._stores.values():
            store.close()

    # -- health ------------------------------------------------------------------------------

    def lite_process(self) -> subprocess.Popen[bytes] | None:
        """milvus-lite's server process for this store's file: pymilvus starts it on connect,
        and milvus_lite's server manager keeps it (private fields of milvus-lite 2.5, whose
        version pyproject.toml pins)."""
        if not self.settings.is_lite:
            return None
        from milvus_lite.server_manager import server_manager_instance

        path = str(Path(self.settings.milvus_uri).absolute().resolve())
        server = server_manager_instance._servers.get(path)
        process = getattr(server, "_p", None)
        return process if isinstance(process, subprocess.Popen) else None

    def process_problem(self) -> str:
        """Why milvus-lite's process cannot answer ('' if it runs, or Milvus is a server)."""
        if not self.settings.is_lite or self._client is None:
            return ""
        process = self.lite_process()
        if process is None:
            return "milvus-lite's process is not running"
        code = process.poll()
        if code is not None:
            how = f"signal {-code}" if code < 0 else f"status {code}"
            return f"milvus-lite's process (pid {process.pid}) exited with {how}"
        if _process_state(process.pid) in ("T", "t"):
            return f"milvus-lite's process (pid {process.pid}) is stopped"
        return ""

    def probe(self, timeout_seconds: int) -> str:
        """'' if Milvus answers a cheap call within the timeout; else why not. Not gated by
        the down flag: this is how the watch finds out that Milvus is back.

        The call runs in a thread of its own while the process is looked at every
        PROBE_SLICE_SECONDS: a milvus-lite killed during the call is reported at once, not
        after pymilvus has retried its dead socket for the whole timeout."""
        problem = self.process_problem()
        if problem:
            return problem
        client = self._client
        if client is None:
            return "not connected"
        if self._probing is None or self._probing.done():
            # A call still stuck from an earlier probe is waited on, not joined by another.
            self._probing = self._prober.submit(client.list_collections, timeout=timeout_seconds)
        probing = self._probing
        deadline = time.monotonic() + timeout_seconds
        while True:
            try:
                probing.result(timeout=PROBE_SLICE_SECONDS)
                return ""
            except FutureTimeout:
                problem = self.process_problem()
                if problem:
                    return problem
                if time.monotonic() > deadline:
                    return f"no answer within {timeout_seconds}s"
            except Exception as error:
                message = error.message if isinstance(error, MilvusException) else repr(error)
                problem = self.process_problem()
                return problem or f"no answer within {timeout_seconds}s ({message[:200]})"

    @property
    def down(self) -> str:
        return self._down

    def mark_down(self, reason: str) -> None:
        self._down = reason or "not answering"

    def mark_up(self) -> None:
        self._down = ""

    def restart_lite(self) -> None:
        """Kill milvus-lite's process (dead, stopped or hung), start a new one on the same
        file, and load the catalogues that were open. Every row it acknowledged is in its
        file: milvus-lite commits a write before answering it (a kill -9 after 200 upserts
        left all 200)."""
        with self._restart_lock:
            catalogs = [name[len(self.collection_name("")) :] for name in list(self._open)] or [
                DEFAULT_CATALOG
            ]
            process = self.lite_process()
            if process is not None and process.poll() is None:
                # Now, rather than after the server manager's 2 s wait for it to stop.
                process.kill()
            self._generation += 1
            self._disconnect()
            self._connect()
            self._down = ""
            try:
                for catalog in dict.fromkeys([DEFAULT_CATALOG, *catalogs]):
                    try:
                        self.collection(catalog, create=self.settings.writes)
                    except CatalogNotFound:
                        continue
            except BaseException:
                self._down = "milvus-lite restarted, but loading its catalogues failed"
                raise
            log.warning(
                "milvus-lite restarted",
                extra={"pid": getattr(self.lite_process(), "pid", None), "catalogs": catalogs},
            )

    # -- catalogues --------------------------------------------------------------------------

    def collection_name(self, catalog: str) -> str:
        return f"{self.settings.collection_prefix}{SEPARATOR}{catalog}"

    def opened(self, catalog: str) -> OpenCatalog | None:
        """The catalogue if this store has opened it already (no call to Milvus)."""
        return self._open.get(self.collection_name(catalog))

    def collection(self, catalog: str, *, create: bool, dim: int = 0) -> OpenCatalog:
        """The catalogue's collection, loaded; created first when `create` (for vectors of
        `dim` values; 0 = LOUPE_EMBEDDING_DIM)."""
        name = self.collection_name(catalog)
        opened = self._open.get(name)
        if opened is not None:
            return opened
        s, client = self.settings, self._require()
        with self._lock, self._errors("open catalogue"):
            if name in self._open:
                return self._open[name]
            if client.has_collection(name, timeout=s.timeout_seconds):
                layout = self._layout_of(name)
            elif create:
                layout = self._create(name, dim)
            else:
                raise CatalogNotFound(f"catalog {catalog!r} does not exist")
            # Also when a start-up died between creating the collection and its indexes.
            if CODE not in client.list_indexes(name, timeout=s.timeout_seconds):
                self._create_indexes(name, layout)
            started = time.monotonic()
            client.load_collection(name, timeout=s.load_timeout_seconds)
            log.info(
                "catalogue loaded",
                extra={"collection": name, "seconds": round(time.monotonic() - started, 1)},
            )
            index = client.describe_index(name, CODE, timeout=s.timeout_seconds) or {}
            index_type = str(index.get("index_type", s.index_type))
            # The configured search parameters apply to indexes of the configured type; a
            # catalogue indexed otherwise searches with its type's defaults.
            configured = s.search_params if index_type == s.index_type else {}
            vectors = self._stores.get(layout.vectors) or FieldVectors(
                self._fetch_rows, self._fields(layout)[1:]
            )
            vectors.prepare(name)
            opened = OpenCatalog(
                name,
                layout,
                index_type,
                index_params.search_params(index_type, configured),
                Collection(name, using=self._alias),
                vectors,
            )
            self._open[name] = opened
        return opened

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
            opened = self._open.pop(name, None)
            client = self._require()
            if not client.has_collection(name, timeout=s.timeout_seconds):
                return False
            layout = opened.layout if opened else self._layout_of(name)
            if layout.vectors == SIDECAR and self._sidecar is not None:
                self._sidecar.drop(name)
            client.drop_collection(name, timeout=s.timeout_seconds)
        log.info("catalogue dropped", extra={"collection": name})
        return True

    def _new_layout(self, dim: int = 0) -> CatalogLayout:
        s = self.settings
        return CatalogLayout(
            code=codes.SIMHASH_V2 if s.candidate_code == "binary" else codes.FLOAT,
            dim=dim or s.dim,
            vectors=SIDECAR if s.is_lite else ROW_FIELDS,
            # milvus-lite keeps every field in memory: only what searches read goes there.
            slim=s.is_lite,
        )

    def _create(self, name: str, dim: int = 0) -> CatalogLayout:
        s, client = self.settings, self._require()
        layout = self._new_layout(dim)
        schema = MilvusClient.create_schema(
            auto_id=False, enable_dynamic_field=False, description=layout.description()
        )
        # A server counts max_length in UTF-8 bytes: room for 512 characters of any script.
        schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=2100)
        schema.add_field("item_id", DataType.VARCHAR, max_length=4 * MAX_ITEM_ID_CHARS)
        schema.add_field("object_index", DataType.INT32)
        if layout.binary:
            schema.add_field(CODE, DataType.BINARY_VECTOR, dim=codes.code_bits(layout.dim))
        else:
            schema.add_field(CODE, DataType.FLOAT_VECTOR, dim=layout.dim)
        schema.add_field("metadata", DataType.JSON)
        if not layout.slim:
            schema.add_field("label", DataType.VARCHAR, max_length=64)
            schema.add_field("detection_score", DataType.FLOAT)
            # Not nullable (milvus-lite refuses nullable fields): {} when there is no box,
            # and an object, not an array, because the Milvus 2.3 server only stores JSON
            # objects.
            schema.add_field("box", DataType.JSON)
            schema.add_field("content_hash", DataType.VARCHAR, max_length=64)
            schema.add_field("model_version", DataType.VARCHAR, max_length=64)
            schema.add_field("image_width", DataType.INT32)
            schema.add_field("image_height", DataType.INT32)
            schema.add_field(SOURCE_URI, DataType.VARCHAR, max_length=MAX_SOURCE_URI_BYTES)
        if layout.vectors == ROW_FIELDS:
            length = FieldVectors.field_length(layout)
            schema.add_field(VECTOR, DataType.VARCHAR, max_length=length)
            schema.add_field(RAW, DataType.VARCHAR, max_length=length)
        # The collection's own default matters only to reads that name none (this module
        # names one for every read).
        client.create_collection(
            name, schema=schema, consistency_level="Bounded", timeout=s.timeout_seconds
        )
        log.info("catalogue created", extra={"collection": name, "layout": layout.description()})
        return layout

    def _create_indexes(self, name: str, layout: CatalogLayout) -> None:
        s, client = self.settings, self._require()
        # A catalogue created by another configuration keeps its own index type.
        index_type = (
            s.index_type
            if layout.binary == (s.candidate_code == "binary")
            else ("BIN_FLAT" if layout.binary else "FLAT")
        )
        build = s.index_params if index_type == s.index_type else {}
        # Every index before the first load: a Milvus 2.3 server refuses to load a collection
        # whose indexes changed while it was loaded.
        index = client.prepare_index_params()
        index.add_index(CODE, index_type=index_type, metric_type=layout.metric, params=build)
        client.create_index(name, index, timeout=s.timeout_seconds)
        # A slim catalogue's lookups go to the sidecar: no scalar index to hold in memory.
        for field in () if layout.slim else SCALAR_INDEXED:
            scalar = client.prepare_index_params()
            # No index type: each Milvus picks its default for VARCHAR (Trie in milvus-lite).
            scalar.add_index(field)
            try:
                client.create_index(name, scalar, timeout=s.timeout_seconds)
            except MilvusException as error:
                log.info("no scalar index", extra={"field": field, "reason": error.message})

    def _layout_of(self, name: str) -> CatalogLayout:
        description = self._require().describe_collection(
            name, timeout=self.settings.timeout_seconds
        )
        recorded = CatalogLayout.from_description(str(description.get("description", "")))
        if recorded is not None:
            return recorded
        fields = {f.get("name"): f for f in description.get("fields", [])}
        code = fields.get(CODE)
        if code is None or VECTOR not in fields:
            raise StoreUnavailable(
                f"collection {name!r} at {self.settings.milvus_uri} was not made by Loupe "
                "(no code and vector fields); drop it or choose another "
                "LOUPE_MILVUS_COLLECTION_PREFIX"
            )
        binary = code.get("type") == DataType.BINARY_VECTOR
        dim = int(code.get("params", {}).get("dim", 0))
        if binary and codes.code_bits(self.settings.dim) == dim:
            dim = self.settings.dim  # codes round the dimension up to whole bytes
        return legacy_layout(binary, dim)

    # -- reads -------------------------------------------------------------------------------

    def item_rows(
        self, catalog: str, item_id: str, *, vectors: bool, raw: bool = False
    ) -> list[Row]:
        """Every row of the item, object 0 first ([] when the catalogue does not exist); with
        `vectors`, each row's stored (or `raw`: as embedded) vector as row["vector"]."""
        try:
            opened = self.collection(catalog, create=False)
        except CatalogNotFound:
            return []
        if opened.sidecar is not None:
            rows = opened.sidecar.item_rows(opened.name, [item_id])
        else:
            expression = f"item_id == {self._quote(item_id)}"
            rows = self._query(opened, expression, self._fields(opened.layout))
        rows.sort(key=lambda r: r["object_index"])
        if vectors:
            rows = self._with_vectors(opened, rows, raw=raw)
        return rows

    def items_rows(self, catalog: str, item_ids: Sequence[str], *, vectors: bool) -> list[Row]:
        """Every row of these items, grouped by item, object 0 first (one query)."""
        try:
            opened = self.collection(catalog, create=False)
        except CatalogNotFound:
            return []
        if opened.sidecar is not None:
            rows = opened.sidecar.item_rows(opened.name, item_ids)
        else:
            listed = ", ".join(self._quote(i) for i in dict.fromkeys(item_ids))
            rows = self._query(opened, f"item_id in [{listed}]", self._fields(opened.layout))
        rows.sort(key=lambda r: (r["item_id"], r["object_index"]))
        return self._with_vectors(opened, rows, raw=False) if vectors else rows

    def rows_by_hash(
        self, catalog: str, content_hash: str, limit: int, *, vectors: bool
    ) -> list[Row]:
        """Every row of up to `limit` items with the content hash, grouped by item."""
        try:
            opened = self.collection(catalog, create=False)
        except CatalogNotFound:
            return []
        if opened.sidecar is not None:
            firsts = opened.sidecar.hash_rows(opened.name, [content_hash])
        else:
            firsts = self._query(
                opened,
                f"content_hash == {self._quote(content_hash)} and object_index == 0",
                ["item_id"],
                limit=limit,
            )
        item_ids = sorted({r["item_id"] for r in firsts})[:limit]
        if not item_ids:
            return []
        return self.items_rows(catalog, item_ids, vectors=vectors)

    def search(
        self,
        catalog: str,
        query: np.ndarray,
        limit: int,
        expression: str,
        *,
        distinct_items: bool = False,
        raw: bool = False,
    ) -> tuple[list[Row], np.ndarray]:
        """The `limit` nearest rows, best first, each with its `score` (cosine), and their
        stored vectors [limit, dim] (`raw`: as embedded, before DBA; they then also re-score
        the rows the compact index proposes).

        The compact index proposes `oversampling` x limit rows; their full vectors re-score
        them (binary codes estimate the angle, and the nearest by Hamming distance are not
        quite the nearest). With `distinct_items`, `limit` counts items: each item's best
        row only; the search widens until enough items are found or the catalogue runs out.
        """
        opened = self.collection(catalog, create=False)
        self._check_dim(opened, query.shape[-1])
        unit_query = query / max(float(np.linalg.norm(query)), 1e-12)
        fetch = min(limit * self.oversampling(catalog), MILVUS_MAX_TOPK)
        while True:
            hits = self._search_codes(opened, unit_query[None, :], fetch, expression)[0]
            pks = [hit.pk for hit in hits]
            items = {hit.pk: hit.item_id for hit in hits}
            if opened.exact:
                scores = np.array([hit.score for hit in hits], dtype=np.float64)
                matrix = None
            else:
                pks, matrix = opened.vectors.get(opened.name, opened.layout, pks, raw=raw)
                scores = packed.unit_rows(matrix) @ unit_query if len(pks) else np.empty(0)
            order = np.argsort(-scores, kind="stable")
            chosen: list[int] = []
            seen: set[str] = set()
            for position in order.tolist():
                if distinct_items:
                    item = items[pks[position]]
                    if item in seen:
                        continue
                    seen.add(item)
                chosen.append(position)
                if len(chosen) == limit:
                    break
            exhausted = len(hits) < fetch or fetch >= MILVUS_MAX_TOPK
            if len(chosen) >= limit or exhausted or not distinct_items:
                break
            fetch = min(2 * fetch, MILVUS_MAX_TOPK)
        winners = [pks[i] for i in chosen]
        rows = opened.vectors.rows(opened.name, winners)
        found = [i for i in chosen if pks[i] in rows]
        result = []
        for i in found:
            row = rows[pks[i]]
            row["score"] = float(scores[i])
            result.append(row)
        if matrix is None:
            found_pks, vectors = opened.vectors.get(
                opened.name, opened.layout, [r["pk"] for r in result], raw=raw
            )
            keep = set(found_pks)
            result = [r for r in result if r["pk"] in keep]
        else:
            vectors = matrix[found]
        return result, vectors.astype(np.float32)

    def oversampling(self, catalog: str) -> int:
        """Candidates the compact index proposes per candidate returned.

        Sign codes shortlist well but not perfectly, and the more items a catalogue holds,
        the more close rivals each true neighbour has: to keep recall@10 at 0.98 the
        shortlist grows about as the square root of the catalogue (docs/scale.md measured
        100 k and 1 M). LOUPE_RETRIEVAL_OVERSAMPLING is the factor at 1 M items; it is at
        least 4 (a few hundred rows re-score in about a millisecond), and 1 for an exact
        index.
        """
        opened = self.collection(catalog, create=False)
        if opened.exact:
            return 1
        now = time.monotonic()
        counted = self._item_counts.get(catalog)
        if counted is None or now - counted[1] > ITEM_COUNT_SECONDS:
            counted = (self.count(catalog, "object_index == 0"), now)
            self._item_counts[catalog] = counted
        scale = math.sqrt(counted[0] / OVERSAMPLING_ITEMS)
        return max(MIN_OVERSAMPLING, math.ceil(self.settings.oversampling * scale))

    def neighbours(
        self, catalog: str, queries: np.ndarray, limit: int, exclude_item_ids: Sequence[str]
    ) -> list[list[Hit]] | None:
        """Per query, up to `limit` whole-image rows nearest by the compact index, leaving
        out `exclude_item_ids`; None when the catalogue does not exist yet."""
        try:
            opened = self.collection(catalog, create=False)
        except CatalogNotFound:
            return None
        expression = "object_index == 0"
        if exclude_item_ids:
            listed = ", ".join(self._quote(i) for i in dict.fromkeys(exclude_item_ids))
            expression = f"(item_id not in [{listed}]) and ({expression})"
        return self._search_codes(opened, queries, limit, expression)

    def full_vectors(
        self, catalog: str, pks: Sequence[str], *, raw: bool
    ) -> tuple[list[str], np.ndarray]:
        opened = self.collection(catalog, create=False)
        return opened.vectors.get(opened.name, opened.layout, pks, raw=raw)

    def existing(
        self, catalog: str, item_ids: Sequence[str], hashes: Sequence[str]
    ) -> tuple[list[Row], list[Row]]:
        """For a write: every row of these items (pk, item_id, object_index, content_hash),
        and the whole-image rows of any item with one of these content hashes. Read with
        Strong consistency, in one query."""
        try:
            opened = self.collection(catalog, create=False)
        except CatalogNotFound:
            return [], []
        if opened.sidecar is not None:
            return (
                opened.sidecar.item_rows(opened.name, item_ids),
                opened.sidecar.hash_rows(opened.name, [h for h in hashes if h]),
            )
        ids = ", ".join(self._quote(i) for i in dict.fromkeys(item_ids))
        listed_hashes = ", ".join(self._quote(h) for h in dict.fromkeys(hashes) if h)
        expression = f"item_id in [{ids}]"
        if listed_hashes:
            expression = (
                f"({expression}) or (content_hash in [{listed_hashes}] and object_index == 0)"
            )
        rows = self._query(
            opened,
            expression,
            ["pk", "item_id", "object_index", "content_hash"],
            consistency="Strong",
        )
        wanted = set(item_ids)
        own = [r for r in rows if r["item_id"] in wanted]
        same_hash = [r for r in rows if r["object_index"] == 0 and r["content_hash"] in hashes]
        return own, same_hash

    def rows_by_pks(self, catalog: str, pks: Sequence[str], *, code: bool) -> list[Row]:
        """The rows with these pks, every field (and the code when `code`: to write them
        back), read with Strong consistency."""
        opened = self.collection(catalog, create=False)
        if opened.sidecar is not None and not code:
            return list(opened.sidecar.rows(opened.name, pks).values())
        fields = [*self._fields(opened.layout), *([CODE] if code else [])]
        return self._fetch_rows(opened.name, pks, fields, consistency="Strong")

    def whole_image_pks(self, catalog: str, page: int) -> Iterator[list[str]]:
        """Every whole-image row's pk, a page at a time (the batch job's walk)."""
        opened = self.collection(catalog, create=False)
        with self._errors("read catalogue"):
            iterator = self._require().query_iterator(
                opened.name,
                batch_size=page,
                filter="object_index == 0",
                output_fields=["pk"],
                timeout=self.settings.timeout_seconds,
            )
        try:
            while True:
                with self._errors("read catalogue"):
                    rows = iterator.next()
                if not rows:
                    return
                yield [r["pk"] for r in rows]
        finally:
            iterator.close()

    def item_ids_after(self, catalog: str, after: str, limit: int) -> list[str]:
        """Up to `limit` item ids greater than `after`, in order (ListItems' page). Milvus
        returns rows in no order, so the ids after `after` are read (only that field) and
        sorted: a walk of the catalogue reads N^2 / (2 x limit) ids, fine at the page sizes
        a re-index uses up to a few million items."""
        opened = self.collection(catalog, create=False)
        expression = "object_index == 0"
        if after:
            expression += f" and item_id > {self._quote(after)}"
        found: list[str] = []
        with self._errors("list items"):
            iterator = self._require().query_iterator(
                opened.name,
                batch_size=KEYS_PER_QUERY,
                filter=expression,
                output_fields=["item_id"],
                consistency_level="Strong",
                timeout=self.settings.timeout_seconds,
            )
        try:
            while True:
                with self._errors("list items"):
                    rows = iterator.next()
                if not rows:
                    break
                found.extend(r["item_id"] for r in rows)
                # Only the smallest `limit` matter: keep memory at a few pages.
                if len(found) > 4 * limit:
                    found = sorted(found)[:limit]
        finally:
            iterator.close()
        return sorted(found)[:limit]

    def any_model_version(self, catalog: str) -> str:
        """The model_version of one stored whole image ('' when the catalogue is empty):
        what an adopted catalogue's vectors come from."""
        for pks in self.whole_image_pks(catalog, 1):
            rows = self.rows_by_pks(catalog, pks[:1], code=False)
            if rows:
                return str(rows[0].get("model_version", ""))
        return ""

    # -- catalogue records (records.py) --------------------------------------------------------

    def read_records(self) -> dict[str, str]:
        """Every catalogue record, as catalogue -> JSON (the collection is made on first use
        by the writer; none yet = no records)."""
        s, client, name = self.settings, self._require(), self.collection_name(RECORDS)
        with self._errors("read catalogue records"):
            if not client.has_collection(name, timeout=s.timeout_seconds):
                return {}
            if name not in self._records_loaded:
                client.load_collection(name, timeout=s.load_timeout_seconds)
                self._records_loaded.add(name)
            rows = client.query(
                name,
                filter='catalog != ""',
                output_fields=["catalog", "record"],
                limit=MILVUS_MAX_TOPK,
                consistency_level="Strong",
                timeout=s.timeout_seconds,
            )
        return {str(r["catalog"]): str(r["record"]) for r in rows}

    def write_record(self, catalog: str, record: str | None) -> None:
        """Write (or with None, delete) one catalogue's record."""
        s, client, name = self.settings, self._require(), self.collection_name(RECORDS)
        with self._errors("write catalogue record"):
            if not client.has_collection(name, timeout=s.timeout_seconds):
                schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
                schema.add_field("catalog", DataType.VARCHAR, is_primary=True, max_length=128)
                schema.add_field("record", DataType.VARCHAR, max_length=RECORD_BYTES)
                # Milvus wants a vector field in every collection; records are never searched.
                schema.add_field("unused", DataType.FLOAT_VECTOR, dim=2)
                client.create_collection(
                    name, schema=schema, consistency_level="Strong", timeout=s.timeout_seconds
                )
                index = client.prepare_index_params()
                index.add_index("unused", index_type="FLAT", metric_type="L2")
                client.create_index(name, index, timeout=s.timeout_seconds)
            if name not in self._records_loaded:
                client.load_collection(name, timeout=s.load_timeout_seconds)
                self._records_loaded.add(name)
            if record is None:
                client.delete(name, filter=f"catalog == {self._quote(catalog)}")
            else:
                client.upsert(
                    name,
                    [{"catalog": catalog, "record": record, "unused": [0.0, 0.0]}],
                    timeout=s.timeout_seconds,
                )

    def count(self, catalog: str, expression: str = "") -> int:
        opened = self.collection(catalog, create=False)
        with self._errors("count"):
            result = self._require().query(
                opened.name,
                filter=expression,
                output_fields=["count(*)"],
                consistency_level=self.settings.read_consistency,
                timeout=self.settings.timeout_seconds,
            )
        return int(result[0]["count(*)"])

    # -- writes ------------------------------------------------------------------------------

    def write(
        self,
        catalog: str,
        rows: list[Row],
        stored: np.ndarray,
        raw: Sequence[np.ndarray | None],
        stale_pks: Sequence[str] = (),
        *,
        new_pks: set[str] | None = None,
    ) -> None:
        """Write rows (their scalar fields) with their stored vectors [len(rows), dim] (unit
        length) and, where it differs, the vector as embedded; then delete `stale_pks` (rows
        the items no longer have). With a sidecar, it is written after Milvus (the commit
        point, vector_store.py); otherwise the vectors travel in the rows. Rows whose pk is
        in `new_pks` are known not to exist: they are inserted rather than upserted
        (milvus-lite's upsert deletes first)."""
        opened = self.collection(catalog, create=True)
        self._check_dim(opened, stored.shape[-1])
        layout = opened.layout
        stored_records = packed.quantise(stored)
        with_raw = [i for i, r in enumerate(raw) if r is not None]
        raw_records: list[bytes | None] = [None] * len(rows)
        if with_raw:
            quantised = packed.quantise(np.stack([raw[i] for i in with_raw]))  # type: ignore[misc]
            for i, record in zip(with_raw, quantised, strict=True):
                raw_records[i] = record
        ann = self._codes(layout, stored)
        for row, code in zip(rows, ann, strict=True):
            row[CODE] = code
            if not layout.source_uri:
                row.pop(SOURCE_URI, None)
        if opened.sidecar is None:
            opened.vectors.put(opened.name, rows, stored_records, raw_records)
        fresh = [r for r in rows if new_pks is not None and r["pk"] in new_pks]
        replacing = [r for r in rows if new_pks is None or r["pk"] not in new_pks]
        with self._errors("upsert"):
            self._send(opened, fresh, insert=True)
            self._send(opened, replacing, insert=False)
        if opened.sidecar is not None:
            opened.sidecar.put(opened.name, rows, stored_records, raw_records)
        self.delete_pks(catalog, stale_pks)

    def _send(self, opened: OpenCatalog, rows: list[Row], *, insert: bool) -> None:
        """Insert (rows known to be new) or upsert rows: column by column for a batch, row
        by row for a few (pymilvus's column path costs more per call, less per row)."""
        timeout = self.settings.timeout_seconds
        if 0 < len(rows) <= FEW_ROWS:
            send = self._require().insert if insert else self._require().upsert
            names = [field.name for field in opened.columns.schema.fields]
            send(opened.name, [{n: row[n] for n in names} for row in rows], timeout=timeout)
            return
        for start in range(0, len(rows), WRITE_ROWS):
            columns = _columns(opened, rows[start : start + WRITE_ROWS])
            if insert:
                opened.columns.insert(columns, timeout=timeout)
            else:
                opened.columns.upsert(columns, timeout=timeout)

    def delete_pks(self, catalog: str, pks: Sequence[str]) -> None:
        """Delete these rows (from the sidecar first: vector_store.py)."""
        if not pks:
            return
        opened = self.collection(catalog, create=False)
        opened.vectors.delete(opened.name, pks)
        client, s = self._require(), self.settings
        with self._errors("delete"):
            for start in range(0, len(pks), KEYS_PER_QUERY):
                listed = ", ".join(self._quote(pk) for pk in pks[start : start + KEYS_PER_QUERY])
                client.delete(opened.name, filter=f"pk in [{listed}]", timeout=s.timeout_seconds)

    def flush(self, catalog: str) -> None:
        """Seal the catalogue's growing segments (a server), so that its index is built on
        them: until a segment is sealed, Milvus searches it exhaustively."""
        if self.settings.is_lite:
            return
        opened = self.collection(catalog, create=False)
        with self._errors("flush"):
            self._require().flush(opened.name, timeout=self.settings.timeout_seconds)

    def index_progress(self, catalog: str) -> tuple[int, int]:
        """(indexed rows, total rows) of the catalogue's ANN index, as Milvus reports them."""
        opened = self.collection(catalog, create=False)
        with self._errors("describe index"):
            index = self._require().describe_index(
                opened.name, CODE, timeout=self.settings.timeout_seconds
            )
        return int(index.get("indexed_rows", 0)), int(index.get("total_rows", 0))

    # -- helpers -----------------------------------------------------------------------------

    def _codes(self, layout: CatalogLayout, vectors: np.ndarray) -> list[Any]:
        if layout.binary:
            return codes.binary_codes(vectors, layout.code)
        result: list[list[float]] = np.asarray(vectors, np.float32).tolist()
        return result

    def _search_codes(
        self, opened: OpenCatalog, queries: np.ndarray, limit: int, expression: str
    ) -> list[list[Hit]]:
        """Per query, the nearest rows by the compact index, with the cosine its distance
        implies."""
        s, layout = self.settings, opened.layout
        data: list[Any] = self._codes(layout, queries)
        params = index_params.for_limit(opened.index_type, opened.search_params, limit)
        with self._errors("search"):
            results = self._require().search(
                opened.name,
                data=data,
                anns_field=CODE,
                limit=limit,
                filter=expression,
                # Ids only: the item is in the primary key, and pymilvus builds a dict per hit
                # and field (a thousand candidates cost milliseconds).
                output_fields=[],
                search_params={"metric_type": layout.metric, "params": params},
                consistency_level=s.read_consistency,
                timeout=s.timeout_seconds,
            )
        bits = codes.code_bits(layout.dim)

        def score(distance: float) -> float:
            return codes.hamming_to_cosine(distance, bits) if layout.binary else distance

        return [
            [
                Hit(pk, item_of(pk, layout), score(float(distance)))
                for pk, distance in zip(hits.ids, hits.distances, strict=True)
            ]
            for hits in results
        ]

    def _with_vectors(self, opened: OpenCatalog, rows: list[Row], *, raw: bool) -> list[Row]:
        found, matrix = opened.vectors.get(
            opened.name, opened.layout, [r["pk"] for r in rows], raw=raw
        )
        by_pk = dict(zip(found, matrix, strict=True))
        kept = []
        for row in rows:
            if row["pk"] in by_pk:
                row["vector"] = by_pk[row["pk"]]
                kept.append(row)
        return kept

    @staticmethod
    def _fields(layout: CatalogLayout) -> list[str]:
        fields = ["pk", *FIELDS]
        return [*fields, SOURCE_URI] if layout.source_uri else fields

    def _fetch_rows(
        self,
        collection: str,
        pks: Sequence[str],
        fields: list[str],
        consistency: str | None = None,
    ) -> list[Row]:
        """The rows with these primary keys. (MilvusClient.get would not quote ids with a
        quote in them.)"""
        rows: list[Row] = []
        client, s = self._require(), self.settings
        for start in range(0, len(pks), KEYS_PER_QUERY):
            listed = ", ".join(self._quote(pk) for pk in pks[start : start + KEYS_PER_QUERY])
            with self._errors("query"):
                rows.extend(
                    client.query(
                        collection,
                        filter=f"pk in [{listed}]",
                        output_fields=fields,
                        consistency_level=consistency or s.read_consistency,
                        timeout=s.timeout_seconds,
                    )
                )
        return rows

    def _check_dim(self, opened: OpenCatalog, dim: int) -> None:
        if dim != opened.layout.dim:
            raise WrongDimension(
                f"catalog holds {opened.layout.dim}-d vectors; got {dim}-d (another model? "
                "index into a new catalogue)"
            )

    def _quote(self, text: str) -> str:
        return quote(text, lite=self.settings.is_lite)

    def _query(
        self,
        opened: OpenCatalog,
        expression: str,
        fields: list[str],
        *,
        limit: int = MILVUS_MAX_TOPK,
        consistency: str | None = None,
    ) -> list[Row]:
        s, client = self.settings, self._require()
        with self._errors("query"):
            return list(
                client.query(
                    opened.name,
                    filter=expression,
                    output_fields=fields,
                    limit=limit,
                    consistency_level=consistency or s.read_consistency,
                    timeout=s.timeout_seconds,
                )
            )

    def _require(self) -> MilvusClient:
        if self._down:
            raise StoreUnavailable(f"Milvus at {self.settings.milvus_uri}: {self._down}")
        if self._client is None:
            raise StoreUnavailable(f"Milvus at {self.settings.milvus_uri}: not connected yet")
        return self._client

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        generation = self._generation
        try:
            yield
        except MILVUS_ERRORS as error:
            raise milvus_failure(self.settings, action, error) from None
        except (ValueError, RuntimeError, AttributeError) as error:
            # pymilvus on a channel closed under it by a restart ("Cannot invoke RPC on
            # closed channel!"): Milvus's failure, not the caller's nor an internal one.
            if generation == self._generation and not self._down:
                raise
            raise StoreUnavailable(
                f"Milvus at {self.settings.milvus_uri}: {action} failed: the connection was "
                f"closed while milvus-lite restarted ({error})"
            ) from None


def milvus_failure(
    settings: RetrievalSettings, action: str, error: MilvusException | grpc.RpcError
) -> StoreUnavailable:
    """What pymilvus raised, as StoreUnavailable naming Milvus (its URI, never the token)."""
    where = f"Milvus at {settings.milvus_uri}: {action} failed"
    if isinstance(error, MilvusException):
        return StoreUnavailable(f"{where}: {error.message}")
    # pymilvus passes some gRPC errors on as they are: a Milvus that does not answer in time
    # raises DEADLINE_EXCEEDED (measured with milvus-lite's process stopped).
    code = error.code() if isinstance(error, grpc.Call) else None
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return StoreUnavailable(
            f"{where}: no answer in time (DEADLINE_EXCEEDED; LOUPE_MILVUS_TIMEOUT_SECONDS="
            f"{settings.timeout_seconds})"
        )
    detail = error.details() if isinstance(error, grpc.Call) else repr(error)
    return StoreUnavailable(f"{where}: {code.name if code else 'gRPC error'}: {detail}")


def _process_state(pid: int) -> str:
    """The state letter of a process (R, S, D, T for stopped, Z...), '' if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # The command name in parentheses may hold spaces: the state follows its last ')'.
    return stat.rpartition(")")[2].split()[0] if ")" in stat else ""


def _columns(opened: OpenCatalog, rows: list[Row]) -> list[list[Any]]:
    """Rows as one list of values per field, in the schema's order."""
    return [[row[field.name] for row in rows] for field in opened.columns.schema.fields]
