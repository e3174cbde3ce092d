"""RetrievalService against a real milvus-lite through real gRPC.

Set LOUPE_TEST_MILVUS_URI (e.g. http://127.0.0.1:19530) to run the same tests against a Milvus
server instead; each run then uses collections of its own and drops them afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
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

DIM = 8
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


def settings_for(data_dir: Path, collection: str = "loupe_items") -> RetrievalSettings:
    defaults = RetrievalSettings.from_env()
    return dataclasses.replace(
        defaults,
        data_dir=data_dir,
        milvus_uri=SERVER_URI or str(data_dir / "milvus.db"),
        milvus_token="",
        db_name="",
        collection=f"test_{uuid.uuid4().hex}" if SERVER_URI else collection,
        dim=DIM,
        index_type="FLAT",
        index_params={},
        search_params={},
    )


def drop(settings: RetrievalSettings) -> None:
    if SERVER_URI:
        from pymilvus import MilvusClient

        client = MilvusClient(uri=SERVER_URI)
        client.drop_collection(settings.collection)
        client.close()


@pytest.fixture(scope="module")
def stub(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[retrieval_pb2_grpc.RetrievalServiceStub]:
    settings = settings_for(tmp_path_factory.mktemp("retrieval"))
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
            "expected 8",
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
        (wrong_dim, "9 values; expected 8"),
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
    assert stats.rows >= 2
    assert (stats.dimension, stats.index_type) == (DIM, "FLAT")
    assert stats.collection
    # FLAT scores with the raw vectors: nothing to gain from re-scoring them.
    assert stats.exact_scores


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
    with pytest.raises(ConfigError, match="has vector dimension 8, but LOUPE_EMBEDDING_DIM=16"):
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
