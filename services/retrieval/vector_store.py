"""Where a catalogue's full-precision vectors live, beside the compact index.

Every row has two: the vector as stored (for the whole image, augmented by DBA), which ranking
re-scores candidates with, and the vector as embedded ("raw"; kept only where it differs),
which duplicate detection and the DBA batch job start from. Both are int8 with a scale
(services/common/vectors.py).

- `SidecarVectors` (milvus-lite, the embedded default): an SQLite file beside milvus-lite's,
  holding each row's vectors and a copy of its fields. milvus-lite keeps every field of every
  row in memory (no mmap), so vectors in its rows would cost their size again in resident
  memory; SQLite reads them from disk through the page cache, and a search needs only the
  few thousand it re-scores. And milvus-lite answers a lookup by id in about 1.5 ms of CPU
  (its own and the client's), SQLite in a tenth of that: lookups, the checks a write makes
  and the fields of search results come from the sidecar, Milvus serving the search itself.
  The sidecar is the commit point: rows are written to Milvus first and to the sidecar
  after, and deleted from the sidecar first, so what a lookup finds is searchable, and a
  row a crash left in Milvus alone is skipped by searches and rewritten by the next write.
- `FieldVectors` (a Milvus server, and catalogues made before the sidecar): base64 text in
  VARCHAR fields of the rows themselves, which every Milvus from 2.3 on can hold, and which
  replicas of retrieval on other machines share.
"""

from __future__ import annotations

import base64
import json
import math
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from services.common import vectors as packed
from services.retrieval.layout import SIDECAR, CatalogLayout

# The two vector fields of a FIELDS collection.
VECTOR = "vector"
RAW = "raw"
# A row's fields beside its primary key (the sidecar's copy of them, as a JSON list in this
# order: never reorder). Lookups and searches return all but source_uri (store.FIELDS).
SIDECAR_FIELDS = [
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
    "source_uri",
]
# SQLite's page. A search reads a thousand rows scattered over the file, one page each, so
# larger pages would copy more bytes per row read.
PAGE_SIZE = 4096
# Pages SQLite keeps in its own cache per connection (8 MiB): bounded, whatever the
# catalogue's size (the OS page cache holds the rest, outside the process).
CACHE_PAGES = 2048
# The sidecar's tables per collection (SidecarVectors._table).
TABLES = ("v", "r", "p")
# Keys per `IN (...)` statement (SQLite allows 32766 parameters).
KEYS_PER_STATEMENT = 4096

# fetch(collection, pks, output_fields) -> those rows: the store's query by primary key, with
# its consistency and error mapping.
FetchRows = Callable[[str, Sequence[str], list[str]], list[dict[str, Any]]]


class VectorStore(Protocol):
    """Full vectors of a catalogue's rows, by primary key."""

    kind: str

    def prepare(self, collection: str) -> None:
        """Make room for a new collection's vectors."""
        ...

    def put(
        self,
        collection: str,
        rows: list[dict[str, Any]],
        stored: Sequence[bytes],
        raw: Sequence[bytes | None],
    ) -> None:
        """Record each row's stored vector and, where it differs, its raw one (quantised
        records). FieldVectors puts them into the rows; SidecarVectors writes them now."""
        ...

    def get(
        self, collection: str, layout: CatalogLayout, pks: Sequence[str], *, raw: bool
    ) -> tuple[list[str], np.ndarray]:
        """The pks found, in the order asked, and their vectors [found, dim] as float32:
        the raw ones when `raw` (the stored one where the raw is the same)."""
        ...

    def rows(self, collection: str, pks: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Every field of these rows, by pk; missing pks absent."""
        ...

    def delete(self, collection: str, pks: Sequence[str]) -> None: ...

    def drop(self, collection: str) -> None: ...

    def close(self) -> None: ...


class FieldVectors:
    """Vectors as base64 text in the VECTOR and RAW fields of the Milvus rows."""

    kind = "fields"

    def __init__(self, fetch: FetchRows, fields: list[str]) -> None:
        self._fetch = fetch
        # The collection's fields beside pk and vectors (catalogues made before layout 2
        # have no source_uri).
        self.fields = fields

    def prepare(self, collection: str) -> None:
        return None

    def put(
        self,
        collection: str,
        rows: list[dict[str, Any]],
        stored: Sequence[bytes],
        raw: Sequence[bytes | None],
    ) -> None:
        for row, vector, original in zip(rows, stored, raw, strict=True):
            row[VECTOR] = base64.b64encode(vector).decode("ascii")
            row[RAW] = base64.b64encode(original).decode("ascii") if original else ""

    def get(
        self, collection: str, layout: CatalogLayout, pks: Sequence[str], *, raw: bool
    ) -> tuple[list[str], np.ndarray]:
        found: dict[str, bytes] = {}
        fields = [VECTOR, RAW] if raw else [VECTOR]
        for chunk in _chunks(pks):
            for row in self._fetch(collection, chunk, fields):
                text = (row.get(RAW) or row[VECTOR]) if raw else row[VECTOR]
                found[row["pk"]] = base64.b64decode(text)
        order = [pk for pk in pks if pk in found]
        return order, _matrix([found[pk] for pk in order], layout)

    def rows(self, collection: str, pks: Sequence[str]) -> dict[str, dict[str, Any]]:
        rows = self._fetch(collection, pks, ["pk", *self.fields])
        return {row["pk"]: row for row in rows}

    def delete(self, collection: str, pks: Sequence[str]) -> None:
        return None  # the rows go, and their fields with them

    def drop(self, collection: str) -> None:
        return None

    def close(self) -> None:
        return None

    @staticmethod
    def field_length(layout: CatalogLayout) -> int:
        """VARCHAR length of the vector fields: base64 of one stored record."""
        return 4 * math.ceil(layout.stored_vector_bytes / 3)


class SidecarVectors:
    """Vectors in an SQLite file: per collection, a table of stored vectors, one of the
    vectors as embedded where they differ, and one of what a search returns of each row (a
    copy of its fields, as JSON), all keyed by row pk. Apart, because a search reads
    a thousand vectors but the fields of its hundred best. milvus-lite answers `pk in
    [...]` in time that grows with the catalogue (14 ms for 100 keys among 200 k rows);
    SQLite's key lookups do not."""

    kind = SIDECAR

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        # SQLite takes one writer at a time; a lock makes writers queue here rather than
        # spin on SQLITE_BUSY.
        self._write_lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        with self._connection() as connection:
            connection.execute("PRAGMA journal_mode=WAL")

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(
            self.path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        # page_size applies when the file is created; harmless afterwards.
        connection.execute(f"PRAGMA page_size={PAGE_SIZE}")
        # WAL: readers never wait for a writer. NORMAL: a commit survives the process being
        # killed (what milvus-lite also promises), not a power cut.
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute(f"PRAGMA cache_size={CACHE_PAGES}")
        with self._connections_lock:
            self._connections.append(connection)
        return connection

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection (an sqlite3 connection is not for concurrent use)."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._open()
        yield connection

    @staticmethod
    def _table(collection: str, kind: str = "v") -> str:
        """v: stored vectors, r: vectors as embedded, p: candidate fields."""
        # Collection names are [A-Za-z0-9_] (settings and catalog rules), so quoting is enough.
        return f'"{kind}__{collection}"'

    def prepare(self, collection: str) -> None:
        rows = self._table(collection, "p")
        with self._write_lock, self._connection() as connection:
            for kind in ("v", "r"):
                # A rowid table: a WITHOUT ROWID one keeps rows in its key's B-tree, where a
                # 1.3 kB row spills onto overflow pages (4.6 kB a row on disk, 6x slower reads).
                connection.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._table(collection, kind)} "
                    "(pk TEXT PRIMARY KEY, value BLOB NOT NULL)"
                )
            # The fields, as JSON, with the columns lookups search by.
            connection.execute(
                f"CREATE TABLE IF NOT EXISTS {rows} (pk TEXT PRIMARY KEY, item_id TEXT NOT NULL, "
                "content_hash TEXT NOT NULL, object_index INTEGER NOT NULL, value TEXT NOT NULL)"
            )
            connection.execute(f'CREATE INDEX IF NOT EXISTS "pi__{collection}" ON {rows} (item_id)')
            connection.execute(
                f'CREATE INDEX IF NOT EXISTS "ph__{collection}" ON {rows} (content_hash) '
                "WHERE object_index = 0"
            )

    def put(
        self,
        collection: str,
        rows: list[dict[str, Any]],
        stored: Sequence[bytes],
        raw: Sequence[bytes | None],
    ) -> None:
        pks = [row["pk"] for row in rows]
        originals = [(pk, o) for pk, o in zip(pks, raw, strict=True) if o is not None]
        unchanged = [(pk,) for pk, o in zip(pks, raw, strict=True) if o is None]
        fields = [
            (
                row["pk"],
                row["item_id"],
                row["content_hash"],
                row["object_index"],
                json.dumps([row.get(f, "") for f in SIDECAR_FIELDS], separators=(",", ":")),
            )
            for row in rows
        ]
        with self._write_lock, self._connection() as connection:
            connection.execute("BEGIN")
            try:
                insert = "INSERT OR REPLACE INTO {} (pk, value) VALUES (?, ?)"
                connection.executemany(
                    insert.format(self._table(collection)), zip(pks, stored, strict=True)
                )
                connection.executemany(insert.format(self._table(collection, "r")), originals)
                connection.executemany(
                    f"DELETE FROM {self._table(collection, 'r')} WHERE pk = ?", unchanged
                )
                connection.executemany(
                    f"INSERT OR REPLACE INTO {self._table(collection, 'p')} "
                    "(pk, item_id, content_hash, object_index, value) VALUES (?, ?, ?, ?, ?)",
                    fields,
                )
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise

    def get(
        self, collection: str, layout: CatalogLayout, pks: Sequence[str], *, raw: bool
    ) -> tuple[list[str], np.ndarray]:
        found: dict[str, bytes] = {}
        # The vectors as embedded where they differ, then the stored ones for the rest.
        tables = (
            [self._table(collection, "r"), self._table(collection)]
            if raw
            else [self._table(collection)]
        )
        with self._connection() as connection:
            for table in tables:
                wanted = [pk for pk in pks if pk not in found]
                for chunk in _chunks(wanted):
                    marks = ", ".join("?" * len(chunk))
                    cursor = connection.execute(
                        f"SELECT pk, value FROM {table} WHERE pk IN ({marks})", chunk
                    )
                    found.update(cursor.fetchall())
        order = [pk for pk in pks if pk in found]
        return order, _matrix([found[pk] for pk in order], layout)

    def rows(self, collection: str, pks: Sequence[str]) -> dict[str, dict[str, Any]]:
        return {row["pk"]: row for row in self._select(collection, "pk", pks)}

    def item_rows(self, collection: str, item_ids: Sequence[str]) -> list[dict[str, Any]]:
        """Every row of these items."""
        return self._select(collection, "item_id", item_ids)

    def hash_rows(self, collection: str, hashes: Sequence[str]) -> list[dict[str, Any]]:
        """The whole-image rows of items with these content hashes."""
        rows = self._select(collection, "content_hash", hashes, "AND object_index = 0")
        return [row for row in rows if row["object_index"] == 0]

    def _select(
        self, collection: str, column: str, keys: Sequence[str], more: str = ""
    ) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        with self._connection() as connection:
            for chunk in _chunks(list(dict.fromkeys(keys))):
                marks = ", ".join("?" * len(chunk))
                cursor = connection.execute(
                    f"SELECT pk, value FROM {self._table(collection, 'p')} "
                    f"WHERE {column} IN ({marks}) {more}",
                    chunk,
                )
                for pk, text in cursor:
                    found.append(
                        {"pk": pk, **dict(zip(SIDECAR_FIELDS, json.loads(text), strict=True))}
                    )
        return found

    def delete(self, collection: str, pks: Sequence[str]) -> None:
        if not pks:
            return
        with self._write_lock, self._connection() as connection:
            for table in (self._table(collection, kind) for kind in TABLES):
                for chunk in _chunks(pks):
                    marks = ", ".join("?" * len(chunk))
                    connection.execute(f"DELETE FROM {table} WHERE pk IN ({marks})", chunk)

    def drop(self, collection: str) -> None:
        with self._write_lock, self._connection() as connection:
            for kind in TABLES:
                connection.execute(f"DROP TABLE IF EXISTS {self._table(collection, kind)}")

    def close(self) -> None:
        with self._connections_lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()
        self._local = threading.local()


def sidecar_path(milvus_file: str) -> Path:
    """The sidecar beside a milvus-lite file: milvus.db -> milvus.vectors.sqlite."""
    path = Path(milvus_file)
    return path.with_name(f"{path.stem}.vectors.sqlite")


def _matrix(records: list[bytes], layout: CatalogLayout) -> np.ndarray:
    """[len(records), dim] float32. Records are int8 with a scale, except in a catalogue made
    before that encoding, whose older rows hold float32 (told apart by their length)."""
    quantised = packed.stored_bytes(layout.dim)
    if all(len(record) == quantised for record in records):
        return packed.dequantise(records, layout.dim)
    matrix = np.empty((len(records), layout.dim), np.float32)
    for row, record in enumerate(records):
        if len(record) == quantised:
            matrix[row] = packed.dequantise([record], layout.dim)[0]
        elif len(record) == 4 * layout.dim:
            matrix[row] = np.frombuffer(record, "<f4")
        else:
            raise packed.InvalidVectors(
                f"a stored vector of {len(record)} bytes in a {layout.dim}-d catalogue"
            )
    return matrix


def _chunks(items: Sequence[str]) -> Iterator[list[str]]:
    for start in range(0, len(items), KEYS_PER_STATEMENT):
        yield list(items[start : start + KEYS_PER_STATEMENT])
