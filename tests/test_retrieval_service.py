"""RetrievalService against a real milvus-lite through real gRPC.

Set LOUPE_TEST_MILVUS_URI (e.g. http://127.0.0.1:19530) to run the same tests against a Milvus
server instead; each run then uses collections of its own and drops them afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import signal
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
from services.common import vectors
from services.common.cache_keys import generation_key
from services.common.items import MAX_FILTER_CONDITIONS
from services.retrieval import augmentation, dba
from services.retrieval.service import RetrievalService
from services.retrieval.settings import RetrievalSettings
from tests.support import running_redis, serving

# Enough bits that random vectors' binary codes do not collide.
DIM = 64
# Stored vectors are int8 with a scale, and candidate vectors travel as float16.
STORED = 0.01
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
        # These tests read their own writes at once; a server's default (Bounded) may not.
        read_consistency="Strong",
        redis_url="",
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


def search_vectors(stub, query: c.Vector, limit: int = 50, **kwargs) -> dict[str, np.ndarray]:
    """Candidate (item_id, object_index) -> its vector, from the packed matrix."""
    request = r.RetrievalSearchRequest(query=query, limit=limit, include_vectors=True, **kwargs)
    reply = stub.Search(request)
    matrix = vectors.unpack(reply.vectors, len(reply.candidates))
    return {
        f"{x.item_id}#{x.object_index}": row
        for x, row in zip(reply.candidates, matrix, strict=True)
    }


def lookup(stub, item_id: str, include_vectors: bool = False) -> list[r.StoredItem]:
    request = r.LookupRequest(item_id=item_id, include_vectors=include_vectors)
    return list(stub.Lookup(request).items)


def test_upsert_then_search_finds_it(stub) -> None:
    stored = item("raw/1", 2, {**suite("raw"), "popularity": c.Value(number_value=7)})
    response = stub.Upsert(r.UpsertRequest(item=stored))
    assert (response.rows, response.replaced) == (2, False)

    best = search(stub, stored.objects[1].vector)[0]
    assert (best.item_id, best.object_index, best.label) == ("raw/1", 1, "bag")
    # Re-scored with the stored (int8) vector: the cosine, not a code's estimate.
    assert best.ann_score == pytest.approx(1.0, abs=1e-3)
    assert (best.box.x0, best.box.y0, best.box.x1, best.box.y1) == (1, 2, 51, 60)
    assert best.metadata["popularity"].number_value == 7
    assert not best.HasField("vector")
    packed = search_vectors(stub, stored.objects[1].vector)
    assert packed["raw/1#1"] == pytest.approx(list(stored.objects[1].vector.values), abs=STORED)
    reply = stub.Search(r.RetrievalSearchRequest(query=stored.objects[0].vector, limit=5))
    assert not reply.HasField("vectors")

    (found,) = lookup(stub, "raw/1", include_vectors=True)
    assert found.content_hash == "hash-raw/1" and found.model_version == "test-1"
    assert (found.image_width, found.image_height) == (640, 480)
    assert [o.object_index for o in found.objects] == [0, 1]
    assert not found.objects[0].HasField("box")
    assert found.objects[1].box.x1 == 51 and found.objects[1].detection_score == 0.5
    assert list(found.objects[0].vector.values) == pytest.approx(
        list(stored.objects[0].vector.values), abs=STORED
    )
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
        list(smaller.objects[0].vector.values), abs=STORED
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


def test_ids_with_quotes_are_written_replaced_and_deleted(stub) -> None:
    """milvus-lite's delete and upsert cannot match a primary key with a ' in it: row keys
    encode it, so such an item is replaced and deleted like any other."""
    for item_id in ("it's.jpg", 'say "cheese"', "100%'s", "a\\b"):
        first = item(item_id, objects=3, metadata=suite("quotes"))
        assert stub.Upsert(r.UpsertRequest(item=first)).rows == 3
        second = item(item_id, objects=1, metadata=suite("quotes"))
        assert stub.Upsert(r.UpsertRequest(item=second)).replaced
        (found,) = lookup(stub, item_id)
        assert (found.item_id, len(found.objects)) == (item_id, 1)
        hits = search(stub, second.objects[0].vector, filter=only("quotes"))
        assert hits[0].item_id == item_id
        assert stub.Delete(r.DeleteItemRequest(item_id=item_id)).rows_deleted == 1
        assert lookup(stub, item_id) == []


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


def test_the_largest_filter_is_searched_and_a_larger_one_is_invalid_argument(stub) -> None:
    """Milvus failed a chain of about 50 ANDs; the documented limit holds with the deepest
    conditions there are (four-bound ranges, three-type any_of), exclusions and whole images."""
    metadata = {**suite("big-filter"), "n": c.Value(number_value=5)}
    stored = item("big-filter", metadata=metadata)
    stub.Upsert(r.UpsertRequest(item=stored))
    stub.Upsert(r.UpsertRequest(item=item("big-filter-other", metadata=metadata)))
    deepest = [
        c.Condition(field="n", range=c.Range(gte=0, gt=-1, lte=10, lt=11))
        if i % 2
        else c.Condition(
            field="n",
            any_of=c.ValueList(
                values=[
                    c.Value(number_value=5),
                    c.Value(string_value="5"),
                    c.Value(bool_value=True),
                ]
            ),
        )
        for i in range(MAX_FILTER_CONDITIONS - 1)
    ]
    largest = only("big-filter", *deepest)
    assert len(largest.all) == MAX_FILTER_CONDITIONS
    found = search(
        stub,
        stored.objects[0].vector,
        filter=largest,
        exclude_item_ids=["big-filter-other"],
        whole_images_only=True,
    )
    assert [x.item_id for x in found] == ["big-filter"]

    larger = only("big-filter", *deepest, deepest[0])
    with pytest.raises(grpc.RpcError) as error:
        search(stub, stored.objects[0].vector, filter=larger)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{MAX_FILTER_CONDITIONS + 1} conditions" in error.value.details()
    assert f"the limit is {MAX_FILTER_CONDITIONS}" in error.value.details()


@pytest.mark.parametrize(
    ("call", "request_", "message"),
    [
        (
            "Search",
            r.RetrievalSearchRequest(query=c.Vector(values=[1.0] * 3), limit=5),
            f"holds {DIM}-d vectors; got 3-d",
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
        ("Lookup", r.LookupRequest(), "set item_id, item_ids or content_hash"),
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
    # Stored vectors: a float32 scale and one byte a dimension.
    assert stats.stored_vector_bytes == 4 + DIM
    assert stats.vector_store == ("fields" if SERVER_URI else "sidecar")
    # Candidates come back re-scored by their full vectors either way.
    assert stats.exact_scores
    if stats.candidate_code == "binary":
        # One bit per dimension: 1/32 of the float32 vector, oversampled and re-scored.
        assert (stats.index_type, stats.code_bytes, stats.code) == ("BIN_FLAT", 8, "simhash-v2")
        assert stats.oversampling == 4  # a small catalogue: the least
    else:
        assert (stats.index_type, stats.code_bytes, stats.code) == ("FLAT", 4 * DIM, "float")
        assert stats.oversampling == 1


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
        item_id="crowd", content_hash="h", model_version="test-1", metadata=suite("crowd")
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


def test_a_catalogue_keeps_its_layout_beside_new_settings(tmp_path: Path) -> None:
    """Settings shape new catalogues; one made before keeps its code and dimension, so a new
    configuration can be tried in a new catalogue beside it."""
    settings = settings_for(tmp_path)
    old = item("kept-binary", objects=2)
    with serving(RetrievalService(settings)) as channel:
        retrieval_pb2_grpc.RetrievalServiceStub(channel).Upsert(r.UpsertRequest(item=old))
    wider = dataclasses.replace(settings, dim=2 * DIM, candidate_code="float", index_type="FLAT")
    with serving(RetrievalService(wider)) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        assert search(stub, old.objects[0].vector)[0].item_id == "kept-binary"
        assert stub.Stats(r.StatsRequest()).code == "simhash-v2"
        # The old catalogue still takes its own dimension.
        assert stub.Upsert(r.UpsertRequest(item=item("still-64"))).written
        wide = r.StoredItem(item_id="wide", content_hash="w", model_version="test-1")
        values = rng.standard_normal(2 * DIM)
        wide.objects.add(object_index=0, vector=c.Vector(values=values.tolist()))
        stub.Upsert(r.UpsertRequest(item=wide, catalog="wide"))
        assert stub.Stats(r.StatsRequest(catalog="wide")).code == "float"
        assert search(stub, wide.objects[0].vector, catalog="wide")[0].item_id == "wide"
        with pytest.raises(grpc.RpcError) as error:
            stub.Upsert(r.UpsertRequest(item=wide))  # 128-d into the 64-d catalogue
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"{2 * DIM} values; expected {DIM}" in error.value.details()
    drop(settings)


def test_a_catalogue_made_before_layouts_is_adopted(tmp_path: Path) -> None:
    """A collection written by the Loupe before this one (float32 vectors as base64 text in
    the rows, simhash-v1 codes, no source_uri) is read, searched and written without a
    rewrite."""
    from pymilvus import DataType, MilvusClient

    from services.retrieval import codes

    settings = settings_for(tmp_path)
    client = MilvusClient(uri=settings.milvus_uri)
    name = f"{settings.collection_prefix}__legacy"
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=2100)
    schema.add_field("item_id", DataType.VARCHAR, max_length=2048)
    schema.add_field("object_index", DataType.INT32)
    schema.add_field("label", DataType.VARCHAR, max_length=64)
    schema.add_field("detection_score", DataType.FLOAT)
    schema.add_field("box", DataType.JSON)
    schema.add_field("code", DataType.BINARY_VECTOR, dim=DIM)
    schema.add_field("vector", DataType.VARCHAR, max_length=codes.encoded_length(DIM))
    schema.add_field("raw", DataType.VARCHAR, max_length=codes.encoded_length(DIM))
    schema.add_field("metadata", DataType.JSON)
    schema.add_field("content_hash", DataType.VARCHAR, max_length=64)
    schema.add_field("model_version", DataType.VARCHAR, max_length=64)
    schema.add_field("image_width", DataType.INT32)
    schema.add_field("image_height", DataType.INT32)
    client.create_collection(name, schema=schema, consistency_level="Strong")
    index = client.prepare_index_params()
    index.add_index("code", index_type="BIN_FLAT", metric_type="HAMMING")
    client.create_index(name, index)
    client.load_collection(name)
    old = np.asarray(vector().values, np.float32)
    client.insert(
        name,
        [
            {
                "pk": "old#0",
                "item_id": "old",
                "object_index": 0,
                "label": "",
                "detection_score": 0.0,
                "box": {},
                "code": codes.binary_codes(old[None, :])[0],
                "vector": codes.encode_vector(old),
                "raw": "",
                "metadata": {"suite": "legacy"},
                "content_hash": "h-old",
                "model_version": "embedder/1",
                "image_width": 1,
                "image_height": 1,
            }
        ],
    )
    client.close()
    with serving(RetrievalService(settings)) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        stats = stub.Stats(r.StatsRequest(catalog="legacy"))
        # Adopted as it is: bound to its rows' embedder, its own collection kept.
        assert (stats.record.live.embedder, stats.record.live.collection) == ("embedder/1", name)
        assert (stats.code, stats.vector_store, stats.stored_vector_bytes) == (
            "simhash-v1",
            "fields",
            4 * DIM,
        )
        (found,) = stub.Lookup(
            r.LookupRequest(item_id="old", catalog="legacy", include_vectors=True)
        ).items
        assert list(found.objects[0].vector.values) == pytest.approx(old.tolist(), abs=1e-6)
        query = c.Vector(values=old.tolist())
        assert search(stub, query, catalog="legacy")[0].item_id == "old"
        new = item("new", metadata=suite("legacy"))
        new.source_uri = "/photos/new.jpg"
        new.model_version = "embedder/1"
        stub.Upsert(r.UpsertRequest(item=new, catalog="legacy"))
        assert {x.item_id for x in search(stub, query, catalog="legacy")} == {"old", "new"}
        (again,) = stub.Lookup(r.LookupRequest(item_id="new", catalog="legacy")).items
        assert again.source_uri == ""  # the old schema has no field for it
    drop(settings)


def test_a_reader_replica_refuses_writes(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    with serving(RetrievalService(settings)) as channel:
        retrieval_pb2_grpc.RetrievalServiceStub(channel).Upsert(
            r.UpsertRequest(item=item("read-me"))
        )
    with serving(RetrievalService(dataclasses.replace(settings, role="reader"))) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        assert lookup(stub, "read-me")
        for call, request_ in (
            ("Upsert", r.UpsertRequest(item=item("x"))),
            ("Delete", r.DeleteItemRequest(item_id="read-me")),
            ("Augment", r.AugmentRequest()),
            ("DropCatalog", r.RetrievalDropCatalogRequest(catalog="default")),
        ):
            with pytest.raises(grpc.RpcError) as error:
                getattr(stub, call)(request_)
            assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "LOUPE_RETRIEVAL_WRITER_ADDR" in error.value.details()
        assert lookup(stub, "read-me")
    drop(settings)


def test_concurrent_upserts_are_written_in_batches(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from services.retrieval.writes import BATCH_ITEMS

    settings = settings_for(tmp_path)
    before = BATCH_ITEMS.collect()[0].samples
    count_before = next(s.value for s in before if s.name.endswith("_count"))
    with serving(RetrievalService(settings)) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        items = [item(f"batch-{k}", metadata=suite("batch")) for k in range(64)]
        with ThreadPoolExecutor(32) as pool:
            replies = list(pool.map(lambda x: stub.Upsert(r.UpsertRequest(item=x)), items))
        assert all(reply.written and reply.rows == 1 for reply in replies)
        assert len(search(stub, vector(), limit=100, filter=only("batch"))) == 64
    after = BATCH_ITEMS.collect()[0].samples
    batches = next(s.value for s in after if s.name.endswith("_count")) - count_before
    assert batches < 64, "32 calls in flight should share batches"
    drop(settings)


def test_duplicates_are_found_by_the_write_itself(tmp_path: Path) -> None:
    """Same bytes (content hash) and a near vector are reported by Upsert; with
    skip_duplicates nothing is written."""
    settings = settings_for(tmp_path, dba=2)
    with serving(RetrievalService(settings)) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        original = item("orig")
        stub.Upsert(r.UpsertRequest(item=original))
        copy = item("copy")
        copy.content_hash = original.content_hash
        reply = stub.Upsert(r.UpsertRequest(item=copy, near_duplicate_threshold=0.9))
        assert [(d.item_id, d.exact) for d in reply.duplicates][:1] == [("orig", True)]
        near = item("near")
        base = np.asarray(original.objects[0].vector.values)
        near.objects[0].vector.CopyFrom(
            c.Vector(values=(base + 0.05 * rng.standard_normal(DIM) / np.sqrt(DIM)).tolist())
        )
        reply = stub.Upsert(
            r.UpsertRequest(item=near, near_duplicate_threshold=0.95, skip_duplicates=True)
        )
        assert not reply.written and reply.rows == 0
        assert [(d.item_id, d.exact) for d in reply.duplicates][0] == ("orig", False)
        assert reply.duplicates[0].similarity > 0.95
        assert lookup(stub, "near") == []
        # The same item again, same bytes: the write says so.
        assert stub.Upsert(r.UpsertRequest(item=original)).same_content
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


def milvus_lite_pid(db_file: Path) -> int:
    """The milvus-lite process serving this file (a child of this test process)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            status = (proc / "status").read_text()
        except OSError:
            continue
        parent = next(line.split()[1] for line in status.splitlines() if line.startswith("PPid"))
        if int(parent) == os.getpid() and str(db_file).encode() in args:
            return int(proc.name)
    raise AssertionError(f"no milvus-lite process for {db_file}")


@pytest.mark.skipif(bool(SERVER_URI), reason="stops milvus-lite under the service")
def test_a_hung_milvus_is_unavailable_naming_it_and_then_recovers(tmp_path: Path) -> None:
    """pymilvus raises a bare gRPC DEADLINE_EXCEEDED when Milvus does not answer; it was an
    INTERNAL "internal error in Search". Milvus is really hung here: its process is stopped."""
    settings = dataclasses.replace(settings_for(tmp_path), timeout_seconds=1)
    stored = item("hang-1", metadata=suite("hang"))
    with serving(RetrievalService(settings)) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        stub.Upsert(r.UpsertRequest(item=stored))
        pid = milvus_lite_pid(Path(settings.milvus_uri))
        calls = {
            "Search": lambda: search(stub, stored.objects[0].vector),
            "Stats": lambda: stub.Stats(r.StatsRequest()),
            "Upsert": lambda: stub.Upsert(r.UpsertRequest(item=item("hang-2"))),
            "UpsertItems": lambda: stub.UpsertItems(
                r.UpsertItemsRequest(items=[r.UpsertRequest(item=item("hang-3"))])
            ),
            "Delete": lambda: stub.Delete(r.DeleteItemRequest(item_id="hang-1")),
            "ListCatalogs": lambda: stub.ListCatalogs(r.RetrievalListCatalogsRequest()),
            "DropCatalog": lambda: stub.DropCatalog(r.RetrievalDropCatalogRequest(catalog="other")),
        }
        os.kill(pid, signal.SIGSTOP)
        try:
            for name, call in calls.items():
                if name == "UpsertItems":
                    (result,) = call().results
                    code, details = grpc.StatusCode.UNAVAILABLE.value[0], result.error
                    assert result.code == code, name
                else:
                    with pytest.raises(grpc.RpcError) as error:
                        call()
                    assert error.value.code() == grpc.StatusCode.UNAVAILABLE, name
                    details = error.value.details()
                assert f"Milvus at {settings.milvus_uri}" in details, name
                assert "failed" in details and "internal error" not in details, name
            assert "DEADLINE_EXCEEDED" in details
        finally:
            os.kill(pid, signal.SIGCONT)
        # Calls sent meanwhile may still be carried out (the Delete); new ones succeed.
        again = item("hang-4", metadata=suite("hang"))
        assert stub.Upsert(r.UpsertRequest(item=again)).written
        assert [x.item_id for x in search(stub, again.objects[0].vector)][:1] == ["hang-4"]


def generation(port: int, catalog: str = "default") -> int:
    import redis

    with redis.Redis(port=port) as client:
        return int(client.get(generation_key(catalog)) or 0)


@pytest.mark.skipif(bool(SERVER_URI), reason="stops milvus-lite under the service")
def test_every_change_bumps_the_generation_even_one_that_fails(tmp_path: Path) -> None:
    """Whoever calls retrieval, each change makes the gateway's cached results unreachable;
    so does one that failed partway (the sidecar changes first, and a late Milvus still
    carries a call out)."""
    with running_redis(tmp_path) as port:
        settings = dataclasses.replace(
            settings_for(tmp_path),
            redis_url=f"redis://127.0.0.1:{port}/0",
            timeout_seconds=1,
            dba_neighbours=1,
        )
        with serving(RetrievalService(settings)) as channel:
            stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
            bumps = [
                lambda: stub.Upsert(r.UpsertRequest(item=item("gen-1"))),
                lambda: stub.UpsertItems(
                    r.UpsertItemsRequest(items=[r.UpsertRequest(item=item("gen-2"))])
                ),
                lambda: stub.UpdateItem(
                    r.UpdateItemRequest(item_id="gen-1", metadata={"x": c.Value(number_value=1)})
                ),
                lambda: stub.Delete(r.DeleteItemRequest(item_id="gen-2")),
                lambda: stub.Augment(r.AugmentRequest()),
            ]
            for number, call in enumerate(bumps, 1):
                call()
                assert generation(port) == number, number
            # No change, no bump.
            stub.Delete(r.DeleteItemRequest(item_id="never-stored"))
            assert generation(port) == len(bumps)
            stub.Upsert(r.UpsertRequest(item=item("gen-3"), catalog="other"))
            stub.DropCatalog(r.RetrievalDropCatalogRequest(catalog="other"))
            assert generation(port, "other") == 2 and generation(port) == len(bumps)

            pid = milvus_lite_pid(Path(settings.milvus_uri))
            os.kill(pid, signal.SIGSTOP)
            try:
                for call in (
                    lambda: stub.Delete(r.DeleteItemRequest(item_id="gen-1")),
                    lambda: stub.Upsert(r.UpsertRequest(item=item("gen-4"))),
                ):
                    with pytest.raises(grpc.RpcError) as error:
                        call()
                    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            finally:
                os.kill(pid, signal.SIGCONT)
            assert generation(port) == len(bumps) + 2


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
        assert list(stored["dba-a"].objects[0].vector.values) == pytest.approx(unit(va), abs=STORED)
        assert list(stored["dba-b"].objects[0].vector.values) == pytest.approx(
            unit(va + vb), abs=STORED
        )
        # Duplicates are judged on the vectors as embedded: b again is b, not b's average.
        again = item("dba-b-again")
        again.objects[0].vector.CopyFrom(b.objects[0].vector)
        reply = stub.Upsert(r.UpsertRequest(item=again, near_duplicate_threshold=0.999))
        assert [d.item_id for d in reply.duplicates] == ["dba-b"]
        stub.Delete(r.DeleteItemRequest(item_id="dba-b-again"))

        reply = stub.Augment(r.AugmentRequest())
        assert reply.items == 2
        (after,) = lookup(stub, "dba-a", include_vectors=True)
        assert list(after.objects[0].vector.values) == pytest.approx(unit(va + vb), abs=STORED)
        # The batch job starts from the vectors as embedded: running it again changes nothing.
        stub.Augment(r.AugmentRequest())
        (again_b,) = lookup(stub, "dba-b", include_vectors=True)
        assert list(again_b.objects[0].vector.values) == pytest.approx(unit(va + vb), abs=STORED)
    drop(settings)


def test_batch_augmentation_pages_through_the_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch job works a page at a time with neighbours from the index, whatever the
    catalogue's size; on a catalogue small enough for its shortlist to see every item, it
    matches the exact n^2 computation."""
    monkeypatch.setattr(dba, "PAGE", 16)
    settings = dataclasses.replace(settings_for(tmp_path, dba=3), dba_alpha=3.0)
    embedded = augmentation.normalise(rng.standard_normal((40, DIM))).astype(np.float32)
    with serving(RetrievalService(settings)) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        for k, values in enumerate(embedded):
            stored = r.StoredItem(
                item_id=f"page-{k:02d}", content_hash=f"p{k}", model_version="test-1"
            )
            stored.objects.add(object_index=0, vector=c.Vector(values=values.tolist()))
            stub.Upsert(r.UpsertRequest(item=stored))
        assert stub.Augment(r.AugmentRequest()).items == 40
        expected = augmentation.augment_all(embedded, 3, 3.0)
        for k in range(40):
            (found,) = lookup(stub, f"page-{k:02d}", include_vectors=True)
            assert list(found.objects[0].vector.values) == pytest.approx(
                expected[k].tolist(), abs=2 * STORED
            )
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
            if found and np.allclose(vector, both / np.linalg.norm(both), atol=STORED):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the automatic DBA refresh did not run")
    drop(settings)


def test_update_item_keeps_vectors(stub) -> None:
    stored = item("update-me", objects=2, metadata=suite("update"))
    stub.Upsert(r.UpsertRequest(item=stored))
    before = lookup(stub, "update-me", include_vectors=True)[0]
    reply = stub.UpdateItem(
        r.UpdateItemRequest(
            item_id="update-me",
            metadata={**suite("update"), "price": c.Value(number_value=9)},
            source_uri="s3://bucket/update-me.jpg",
        )
    )
    assert reply.found
    after = lookup(stub, "update-me", include_vectors=True)[0]
    assert after.metadata["price"].number_value == 9
    assert after.source_uri == "s3://bucket/update-me.jpg"
    for old, new in zip(before.objects, after.objects, strict=True):
        assert list(new.vector.values) == pytest.approx(list(old.vector.values), abs=1e-6)
    priced = c.Condition(field="price", range=c.Range(gte=9))
    assert {x.item_id for x in search(stub, vector(), filter=only("update", priced))} == {
        "update-me"
    }
    assert not stub.UpdateItem(r.UpdateItemRequest(item_id="nobody")).found


@pytest.mark.skipif(not SERVER_URI, reason="milvus-lite has no segments to seal")
def test_a_server_seals_and_indexes_what_a_load_wrote(tmp_path: Path) -> None:
    """On a server, rows stay in growing segments (searched exhaustively) until sealed: once
    writes pause, retrieval flushes, and Milvus builds the index on them."""
    settings = dataclasses.replace(settings_for(tmp_path), dba_refresh_seconds=0.5)
    with serving(RetrievalService(settings)) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        for k in range(30):
            stub.Upsert(r.UpsertRequest(item=item(f"seal-{k}")))
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            stats = stub.Stats(r.StatsRequest())
            if stats.indexed_rows >= 30:
                break
            time.sleep(1)
        else:
            raise AssertionError(f"index built on {stats.indexed_rows} of {stats.rows} rows")
    drop(settings)
