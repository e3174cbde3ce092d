"""Catalogue records: which collection of a catalogue holds which model's vectors.

Vectors of two embedders are not comparable, so each catalogue records the models its
collections were built with: `live` (what searches use), `next` (a re-index in progress) and
`previous` (the collection kept after a switch, for rollback). Every write and search names
its embedder and is routed to the collection bound to it, or refused with
FAILED_PRECONDITION naming both: never a silent mix.

The records are one row per catalogue in a small Milvus collection that every retrieval
replica reads (re-read every LOUPE_RETRIEVAL_CATALOG_REFRESH_SECONDS, and at once before a
request naming an unknown model is refused). Only the single writer changes them. Milvus
aliases would make the switch a server-side rename, but milvus-lite has none (create_alias is
UNIMPLEMENTED), so the switch is this one record, which readers pick up within the refresh:
a gateway or replica with a stale view still names the model of its vectors, and is routed to
the collection holding that model, so searches never mix spaces nor fail during a switch.

Collections: the first is PREFIX__NAME (a catalogue made before records existed keeps it:
adopted without a rewrite), re-indexes make PREFIX__NAME__gN (catalogue names hold no "__").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from prometheus_client import Gauge

from loupe.v1 import retrieval_pb2
from services.retrieval.settings import RetrievalSettings
from services.retrieval.store import MILVUS_ERRORS, CatalogNotFound, MilvusStore, StoreUnavailable

log = logging.getLogger(__name__)

# Separates a catalogue from its re-index generation in a collection key.
GENERATION_SEPARATOR = "__g"


class ModelMismatch(Exception):
    """A request's model is not bound to any collection of the catalogue
    (FAILED_PRECONDITION); the message names both."""


class MigrationError(Exception):
    """A MigrateCatalog action that the record's state does not allow
    (FAILED_PRECONDITION); the message says what to do instead."""


@dataclass(frozen=True)
class Binding:
    # "name/version"; "" = not bound yet (an empty catalogue adopted or made before any write).
    embedder: str
    dimension: int
    preprocessing: str = ""
    detector: str = ""
    # The store's key for the collection: NAME or NAME__gN.
    key: str = ""

    def to_proto(self, collection: str) -> retrieval_pb2.ModelBinding:
        return retrieval_pb2.ModelBinding(
            embedder=self.embedder,
            dimension=self.dimension,
            preprocessing=self.preprocessing,
            detector=self.detector,
            collection=collection,
        )


@dataclass(frozen=True)
class Record:
    catalog: str
    live: Binding
    next: Binding | None = None
    previous: Binding | None = None
    # The last re-index generation used: collection keys are never reused, so a collection
    # dropped by one migration can never be mistaken for another's.
    generation: int = 0
    # Whether this record is stored (False: derived on a reader, or not yet written).
    stored: bool = field(default=True, compare=False)

    def bindings(self) -> list[tuple[str, Binding]]:
        """(role, binding) of every collection, live first."""
        found = [("live", self.live)]
        if self.next is not None:
            found.append(("next", self.next))
        if self.previous is not None:
            found.append(("previous", self.previous))
        return found

    def keys(self) -> list[str]:
        return [b.key for _, b in self.bindings()]

    def for_model(self, model: str) -> Binding | None:
        """The collection bound to this embedder ('' = live); an unbound live collection
        takes any model."""
        if not model or not self.live.embedder:
            return self.live
        for _, binding in self.bindings():
            if binding.embedder == model:
                return binding
        return None

    def describe(self) -> str:
        """'bound to embedder A (re-indexing to B; previous C)' for error messages."""
        text = f"catalog {self.catalog!r} is bound to embedder {self.live.embedder or '(none)'}"
        extra = []
        if self.next is not None:
            extra.append(f"re-indexing to {self.next.embedder}")
        if self.previous is not None:
            extra.append(f"previous {self.previous.embedder}, kept for rollback")
        return text + (f" ({'; '.join(extra)})" if extra else "")

    def with_binding(self, old: Binding, new: Binding) -> Record:
        """This record with one binding (the same collection) replaced."""
        return replace(
            self,
            live=new if self.live == old else self.live,
            next=new if self.next == old else self.next,
            previous=new if self.previous == old else self.previous,
        )

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("stored")
        return json.dumps(data, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Record:
        data: dict[str, Any] = json.loads(text)

        def binding(value: dict[str, Any] | None) -> Binding | None:
            return None if value is None else Binding(**value)

        live = binding(data["live"])
        assert live is not None
        return cls(
            catalog=data["catalog"],
            live=live,
            next=binding(data.get("next")),
            previous=binding(data.get("previous")),
            generation=int(data.get("generation", 0)),
        )


def generation_key(catalog: str, generation: int) -> str:
    return f"{catalog}{GENERATION_SEPARATOR}{generation}"


def catalog_of(key: str) -> str:
    """The catalogue a collection key belongs to."""
    return key.partition(GENERATION_SEPARATOR)[0]


def check_binding(record: Record, binding: Binding, write: retrieval_pb2.ModelBinding) -> None:
    """A write's binding against the collection's: dimension and preprocessing must agree
    where both are known; the detector check is the caller's (it depends on objects)."""
    if write.dimension and binding.dimension and write.dimension != binding.dimension:
        raise ModelMismatch(
            f"{record.describe()}: its {binding.embedder} collection holds "
            f"{binding.dimension}-value vectors; this write's have {write.dimension}"
        )
    if (
        write.preprocessing
        and binding.preprocessing
        and write.preprocessing != (binding.preprocessing)
    ):
        raise ModelMismatch(
            f"{record.describe()}: {binding.embedder} was recorded with preprocessing "
            f"{binding.preprocessing!r}; this write's is {write.preprocessing!r}"
        )


CATALOG_MODEL_INFO = Gauge(
    "loupe_catalog_model_info",
    "1 per collection of a catalogue: the embedder it is bound to and its role (live, next: "
    "a re-index in progress, previous: kept for rollback). Alert when a live embedder differs "
    "from loupe_embedding_model_info's default.",
    ["catalog", "embedder", "role"],
)


class CatalogRecords:
    """This replica's view of every catalogue's record. Reads are served from memory,
    re-read from Milvus at most every `refresh_seconds` (and at once when asked); the writer
    changes them through `save`, under `lock`."""

    def __init__(self, store: MilvusStore, settings: RetrievalSettings) -> None:
        self._store = store
        self._settings = settings
        self._records: dict[str, Record] = {}
        # Adopted catalogues not stored yet (a reader's view, or an empty catalogue), until the
        # next refresh.
        self._derived: dict[str, Record] = {}
        self._read_at = -math.inf
        self._exported: set[tuple[str, str, str]] = set()
        self._reading: asyncio.Lock | None = None
        self.lock = asyncio.Lock()

    async def refresh(self, *, force: bool = False) -> None:
        if not force and time.monotonic() - self._read_at < self._settings.catalog_refresh_seconds:
            return
        if self._reading is None:
            self._reading = asyncio.Lock()
        started = time.monotonic()
        async with self._reading:
            if self._read_at >= started:  # another caller read them meanwhile
                return
            try:
                raw = await asyncio.to_thread(self._store.read_records)
            except (StoreUnavailable, *MILVUS_ERRORS) as error:
                if self._read_at == -math.inf:
                    raise
                # The records this replica holds stand until Milvus answers again (the
                # writer's own are current: it changes them): the request goes on to fail, or
                # not, on its own call to Milvus, as it did before records existed.
                log.warning("catalogue records not re-read", extra={"reason": str(error)})
                self._read_at = time.monotonic()
                return
            self._records = {c: Record.from_json(text) for c, text in raw.items()}
            self._derived = {}
            self._read_at = time.monotonic()
        self._export()

    async def get(self, catalog: str, *, refresh: bool = False) -> Record | None:
        """The catalogue's record; for a catalogue with a collection but no record, one
        derived from it (adoption: its collection as it is, bound to the embedder of a stored
        row, stored by the writer once it knows that embedder); None when it does not exist."""
        await self.refresh(force=refresh)
        record = self._records.get(catalog)
        if record is not None:
            return record
        if catalog in self._derived:
            return self._derived[catalog]
        try:
            opened = await asyncio.to_thread(self._store.collection, catalog, create=False)
        except CatalogNotFound:
            return None
        embedder = await asyncio.to_thread(self._store.any_model_version, catalog)
        record = Record(catalog, Binding(embedder, opened.layout.dim, key=catalog), stored=False)
        if embedder and self._settings.writes:
            async with self.lock:
                if catalog not in self._records:
                    await self.save(record)
                    log.info("catalogue adopted", extra={"catalog": catalog, "embedder": embedder})
            return self._records[catalog]
        self._derived[catalog] = record
        return record

    def forget(self, catalog: str) -> None:
        """Drop a derived record (its catalogue was just written or dropped)."""
        self._derived.pop(catalog, None)

    def known(self) -> list[str]:
        return sorted(self._records)

    async def save(self, record: Record) -> Record:
        """Store the record (the writer, holding `lock`)."""
        stored = replace(record, stored=True)
        await asyncio.to_thread(self._store.write_record, record.catalog, stored.to_json())
        self._records[record.catalog] = stored
        self._export()
        return stored

    async def delete(self, catalog: str) -> None:
        await asyncio.to_thread(self._store.write_record, catalog, None)
        self._records.pop(catalog, None)
        self._export()

    def _export(self) -> None:
        """Set the current series and remove the stale ones only (never clear all: a scrape
        in between would see none, and an alert on them would flap)."""
        current = {
            (record.catalog, binding.embedder, role)
            for record in self._records.values()
            for role, binding in record.bindings()
        }
        for labels in self._exported - current:
            with contextlib.suppress(KeyError):  # removed already (another store, in tests)
                CATALOG_MODEL_INFO.remove(*labels)
        for labels in current:
            CATALOG_MODEL_INFO.labels(*labels).set(1)
        self._exported = current
