"""RetrievalService against a real milvus-lite through real gRPC.

Set LOUPE_TEST_MILVUS_URI (e.g. http://127.0.0.1:19530) to run the same tests against a Milvus
server instead; each run then uses collections of its own and drops them afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from loupe.v1 import common_pb2 as c
from loupe.v1 import retrieval_pb2 as r
from loupe.v1 import retrieval_pb2_grpc
from services.common.config import ConfigError
from services.retrieval.service import RetrievalService
from services.retrieval.settings import RetrievalSettings
from tests.support import serving

# Enough bits that random vectors' binary codes do not collide.
DIM = 64
SERVER_URI = os.environ.get("LOUPE_TEST_MILVUS_URI", "")
HOSTILE = [
    'x" or item_id != "',
    "') or true or ('",
    "back\\slash",
    "\\",
    'quote\\"d',
    "it's",
    "ü中😀",
    "line\nbreak",
    "tab\tNUL\x00",
    "plain",
]
rng = np.random.default_rng(7)


def settings_for(data_dir: Path, code: str = "binary", dba: int = 0) -> RetrievalSettings:
    defaults = RetrievalSettings.from_env()
    return dataclasses.replace(
        defaults,
        data_dir=data_dir,
        milvus_uri=SERVER_URI or str(data_dir / "milvus.db"),
        milvus_token="",
        db_name="",
        collection_prefix=f"test_{uuid.uuid4().hex}" if SERVER_URI else "loupe",
        dim=DIM,
        candidate_code=code,
        index_type="BIN_FLAT" if code == "binary" else "FLAT",
        index_params={},
        search_params={},
        dba_neighbours=dba,
        dba_alpha=0.0,
        dba_refresh_seconds=0.0,
    )


def drop(settings: RetrievalSettings) -> None:
    if SERVER_URI:
        from pymilvus import MilvusClient

        client = MilvusClient(uri=SERVER_URI)
        for name in client.list_collections():
            if name.startswith(settings.collection_prefix):
                client.drop_collection(name)
        client.close()


# Every test runs with binary codes in the index (the default) and with the float vectors.
@pytest.fixture(scope="module", params=["binary", "float"])
def stub(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[retrieval_pb2_grpc.RetrievalServiceStub]:
    settings = settings_for(tmp_path_factory.mktemp("retrieval"), request.param)
    with serving(RetrievalService(settings)) as channel:
        yield retrieval_pb2_grpc.RetrievalServiceStub(channel)
    drop(settings)


def vector() -> c.Vector:
    values = rng.standard_normal(DIM)
    return c.Vector(values=(values / np.linalg.norm(values)).tolist())


def item(
    item_id: str, objects: int = 1, metadata: dict[str, c.Value] | None = None
) -> r.StoredItem:
    stored = r.StoredItem(
        item_id=item_id,
        content_hash=f"hash-{item_id}",
        model_version="test-1",
        image_width=640,
        image_height=480,
        metadata=metadata or {},
    )
    stored.objects.add(object_index=0, vector=vector())
    for index in range(1, objects):
        stored.objects.add(
            object_index=index,
            box=c.Box(x0=index, y0=2, x1=index + 50, y1=60),
            label="bag",
            detection_score=0.5,
            vector=vector(),
        )
    return stored


def suite(name: str) -> dict[str, c.Value]:
    """Metadata that keeps each test's items apart in the shared collection."""
    return {"suite": c.Value(string_value=name)}


def only(name: str, *conditions: c.Condition) -> c.Filter:
    return c.Filter(
        all=[c.Condition(field="suite", equals=c.Value(string_value=name)), *conditions]
    )


def search(stub, query: c.Vector, limit: int = 50, **kwargs) -> list[r.Candidate]:
    request = r.RetrievalSearchRequest(query=query, limit=limit, **kwargs)
    return list(stub.Search(request).candidates)


def lookup(stub, item_id: str, include_vectors: bool = False) -> list[r.StoredItem]:
    request = r.LookupRequest(item_id=item_id, include_vectors=include_vectors)
    return list(stub.Lookup(request).items)


def test_upsert_then_search_finds_it(stub) -> None:
    stored = item("raw/1", 2, {**suite("raw"), "popularity": c.Value(number_value=7)})
    response = stub.Upsert(r.UpsertRequest(item=stored))
    assert (response.rows, response.replaced) == (2, False)

    best = search(stub, stored.objects[1].vector, include_vectors=True)[0]
    assert (best.item_id, best.object_index, best.label) == ("raw/1", 1, "bag")
    assert best.ann_score == pytest.approx(1.0, abs=1e-5)
    assert (best.box.x0, best.box.y0, best.box.x1, best.box.y1) == (1, 2, 51, 60)
    assert list(best.vector.values) == pytest.approx(list(stored.objects[1].vector.values))
    assert best.metadata["popularity"].number_value == 7
    assert not search(stub, stored.objects[0].vector)[0].vector.values

    (found,) = lookup(stub, "raw/1", include_vectors=True)
    assert found.content_hash == "hash-raw/1" and found.model_version == "test-1"
    assert (found.image_width, found.image_height) == (640, 480)
    assert [o.object_index for o in found.objects] == [0, 1]
    assert not found.objects[0].HasField("box")
    assert found.objects[1].box.x1 == 51 and found.objects[1].detection_score == 0.5
    assert len(found.objects[0].vector.values) == DIM
    assert not lookup(stub, "raw/1")[0].objects[0].vector.values


def test_reupsert_with_fewer_objects_removes_extra_rows(stub) -> None:
    stub.Upsert(r.UpsertRequest(item=item("shrink", objects=3, metadata=suite("shrink"))))
    assert len(lookup(stub, "shrink")[0].objects) == 3

    smaller = item("shrink", objects=1, metadata=suite("shrink"))
    response = stub.Upsert(r.UpsertRequest(item=smaller))
    assert (response.rows, response.replaced) == (1, True)
    (found,) = lookup(stub, "shrink", include_vectors=True)
    assert [o.object_index for o in found.objects] == [0]
    assert list(found.objects[0].vector.values) == pytest.approx(
        list(smaller.objects[0].vector.values)
    )
    assert [(x.item_id, x.object_index) for x in search(stub, vector(), filter=only("shrink"))] == [
        ("shrink", 0)
    ]


def test_delete_removes_every_row_and_lookup_then_finds_nothing(stub) -> None:
    stored = item("gone", objects=3, metadata=suite("gone"))
    stub.Upsert(r.UpsertRequest(item=stored))
    assert stub.Delete(r.DeleteItemRequest(item_id="gone")).rows_deleted == 3
    assert lookup(stub, "gone") == []
    assert search(stub, stored.objects[0].vector, filter=only("gone")) == []
    assert stub.Delete(r.DeleteItemRequest(item_id="gone")).rows_deleted == 0


def test_lookup_by_content_hash(stub) -> None:
    for item_id in ("dup-b", "dup-a", "other"):
        stored = item(item_id, objects=2)
        stored.content_hash = "same" if item_id.startswith("dup") else "different"
        stub.Upsert(r.UpsertRequest(item=stored))
    items = stub.Lookup(r.LookupRequest(content_hash="same")).items
    assert [(i.item_id, len(i.objects)) for i in items] == [("dup-a", 2), ("dup-b", 2)]
    assert len(stub.Lookup(r.LookupRequest(content_hash="same", limit=1)).items) == 1
    assert list(stub.Lookup(r.LookupRequest(content_hash="nothing")).items) == []


def test_filters_match_hostile_strings_literally(stub) -> None:
    ids = {}
    for k, text in enumerate(HOSTILE):
        ids[text] = f"hostile-{k}"
        metadata = {
            **suite("hostile"),
            "color": c.Value(string_value=text),
            "size": c.Value(number_value=k),
            "sale": c.Value(bool_value=k % 2 == 0),
        }
        stored = item(ids[text], metadata=metadata)
        stub.Upsert(r.UpsertRequest(item=stored))

    def found(*conditions: c.Condition) -> set[str]:
        return {x.item_id for x in search(stub, vector(), filter=only("hostile", *conditions))}

    for text in HOSTILE:
        value = c.Value(string_value=text)
        assert found(c.Condition(field="color", equals=value)) == {ids[text]}, text
        assert found(c.Condition(field="color", not_equals=value)) == set(ids.values()) - {
            ids[text]
        }
    either = c.ValueList(
        values=[c.Value(string_value=t) for t in HOSTILE[:2]] + [c.Value(number_value=1)]
    )
    assert found(c.Condition(field="color", any_of=either)) == {ids[t] for t in HOSTILE[:2]}
    assert found(c.Condition(field="size", any_of=either)) == {"hostile-1"}
    assert found(c.Condition(field="size", range=c.Range(gte=2, lt=4))) == {
        "hostile-2",
        "hostile-3",
    }
    assert found(c.Condition(field="size", range=c.Range(gt=-1.5, lte=0))) == {"hostile-0"}
    assert found(
        c.Condition(field="sale", equals=c.Value(bool_value=True)),
        c.Condition(field="size", range=c.Range(lt=5)),
    ) == {"hostile-0", "hostile-2", "hostile-4"}
    assert found(c.Condition(field="missing", equals=c.Value(string_value="x"))) == set()


def test_exclude_item_ids(stub) -> None:
    for item_id in ('ex"1', "ex-2", "ex-3"):
        stub.Upsert(r.UpsertRequest(item=item(item_id, metadata=suite("exclude"))))
    found = search(stub, vector(), filter=only("exclude"), exclude_item_ids=['ex"1', "ex-3"])
    assert [x.item_id for x in found] == ["ex-2"]


def test_whole_images_only(stub) -> None:
    stored = item("whole", objects=3, metadata=suite("whole"))
    stub.Upsert(r.UpsertRequest(item=stored))
    assert len(search(stub, vector(), filter=only("whole"))) == 3
    found = search(stub, stored.objects[2].vector, filter=only("whole"), whole_images_only=True)
    assert [(x.item_id, x.object_index) for x in found] == [("whole", 0)]
    assert not found[0].HasField("box")


@pytest.mark.parametrize(
    ("call", "request_", "message"),
    [
        (
            "Search",
            r.RetrievalSearchRequest(query=c.Vector(values=[1.0] * 3), limit=5),
            f"expected {DIM}",
        ),
        ("Search", r.RetrievalSearchRequest(query=c.Vector(values=[1.0] * DIM)), "limit=0"),
        (
            "Search",
            r.RetrievalSearchRequest(
                query=c.Vector(values=[1.0] * DIM),
                limit=5,
                filter=c.Filter(all=[c.Condition(field='a"]', equals=c.Value(number_value=1))]),
            ),
            "not a metadata key",
        ),
        ("Upsert", r.UpsertRequest(item=r.StoredItem(item_id="x")), "object indexes"),
        ("Delete", r.DeleteItemRequest(), "item_id is empty"),
        ("Delete", r.DeleteItemRequest(item_id="x", catalog="Shoes"), "catalog 'Shoes'"),
        ("Upsert", r.UpsertRequest(item=r.StoredItem(item_id="x"), catalog="a-b"), "catalog"),
        ("Lookup", r.LookupRequest(), "set item_id or content_hash"),
    ],
)
def test_caller_errors_are_invalid_argument(stub, call: str, request_, message: str) -> None:
    with pytest.raises(grpc.RpcError) as error:
        getattr(stub, call)(request_)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()


def test_upsert_validates_vectors_and_metadata(stub) -> None:
    wrong_dim = item("bad")
    wrong_dim.objects[0].vector.values.append(0.5)
    not_finite = item("bad")
    not_finite.objects[0].vector.values[0] = float("nan")
    bad_key = item("bad", metadata={"bad key": c.Value(number_value=1)})
    for stored, message in [
        (wrong_dim, f"{DIM + 1} values; expected {DIM}"),
        (not_finite, "finite"),
        (bad_key, "not a name"),
        (item("x" * 513), "513 characters"),
        (item("\x85"), "control character"),
        (item("new\nline"), "control character"),
    ]:
        with pytest.raises(grpc.RpcError) as error:
            stub.Upsert(r.UpsertRequest(item=stored))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in error.value.details()
    assert lookup(stub, "bad") == []


def test_longest_item_id_in_any_script(stub) -> None:
    item_id = "中" * 512  # 1536 bytes in UTF-8
    stored = item(item_id, objects=2)
    stored.content_hash = "long-id"
    assert stub.Upsert(r.UpsertRequest(item=stored)).rows == 2
    assert [i.item_id for i in lookup(stub, item_id)] == [item_id]
    assert stub.Delete(r.DeleteItemRequest(item_id=item_id)).rows_deleted == 2


def test_stats(stub) -> None:
    stub.Upsert(r.UpsertRequest(item=item("stats", objects=2)))
    stats = stub.Stats(r.StatsRequest())
    assert stats.rows >= 2 and stats.items >= 1 and stats.catalog == "default"
    assert stats.dimension == DIM and stats.full_vector_bytes == 4 * DIM
    assert stats.collection.endswith("__default")
    if stats.candidate_code == "binary":
        # One bit per dimension: 1/32 of the float32 vector; scores are estimates.
        assert (stats.index_type, stats.code_bytes, stats.exact_scores) == ("BIN_FLAT", 8, False)
    else:
        # FLAT scores with the raw vectors: nothing to gain from re-scoring them.
        assert (stats.index_type, stats.code_bytes, stats.exact_scores) == ("FLAT", 4 * DIM, True)


def test_catalogues_are_separate(stub) -> None:
    stored = item("cat-1", objects=2)
    assert stub.Upsert(r.UpsertRequest(item=stored, catalog="shoes")).rows == 2
    in_shoes = search(stub, stored.objects[0].vector, catalog="shoes")
    assert [x.item_id for x in in_shoes][:1] == ["cat-1"]
    assert "cat-1" not in {x.item_id for x in search(stub, stored.objects[0].vector)}
    assert lookup(stub, "cat-1") == []
    assert stub.Lookup(r.LookupRequest(item_id="cat-1", catalog="shoes")).items
    names = {x.catalog: x for x in stub.ListCatalogs(r.RetrievalListCatalogsRequest()).catalogs}
    assert {"default", "shoes"} <= set(names) and names["shoes"].items == 1
    assert stub.Stats(r.StatsRequest(catalog="shoes")).rows == 2

    assert stub.DropCatalog(r.RetrievalDropCatalogRequest(catalog="shoes")).dropped
    assert not stub.DropCatalog(r.RetrievalDropCatalogRequest(catalog="shoes")).dropped
    with pytest.raises(grpc.RpcError) as error:
        search(stub, stored.objects[0].vector, catalog="shoes")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "catalog 'shoes' does not exist" in error.value.details()
    # Reads of a missing catalogue find nothing; deletes delete nothing.
    assert stub.Lookup(r.LookupRequest(item_id="cat-1", catalog="shoes")).items == []
    assert stub.Delete(r.DeleteItemRequest(item_id="cat-1", catalog="shoes")).rows_deleted == 0


def test_distinct_items_keeps_one_row_per_item(stub) -> None:
    """An item with many objects near the query must not crowd the others out."""
    query = np.asarray(vector().values)
    crowd = r.StoredItem(
        item_id="crowd", content_hash="h", model_version="m", metadata=suite("crowd")
    )
    for index in range(8):
        near = query + 0.01 * rng.standard_normal(DIM)
        crowd.objects.add(
            object_index=index,
            vector=c.Vector(values=near.tolist()),
            box=c.Box(x0=0, y0=0, x1=9, y1=9) if index else None,
        )
    stub.Upsert(r.UpsertRequest(item=crowd))
    for k in range(3):
        stub.Upsert(r.UpsertRequest(item=item(f"crowd-other-{k}", metadata=suite("crowd"))))
    q = c.Vector(values=query.tolist())
    rows = search(stub, q, limit=4, filter=only("crowd"))
    assert {x.item_id for x in rows} == {"crowd"}
    distinct = search(stub, q, limit=4, filter=only("crowd"), distinct_items=True)
    assert sorted(x.item_id for x in distinct) == [
        "crowd",
        "crowd-other-0",
        "crowd-other-1",
        "crowd-other-2",
    ]


def test_restart_keeps_data(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    stored = item("kept", objects=2)
    with serving(RetrievalService(settings)) as channel:
        first = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        assert search(first, vector()) == []  # an empty collection is not an error
        first.Upsert(r.UpsertRequest(item=stored))
    with serving(RetrievalService(settings)) as channel:
        again = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        (found,) = lookup(again, "kept")
        assert len(found.objects) == 2
        assert search(again, stored.objects[0].vector)[0].item_id == "kept"
    drop(settings)


def test_another_dimension_stops_start_up(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    with serving(RetrievalService(settings)):
        pass
    service = RetrievalService(dataclasses.replace(settings, dim=DIM * 2))
    with pytest.raises(ConfigError, match=f"not made by this configuration.*DIM={DIM * 2}"):
        asyncio.run(service.start())
    asyncio.run(service.close())
    drop(settings)


@pytest.mark.skipif(bool(SERVER_URI), reason="stops milvus-lite under the service")
def test_milvus_failure_is_unavailable_and_names_the_uri(tmp_path: Path) -> None:
    from milvus_lite.server_manager import server_manager_instance

    settings = dataclasses.replace(
        settings_for(tmp_path), milvus_token="secret-token", timeout_seconds=1
    )
    with serving(RetrievalService(settings)) as channel:
        server_manager_instance.release_server(settings.milvus_uri)
        with pytest.raises(grpc.RpcError) as error:
            retrieval_pb2_grpc.RetrievalServiceStub(channel).Stats(r.StatsRequest())
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert settings.milvus_uri in error.value.details()
    assert "secret-token" not in error.value.details()


def test_database_side_augmentation(tmp_path: Path) -> None:
    """With DBA k=1 and alpha 0, a new item's stored vector is the mean of its own and its
    nearest neighbour's; duplicate detection still sees the vector as embedded; the batch
    job makes it symmetric."""
    settings = settings_for(tmp_path, dba=1)
    a, b = item("dba-a"), item("dba-b")
    va, vb = (np.asarray(x.objects[0].vector.values) for x in (a, b))

    def unit(v: np.ndarray) -> list[float]:
        return (v / np.linalg.norm(v)).tolist()

    with serving(RetrievalService(settings)) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        stub.Upsert(r.UpsertRequest(item=a))  # nothing to augment with yet
        stub.Upsert(r.UpsertRequest(item=b))
        stored = {i: lookup(stub, i, include_vectors=True)[0] for i in ("dba-a", "dba-b")}
        assert list(stored["dba-a"].objects[0].vector.values) == pytest.approx(unit(va), abs=1e-6)
        assert list(stored["dba-b"].objects[0].vector.values) == pytest.approx(
            unit(va + vb), abs=1e-6
        )
        raw = search(stub, a.objects[0].vector, include_vectors=True, raw_vectors=True)
        by_id = {x.item_id: list(x.vector.values) for x in raw}
        assert by_id["dba-b"] == pytest.approx(unit(vb), abs=1e-6)

        reply = stub.Augment(r.AugmentRequest())
        assert reply.items == 2
        (after,) = lookup(stub, "dba-a", include_vectors=True)
        assert list(after.objects[0].vector.values) == pytest.approx(unit(va + vb), abs=1e-6)
        # The batch job starts from the vectors as embedded: running it again changes nothing.
        stub.Augment(r.AugmentRequest())
        (again,) = lookup(stub, "dba-b", include_vectors=True)
        assert list(again.objects[0].vector.values) == pytest.approx(unit(va + vb), abs=1e-6)
    drop(settings)


def test_augmentation_refreshes_itself_once_writes_pause(tmp_path: Path) -> None:
    settings = dataclasses.replace(
        settings_for(tmp_path, dba=1), dba_refresh_seconds=0.3, dba_refresh_growth=0.5
    )
    a, b = item("auto-a"), item("auto-b")
    both = np.asarray(a.objects[0].vector.values) + np.asarray(b.objects[0].vector.values)
    with serving(RetrievalService(settings)) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        stub.Upsert(r.UpsertRequest(item=a))
        stub.Upsert(r.UpsertRequest(item=b))
        # a arrived first, with no neighbour; once writes pause, the batch job gives it b.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            # milvus-lite's upsert is a delete then an insert: a read in between, while the
            # job rewrites the catalogue, may miss the row for a moment.
            found = lookup(stub, "auto-a", include_vectors=True)
            vector = found[0].objects[0].vector.values if found else []
            if found and np.allclose(vector, both / np.linalg.norm(both), atol=1e-6):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the automatic DBA refresh did not run")
    drop(settings)


def test_batch_augmentation_refuses_a_catalogue_over_its_limit(tmp_path: Path) -> None:
    settings = dataclasses.replace(settings_for(tmp_path, dba=1), dba_batch_max_items=1)
    with serving(RetrievalService(settings)) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        stub.Upsert(r.UpsertRequest(item=item("cap-a")))
        stub.Upsert(r.UpsertRequest(item=item("cap-b")))
        with pytest.raises(grpc.RpcError) as error:
            stub.Augment(r.AugmentRequest())
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "LOUPE_DBA_BATCH_MAX_ITEMS" in error.value.details()
        # The service goes on: the items are there, searches work.
        assert len(search(stub, item("q").objects[0].vector)) == 2
    drop(settings)
