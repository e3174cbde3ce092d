"""Regression tests for the defects found by trying Loupe as a new user would, through a whole
stack as users run it (`loupe up`: five service processes, milvus-lite and redis-server on
loopback), with the `loupe` command and the gateway's API:

- an item id with a quote (`it's.jpg`) was never stored (UNAVAILABLE "Milvus … upsert failed");
- a filter of 50 or more conditions got UNAVAILABLE from Milvus, not INVALID_ARGUMENT;
- a change made by a direct call to retrieval left the gateway's cached results stale;
- a hung Milvus was INTERNAL "internal error in Search", and `loupe index` exited 0 when every
  file was skipped because the store failed;
- logs were not all JSON lines.

Tests run in file order and share one stack; the fault (milvus-lite stopped) comes last but
one, and the last test stops the stack and reads every service's log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from loupe.v1 import common_pb2 as c
from loupe.v1 import gateway_pb2, retrieval_pb2, retrieval_pb2_grpc
from services.common.items import MAX_FILTER_CONDITIONS
from tests.integration.stacks import SERVICES, Stack, running_stack

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("LOUPE_SHARED_DIR", ROOT.parent / "shared"))
COREL = SHARED / "data" / "corel1k" / "images"
COCO_PERSON = SHARED / "data" / "coco128-val" / "images" / "000000001296.jpg"
# Per Milvus call: the fault test waits this long for each call to a stopped milvus-lite.
MILVUS_TIMEOUT_SECONDS = 2
# Item ids (paths under the indexed folder) and the Corel image each is a copy of.
QUOTED = {
    "it's.jpg": "123.jpg",
    'say "cheese".jpg': "456.jpg",
    "100%'s.jpg": "789.jpg",
    "l'été/d'or.jpg": "250.jpg",
    "plain.jpg": "601.jpg",
}

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not COREL.is_dir(), reason=f"no Corel-1k images at {COREL}"),
    pytest.mark.skipif(
        not (ROOT / "models" / "embedder" / "1" / "model.onnx").is_file(),
        reason="models not built: python models/build_models.py",
    ),
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # No DBA refresh by itself: it rewrites rows, and a search meanwhile may miss one of them
    # (README), which would make the searches here depend on timing.
    settings = {
        "LOUPE_MILVUS_TIMEOUT_SECONDS": str(MILVUS_TIMEOUT_SECONDS),
        "LOUPE_DBA_REFRESH_SECONDS": "0",
    }
    with running_stack(tmp_path_factory.mktemp("loupe-defects"), settings) as running:
        yield running


@pytest.fixture(scope="module")
def retrieval(stack: Stack) -> Iterator[retrieval_pb2_grpc.RetrievalServiceStub]:
    """Retrieval itself, around the gateway: what another process on the host can call."""
    with stack.channel("retrieval") as channel:
        yield retrieval_pb2_grpc.RetrievalServiceStub(channel)


def copies(folder: Path, names: dict[str, str]) -> Path:
    for name, source in names.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(COREL / source, folder / name)
    return folder


def search_json(stack: Stack, *args: str) -> list[dict]:
    result = stack.loupe("search", *args, "--json")
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_ids_with_quotes_index_search_get_and_delete(stack: Stack, tmp_path: Path) -> None:
    photos = copies(tmp_path / "photos", QUOTED)
    indexed = stack.loupe("index", str(photos), "--json", "--quiet")
    lines = [json.loads(line) for line in indexed.stdout.splitlines()]
    assert sorted(e["item_id"] for e in lines if e["indexed"]) == sorted(QUOTED), lines

    for item_id in QUOTED:
        assert json.loads(stack.loupe("get", item_id).stdout)["itemId"] == item_id
        (answer,) = search_json(stack, str(photos / item_id), "--top-k", "3")
        assert answer["results"][0]["item_id"] == item_id, answer
        (like,) = search_json(stack, "--item", item_id, "--top-k", "4")
        assert sorted(r["item_id"] for r in like["results"]) == sorted(set(QUOTED) - {item_id})

    # Same bytes, new metadata: the item is rewritten in place (UpdateItem), quote and all.
    stack.loupe("index", str(photos), "--meta", "batch=2", "--quiet")
    (answer,) = search_json(stack, str(photos / "it's.jpg"), "--where", "batch=2")
    assert sorted(r["item_id"] for r in answer["results"]) == sorted(QUOTED)

    for item_id in QUOTED:
        assert stack.loupe("delete", item_id).stdout.strip() == "deleted"
        missing = stack.loupe("get", item_id, check=False)
        assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    (answer,) = search_json(stack, str(photos / "it's.jpg"), "--where", "batch=2")
    assert answer["results"] == []


def test_a_quoted_id_with_detected_objects_is_replaced_and_deleted(
    stack: Stack, retrieval: retrieval_pb2_grpc.RetrievalServiceStub
) -> None:
    if not COCO_PERSON.is_file():
        pytest.skip(f"no {COCO_PERSON}")
    stub = stack.stub()
    request = gateway_pb2.IndexRequest(
        item_id="l'homme.jpg", image=COCO_PERSON.read_bytes(), detect=True
    )
    assert stub.Index(request, timeout=120).objects
    rows = retrieval.Lookup(retrieval_pb2.LookupRequest(item_id="l'homme.jpg")).items[0].objects
    assert len(rows) > 1
    # Without objects now: the object rows go (a delete by primary key, quote included).
    request.detect = False
    request.image = (COREL / "5.jpg").read_bytes()
    assert stub.Index(request, timeout=120).indexed
    rows = retrieval.Lookup(retrieval_pb2.LookupRequest(item_id="l'homme.jpg")).items[0].objects
    assert [o.object_index for o in rows] == [0]
    assert stub.Delete(gateway_pb2.DeleteRequest(item_id="l'homme.jpg")).deleted
    assert not retrieval.Lookup(retrieval_pb2.LookupRequest(item_id="l'homme.jpg")).items


def test_the_filter_limit_is_invalid_argument_at_the_gateway(stack: Stack, tmp_path: Path) -> None:
    stack.loupe("index", str(copies(tmp_path, {"f.jpg": "333.jpg"})), "--meta", "n=5", "--quiet")
    stub = stack.stub()
    # The deepest conditions there are: four-bound ranges.
    deepest = [
        c.Condition(field="n", range=c.Range(gte=0, gt=-1, lte=10, lt=11))
        for _ in range(MAX_FILTER_CONDITIONS)
    ]
    request = gateway_pb2.SearchRequest(
        image=(COREL / "333.jpg").read_bytes(), top_k=3, filter=c.Filter(all=deepest)
    )
    assert [h.item_id for h in stub.Search(request, timeout=60).results] == ["f.jpg"]
    request.filter.all.append(deepest[0])
    with pytest.raises(grpc.RpcError) as error:
        stub.Search(request, timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == (
        f"filter has {MAX_FILTER_CONDITIONS + 1} conditions; the limit is "
        f"{MAX_FILTER_CONDITIONS} (any_of matches one of many values in one condition)"
    )


def test_direct_changes_to_retrieval_invalidate_cached_searches(
    stack: Stack, retrieval: retrieval_pb2_grpc.RetrievalServiceStub, tmp_path: Path
) -> None:
    """Retrieval bumps the catalogue's generation whoever calls it: after a Delete, Upsert,
    UpdateItem or DropCatalog sent straight to it, the gateway's cached results are gone."""
    stack.loupe(
        "index",
        str(copies(tmp_path, {f"c{i}.jpg": f"{700 + i}.jpg" for i in range(4)})),
        "--catalog",
        "cache_test",
        "--quiet",
    )
    stub = stack.stub()
    request = gateway_pb2.SearchRequest(
        image=(COREL / "700.jpg").read_bytes(), top_k=10, catalog="cache_test"
    )

    def search() -> gateway_pb2.SearchResponse:
        first = stub.Search(request, timeout=60)
        assert stub.Search(request, timeout=60).cached  # what the next change must invalidate
        return first

    assert not search().cached
    assert {h.item_id for h in search().results} == {"c0.jpg", "c1.jpg", "c2.jpg", "c3.jpg"}

    assert retrieval.Delete(retrieval_pb2.DeleteItemRequest(item_id="c1.jpg", catalog="cache_test"))
    after_delete = search()
    assert not after_delete.cached
    assert "c1.jpg" not in {h.item_id for h in after_delete.results}

    (stored,) = retrieval.Lookup(
        retrieval_pb2.LookupRequest(item_id="c0.jpg", include_vectors=True, catalog="cache_test")
    ).items
    stored.item_id = "upserted.jpg"
    assert retrieval.Upsert(retrieval_pb2.UpsertRequest(item=stored, catalog="cache_test")).written
    after_upsert = search()
    assert not after_upsert.cached
    assert "upserted.jpg" in {h.item_id for h in after_upsert.results}

    assert retrieval.UpdateItem(
        retrieval_pb2.UpdateItemRequest(
            item_id="upserted.jpg",
            catalog="cache_test",
            metadata={"note": c.Value(string_value="changed")},
        )
    ).found
    after_update = search()
    assert not after_update.cached
    (hit,) = [h for h in after_update.results if h.item_id == "upserted.jpg"]
    assert hit.metadata["note"].string_value == "changed"

    dropped = retrieval.DropCatalog(retrieval_pb2.RetrievalDropCatalogRequest(catalog="cache_test"))
    assert dropped.dropped
    with pytest.raises(grpc.RpcError) as error:
        stub.Search(request, timeout=60)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def milvus_lite_pid(stack: Stack) -> int:
    retrieval = next(p["pid"] for p in stack.state()["processes"] if p["name"] == "retrieval")
    for proc in Path("/proc").iterdir():
        try:
            status = (proc / "status").read_text()
            command = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"\nPPid:\t{retrieval}\n" in status and b"milvus" in command:
            return int(proc.name)
    raise AssertionError("no milvus-lite process under retrieval")


def test_a_hung_milvus_is_unavailable_and_loupe_index_exits_1(stack: Stack, tmp_path: Path) -> None:
    photos = copies(tmp_path, {f"hung-{i}.jpg": f"{800 + i}.jpg" for i in range(3)})
    stub = stack.stub()
    pid = milvus_lite_pid(stack)
    os.kill(pid, signal.SIGSTOP)
    try:
        failed = stack.loupe("index", str(photos), "--quiet", check=False)
        with pytest.raises(grpc.RpcError) as error:
            # Not a cached request: it must reach Milvus.
            stub.Search(
                gateway_pb2.SearchRequest(image=(COREL / "801.jpg").read_bytes(), top_k=9),
                timeout=60,
            )
    finally:
        os.kill(pid, signal.SIGCONT)
    assert failed.returncode == 1, failed.stderr
    assert "indexed 0 of 3 files" in failed.stderr and "3 skipped" in failed.stderr
    assert failed.stderr.count("Milvus at") == 3, failed.stderr
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    details = error.value.details()
    assert "retrieval service at" in details and "Milvus at" in details, details
    assert "INTERNAL" not in details and "internal error" not in details, details
    # Milvus answers again: so does everything else.
    assert stack.loupe("index", str(photos), "--quiet").returncode == 0


def test_every_line_of_every_service_log_is_json(stack: Stack) -> None:
    """Last: stops the stack, so that shutdown's lines are in the logs too. The batch job
    makes pymilvus log (plain text, through a handler of its own, before)."""
    stack.loupe("catalogs", "augment", "default")
    stack.loupe("down", "--data-dir", str(stack.data_dir))
    loggers: set[str] = set()
    for service in SERVICES:
        log = stack.data_dir / "logs" / f"{service}.log"
        for number, line in enumerate(log.read_text().splitlines(), 1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                raise AssertionError(f"{log.name} line {number} is not JSON: {line!r}") from None
            assert entry["service"] == service, line
            loggers.add(entry["logger"])
    assert any(name.startswith("pymilvus") for name in loggers), loggers
