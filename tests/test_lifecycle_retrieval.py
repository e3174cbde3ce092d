"""Catalogue model bindings and migrations in RetrievalService: real milvus-lite, real gRPC.

A catalogue is bound to the embedder of its first write; writes, searches and lookups are
routed to the collection bound to their model or refused with FAILED_PRECONDITION naming
both; MigrateCatalog moves a catalogue between collections (records.py).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from loupe.v1 import common_pb2 as c
from loupe.v1 import retrieval_pb2 as r
from loupe.v1 import retrieval_pb2_grpc
from services.retrieval.service import RetrievalService
from tests.support import serving
from tests.test_retrieval_service import DIM, drop, settings_for

OLD, NEW, OTHER = "embedder/1", "embedder_gem3/1", "embedder_int8/1"
Action = r.MigrateCatalogRequest.Action
rng = np.random.default_rng(12)
# The module's collection prefix ("loupe" on milvus-lite, a fresh one on a Milvus server).
PREFIX = ["loupe"]


def collection(key: str, prefix: str = "") -> str:
    return f"{prefix or PREFIX[0]}__{key}"


@pytest.fixture(scope="module")
def stub(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[retrieval_pb2_grpc.RetrievalServiceStub]:
    settings = settings_for(tmp_path_factory.mktemp("lifecycle"))
    PREFIX[0] = settings.collection_prefix
    with serving(RetrievalService(settings)) as channel:
        yield retrieval_pb2_grpc.RetrievalServiceStub(channel)
    drop(settings)


def unit(seed: int) -> c.Vector:
    values = np.random.default_rng(seed).standard_normal(DIM)
    return c.Vector(values=(values / np.linalg.norm(values)).tolist())


def stored(
    item_id: str, model: str, seed: int, content_hash: str = "", objects: int = 0
) -> r.StoredItem:
    item = r.StoredItem(
        item_id=item_id,
        content_hash=content_hash or f"hash-{item_id}",
        model_version=model,
        image_width=10,
        image_height=10,
        source_uri=f"/photos/{item_id}.jpg",
    )
    item.objects.add(object_index=0, vector=unit(seed))
    for index in range(1, objects + 1):
        item.objects.add(
            object_index=index, box=c.Box(x0=0, y0=0, x1=5, y1=5), vector=unit(seed + index)
        )
    return item


def upsert(
    stub: retrieval_pb2_grpc.RetrievalServiceStub,
    catalog: str,
    item: r.StoredItem,
    *,
    detector: str = "",
    if_live: str = "",
) -> r.UpsertResponse:
    binding = r.ModelBinding(
        embedder=item.model_version, dimension=DIM, preprocessing="RGB test", detector=detector
    )
    return stub.Upsert(
        r.UpsertRequest(item=item, catalog=catalog, binding=binding, if_live_content_hash=if_live)
    )


def search(
    stub: retrieval_pb2_grpc.RetrievalServiceStub, catalog: str, seed: int, model: str = ""
) -> list[str]:
    found = stub.Search(
        r.RetrievalSearchRequest(
            query=unit(seed), limit=10, catalog=catalog, model=model, whole_images_only=True
        )
    )
    return [candidate.item_id for candidate in found.candidates]


def migrate(
    stub: retrieval_pb2_grpc.RetrievalServiceStub,
    catalog: str,
    action: int,
    embedder: str = "",
) -> r.CatalogRecord:
    binding = r.ModelBinding(embedder=embedder, dimension=DIM) if embedder else None
    return stub.MigrateCatalog(
        r.MigrateCatalogRequest(catalog=catalog, action=action, binding=binding)
    )


def refused(call: object, code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION) -> str:
    with pytest.raises(grpc.RpcError) as error:
        call()  # type: ignore[operator]
    assert error.value.code() == code, error.value.details()
    return str(error.value.details())


# First in the file: on a Milvus server, pymilvus shares one connection per URI, and the
# stores this test opens and closes would close it under the module's service.
def test_a_catalogue_without_a_record_is_adopted_as_it_is(tmp_path: Path) -> None:
    """A catalogue made before records existed: its collection is bound to its rows'
    embedder and kept, not rewritten."""
    settings = settings_for(tmp_path)
    with serving(RetrievalService(settings)) as channel:
        old = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        for k in range(3):
            old.Upsert(r.UpsertRequest(item=stored(f"old-{k}", OLD, 40 + k), catalog="legacy"))
    # What the code before records left: the collection, and no record.
    service = RetrievalService(settings)
    service.store.open()
    service.store.write_record("legacy", None)
    assert "legacy" not in service.store.read_records()
    service.store.close()
    with serving(RetrievalService(settings)) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        (stats,) = [
            s
            for s in stub.ListCatalogs(r.RetrievalListCatalogsRequest()).catalogs
            if s.catalog == "legacy"
        ]
        assert (stats.record.live.embedder, stats.record.live.collection) == (
            OLD,
            collection("legacy", settings.collection_prefix),
        )
        assert stats.items == 3
        assert search(stub, "legacy", 41)[0] == "old-1"
        refused(lambda: upsert(stub, "legacy", stored("new", NEW, 50)))
        # It can migrate like any other.
        assert migrate(stub, "legacy", Action.BEGIN, NEW).next.collection == collection(
            "legacy__g1", settings.collection_prefix
        )
    reopened = RetrievalService(settings)
    reopened.store.open()
    try:
        assert "legacy" in reopened.store.read_records()
    finally:
        reopened.store.close()
        drop(settings)


def test_the_first_write_binds_a_catalogue_and_other_models_are_refused(
    stub: retrieval_pb2_grpc.RetrievalServiceStub,
) -> None:
    upsert(stub, "bound", stored("a", OLD, 1), detector="detector/1")
    upsert(stub, "bound", stored("b", OLD, 2, objects=2), detector="detector/1")
    live = stub.Stats(r.StatsRequest(catalog="bound")).record.live
    assert (live.embedder, live.dimension, live.preprocessing) == (OLD, DIM, "RGB test")
    assert (live.detector, live.collection) == ("detector/1", collection("bound"))

    message = refused(lambda: upsert(stub, "bound", stored("c", NEW, 3)))
    assert OLD in message and NEW in message
    message = refused(lambda: search(stub, "bound", 1, model=NEW))
    assert OLD in message and NEW in message
    message = refused(lambda: stub.Lookup(r.LookupRequest(item_id="a", catalog="bound", model=NEW)))
    assert OLD in message and NEW in message
    # Objects found by another detector would not be comparable with the stored ones.
    message = refused(
        lambda: upsert(stub, "bound", stored("d", OLD, 4, objects=1), detector="detector/2")
    )
    assert "detector/1" in message and "detector/2" in message
    assert search(stub, "bound", 1, model=OLD)[0] == "a"
    assert search(stub, "bound", 2)[0] == "b"  # empty = live
    assert REGISTRY.get_sample_value(
        "loupe_catalog_model_info", {"catalog": "bound", "embedder": OLD, "role": "live"}
    )


def test_catalogue_names_cannot_collide_with_reindex_collections(
    stub: retrieval_pb2_grpc.RetrievalServiceStub,
) -> None:
    message = refused(
        lambda: upsert(stub, "bound__g1", stored("a", OLD, 1)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "two underscores" in message


def test_a_migration_begins_switches_rolls_back_and_drops(
    stub: retrieval_pb2_grpc.RetrievalServiceStub,
) -> None:
    catalog = "moving"
    for k in range(4):
        upsert(stub, catalog, stored(f"i{k}", OLD, 100 + k))
    refused(lambda: migrate(stub, catalog, Action.SWITCH))
    refused(lambda: migrate(stub, catalog, Action.ROLLBACK))
    refused(lambda: migrate(stub, catalog, Action.BEGIN, OLD))  # bound to it already

    record = migrate(stub, catalog, Action.BEGIN, NEW)
    assert (record.live.embedder, record.next.embedder) == (OLD, NEW)
    assert record.next.collection == collection(f"{catalog}__g1")
    assert migrate(stub, catalog, Action.BEGIN, NEW) == record  # a resumed re-index
    assert OLD in refused(lambda: migrate(stub, catalog, Action.BEGIN, OTHER))

    # Re-index writes: only while the live item is the one listed.
    assert upsert(stub, catalog, stored("i0", NEW, 200), if_live="hash-i0").written
    changed = upsert(stub, catalog, stored("i1", NEW, 201), if_live="stale")
    assert (changed.written, changed.skipped) == (False, "changed")
    gone = upsert(stub, catalog, stored("nope", NEW, 202), if_live="hash-nope")
    assert (gone.written, gone.skipped) == (False, "deleted")
    # Dual writes of a new item: each model's vectors into its own collection.
    upsert(stub, catalog, stored("fresh", OLD, 110))
    upsert(stub, catalog, stored("fresh", NEW, 210))
    assert stub.Stats(r.StatsRequest(catalog=catalog)).next_items == 2

    # Searches are routed by the model of their vectors.
    assert set(search(stub, catalog, 200, model=NEW)) == {"i0", "fresh"}
    assert set(search(stub, catalog, 100)) == {"i0", "i1", "i2", "i3", "fresh"}
    listed = stub.ListItems(r.ListItemsRequest(catalog=catalog, limit=3))
    assert [i.item_id for i in listed.items] == ["fresh", "i0", "i1"]
    assert listed.next_after_item_id == "i1"
    assert listed.items[1].source_uri == "/photos/i0.jpg" and listed.items[1].model_version == OLD
    rest = stub.ListItems(r.ListItemsRequest(catalog=catalog, limit=3, after_item_id="i1"))
    assert ([i.item_id for i in rest.items], rest.next_after_item_id) == (["i2", "i3"], "")
    in_next = stub.ListItems(r.ListItemsRequest(catalog=catalog, model=NEW))
    assert [i.item_id for i in in_next.items] == ["fresh", "i0"]

    record = migrate(stub, catalog, Action.SWITCH)
    assert (record.live.embedder, record.previous.embedder) == (NEW, OLD)
    assert not record.HasField("next")
    assert set(search(stub, catalog, 200)) == {"i0", "fresh"}  # live is the new collection
    # The previous collection is still written (rollback loses nothing), and deletes reach
    # every collection.
    upsert(stub, catalog, stored("late", OLD, 120))
    upsert(stub, catalog, stored("late", NEW, 220))
    stub.Delete(r.DeleteItemRequest(item_id="fresh", catalog=catalog))
    assert "fresh" not in search(stub, catalog, 210, model=NEW)
    assert "fresh" not in search(stub, catalog, 110, model=OLD)
    assert "drop-previous" in refused(lambda: migrate(stub, catalog, Action.BEGIN, OTHER))

    record = migrate(stub, catalog, Action.ROLLBACK)
    assert (record.live.embedder, record.previous.embedder) == (OLD, NEW)
    assert set(search(stub, catalog, 100)) == {"i0", "i1", "i2", "i3", "late"}
    record = migrate(stub, catalog, Action.ROLLBACK)  # and forward again
    assert record.live.embedder == NEW

    record = migrate(stub, catalog, Action.DROP_PREVIOUS)
    assert not record.HasField("previous")
    assert OLD in refused(lambda: upsert(stub, catalog, stored("older", OLD, 130)))
    refused(lambda: migrate(stub, catalog, Action.DROP_PREVIOUS))
    refused(lambda: migrate(stub, catalog, Action.ABORT))

    # Begin again and abort: the next collection goes, the live one stays.
    record = migrate(stub, catalog, Action.BEGIN, OTHER)
    assert record.next.collection == collection(f"{catalog}__g2")
    record = migrate(stub, catalog, Action.ABORT)
    assert not record.HasField("next") and record.live.embedder == NEW
    assert migrate(stub, catalog, Action.STATUS) == record
    names = [s.catalog for s in stub.ListCatalogs(r.RetrievalListCatalogsRequest()).catalogs]
    assert catalog in names and not any("__" in name for name in names)
    assert set(search(stub, catalog, 200)) == {"i0", "late"}
    assert (
        REGISTRY.get_sample_value(
            "loupe_catalog_model_info", {"catalog": catalog, "embedder": OLD, "role": "previous"}
        )
        is None
    )


def test_dropping_a_catalogue_drops_every_collection_and_its_record(
    stub: retrieval_pb2_grpc.RetrievalServiceStub,
) -> None:
    upsert(stub, "gone", stored("a", OLD, 300))
    migrate(stub, "gone", Action.BEGIN, NEW)
    assert stub.DropCatalog(r.RetrievalDropCatalogRequest(catalog="gone")).dropped
    refused(lambda: migrate(stub, "gone", Action.STATUS), grpc.StatusCode.NOT_FOUND)
    # A new catalogue of that name starts afresh, bound by its first write.
    upsert(stub, "gone", stored("b", NEW, 301))
    record = migrate(stub, "gone", Action.STATUS)
    assert (record.live.embedder, record.live.collection) == (NEW, collection("gone"))


def test_a_reader_replica_follows_a_switch_without_failing_a_search(tmp_path: Path) -> None:
    """The writer switches; a reader replica of the same Milvus answers every search
    throughout: searches naming either model are routed (a model it does not know yet makes
    it re-read the records at once), and a search naming none follows the switch within
    LOUPE_RETRIEVAL_CATALOG_REFRESH_SECONDS."""
    settings = settings_for(tmp_path)
    with serving(RetrievalService(settings)) as writer_channel:
        writer = retrieval_pb2_grpc.RetrievalServiceStub(writer_channel)
        for k in range(3):
            upsert(writer, "shared", stored(f"s{k}", OLD, 500 + k))
        reader_settings = dataclasses.replace(settings, role="reader", catalog_refresh_seconds=1.0)
        with serving(RetrievalService(reader_settings)) as reader_channel:
            reader = retrieval_pb2_grpc.RetrievalServiceStub(reader_channel)
            assert search(reader, "shared", 501)[0] == "s1"
            migrate(writer, "shared", Action.BEGIN, NEW)
            upsert(writer, "shared", stored("s1", NEW, 601), if_live="hash-s1")
            # Names a model the reader has not seen bound yet: it re-reads, then answers.
            assert search(reader, "shared", 601, model=NEW) == ["s1"]
            started = time.monotonic()
            migrate(writer, "shared", Action.SWITCH)
            switched = time.monotonic()
            seen, searches = None, 0
            while time.monotonic() - switched < 5:
                assert search(reader, "shared", 501, model=OLD)[0] == "s1"  # previous
                live = search(reader, "shared", 601)
                searches += 1
                if live == ["s1"] and seen is None:
                    seen = time.monotonic() - switched
                    break
            assert seen is not None and seen <= reader_settings.catalog_refresh_seconds + 0.5
            print(
                f"switch: {1000 * (switched - started):.0f} ms at the writer; a reader "
                f"searched the new collection {1000 * seen:.0f} ms later "
                f"({searches} searches meanwhile, none failed)"
            )
    drop(settings)
