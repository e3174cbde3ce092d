"""The whole stack, as users run it: `loupe up` starts five service processes, milvus-lite
and a real redis-server on loopback; `loupe index` / `loupe search` and the gateway's gRPC
API are used against it.

Tests run in file order and share one stack (building it costs a minute): indexing first,
quality next, then behaviour, then faults (Redis killed), then a restart.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loupe.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc
from services.cli import local_tls
from services.cli.client import with_key
from services.common.channels import TLSSettings, open_blocking_channel
from tests.integration.stacks import LOUPE, SERVICES, Stack, metric_value, running_stack

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("LOUPE_SHARED_DIR", ROOT.parent / "shared"))
COREL = SHARED / "data" / "corel1k" / "images"
COCO = SHARED / "data" / "coco128-val"
# A COCO val image whose ground truth has a person covering most of the frame.
COCO_PERSON = "000000001296"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not COREL.is_dir(), reason=f"no Corel-1k images at {COREL}"),
    pytest.mark.skipif(
        not (ROOT / "models" / "embedder" / "1" / "model.onnx").is_file(),
        reason="models not built: python models/build_models.py",
    ),
]


def corel_class(item_id: str) -> int:
    return int(Path(item_id).stem) // 100


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("loupe-data")) as running:
        yield running


@pytest.fixture(scope="module")
def corel_indexed(stack: Stack) -> dict[str, dict]:
    result = stack.loupe("index", str(COREL), "--json", "--quiet")
    # After a bulk load, as the README says: the batch DBA at once, rather than the automatic
    # one a few seconds later while the tests search.
    stack.loupe("catalogs", "augment", "default")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    return {entry["item_id"]: entry for entry in lines if entry.get("indexed")}


def search_json(stack: Stack, *args: str) -> list[dict]:
    result = stack.loupe("search", *args, "--json")
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_every_corel_image_is_indexed(corel_indexed: dict[str, dict]) -> None:
    assert len(corel_indexed) == 1000


def test_image_queries_precision_at_10(stack: Stack, corel_indexed: dict) -> None:
    queries = [str(COREL / f"{c * 100 + i}.jpg") for c in range(10) for i in range(0, 100, 10)]
    answers = search_json(stack, *queries, "--top-k", "11")
    assert len(answers) == len(queries)
    precisions = []
    for query, answer in zip(queries, answers, strict=True):
        me = Path(query).name
        # The query is indexed too: it comes first, and the protocol leaves it out.
        assert answer["results"][0]["item_id"] == me
        others = [r["item_id"] for r in answer["results"] if r["item_id"] != me][:10]
        precisions.append(sum(corel_class(o) == corel_class(me) for o in others) / 10)
    p_at_10 = sum(precisions) / len(precisions)
    print(f"image-query P@10 over {len(queries)} queries: {p_at_10:.3f}")
    assert p_at_10 >= 0.90


def test_item_queries_return_same_class_and_never_the_item(
    stack: Stack, corel_indexed: dict
) -> None:
    items = [f"{i}.jpg" for i in range(1000)]
    args = [a for item in items for a in ("--item", item)]
    answers = search_json(stack, *args, "--top-k", "10")
    assert [a["query"] for a in answers] == items
    precision = 0.0
    for answer in answers:
        ids = [r["item_id"] for r in answer["results"]]
        assert len(ids) == 10
        assert answer["query"] not in ids
        precision += sum(corel_class(i) == corel_class(answer["query"]) for i in ids) / 10
    p_at_10 = precision / len(items)
    print(f"item-query P@10 over all 1000 items: {p_at_10:.3f}")
    assert p_at_10 >= 0.90


def test_crop_finds_its_source(stack: Stack, corel_indexed: dict) -> None:
    for item in ("123.jpg", "456.jpg", "789.jpg"):
        # Corel images are 384x256 or 256x384: this box is inside either, off-centre.
        answer = search_json(stack, str(COREL / item), "--box", "30,40,230,240", "--top-k", "3")[0]
        # Query expansion and DBA rank by neighbourhood: a near-identical sibling may edge the
        # source out of first place, never out of the first three.
        assert item in [r["item_id"] for r in answer["results"]], answer


def test_objects_mode_returns_a_person_with_results(stack: Stack, corel_indexed: dict) -> None:
    image = COCO / "images" / f"{COCO_PERSON}.jpg"
    if not image.is_file():
        pytest.skip(f"no {image}")
    answer = search_json(stack, str(image), "--objects", "--top-k", "5")[0]
    assert answer["results"], "whole-image results are returned beside the objects"
    people = [o for o in answer["objects"] if o["label"] == "person"]
    assert people, answer["objects"]
    person = people[0]
    x0, y0, x1, y1 = person["box"]
    assert x1 > x0 and y1 > y0
    assert len(person["results"]) == 5


def test_identical_reupload_is_reported_as_exact_duplicate(
    stack: Stack, corel_indexed: dict, tmp_path: Path
) -> None:
    copy = tmp_path / "copy-of-5.jpg"
    shutil.copy(COREL / "5.jpg", copy)
    entry = json.loads(stack.loupe("index", str(copy), "--json", "--quiet").stdout)
    assert entry["indexed"]
    assert {"item_id": "5.jpg", "kind": "exact", "similarity": 1.0} in entry["duplicates"]


def test_reencoded_image_is_a_near_duplicate(
    stack: Stack, corel_indexed: dict, tmp_path: Path
) -> None:
    from PIL import Image

    copy = tmp_path / "recompressed-6.jpg"
    Image.open(COREL / "6.jpg").save(copy, quality=70)
    entry = json.loads(stack.loupe("index", str(copy), "--json", "--quiet").stdout)
    near = [d for d in entry["duplicates"] if d["kind"] == "near"]
    assert near and near[0]["item_id"] == "6.jpg", entry


def test_reindexing_the_same_item_is_unchanged(stack: Stack, corel_indexed: dict) -> None:
    entry = json.loads(stack.loupe("index", str(COREL / "7.jpg"), "--json", "--quiet").stdout)
    assert entry["indexed"] and entry["unchanged"]
    assert not [d for d in entry["duplicates"] if d["item_id"] == "7.jpg"]


def test_repeated_search_is_served_from_cache(stack: Stack, corel_indexed: dict) -> None:
    stub = stack.stub()
    request = gateway_pb2.SearchRequest(image=(COREL / "321.jpg").read_bytes(), top_k=7)
    before = metric_value(
        stack.metrics("gateway"), "loupe_gateway_cache_hits_total", cache="search"
    )
    first = stub.Search(request, timeout=30)
    second = stub.Search(request, timeout=30)
    after = metric_value(stack.metrics("gateway"), "loupe_gateway_cache_hits_total", cache="search")
    assert not first.cached and second.cached
    assert [h.item_id for h in second.results] == [h.item_id for h in first.results]
    assert after >= before + 1


def test_a_write_invalidates_cached_results(stack: Stack, corel_indexed: dict) -> None:
    stub = stack.stub()
    request = gateway_pb2.SearchRequest(item_id="42.jpg", top_k=5)
    stub.Search(request, timeout=30)
    assert stub.Search(request, timeout=30).cached
    stub.Index(gateway_pb2.IndexRequest(item_id="extra.jpg", image=(COREL / "43.jpg").read_bytes()))
    assert not stub.Search(request, timeout=30).cached
    assert stub.Delete(gateway_pb2.DeleteRequest(item_id="extra.jpg")).deleted


def test_filters_and_metadata(stack: Stack, corel_indexed: dict) -> None:
    stub = stack.stub()
    for i, category in ((900, "food"), (901, "food"), (902, 'tricky" or item_id != "')):
        stub.Index(
            gateway_pb2.IndexRequest(
                item_id=f"meta-{i}",
                image=(COREL / f"{i}.jpg").read_bytes(),
                metadata={
                    "category": common_pb2.Value(string_value=category),
                    "popularity": common_pb2.Value(number_value=i),
                },
            )
        )
    answers = search_json(
        stack, str(COREL / "903.jpg"), "--where", "category=food", "--where", "popularity>=901"
    )
    assert [r["item_id"] for r in answers[0]["results"]] == ["meta-901"]
    hostile = gateway_pb2.SearchRequest(
        image=(COREL / "903.jpg").read_bytes(),
        filter=common_pb2.Filter(
            all=[
                common_pb2.Condition(
                    field="category",
                    equals=common_pb2.Value(string_value='tricky" or item_id != "'),
                )
            ]
        ),
    )
    assert [h.item_id for h in stack.stub().Search(hostile).results] == ["meta-902"]
    bad_key = gateway_pb2.SearchRequest(
        item_id="1.jpg",
        filter=common_pb2.Filter(
            all=[common_pb2.Condition(field="x) or (1", equals=common_pb2.Value(number_value=1))]
        ),
    )
    with pytest.raises(grpc.RpcError) as error:
        stub.Search(bad_key)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for i in (900, 901, 902):
        stub.Delete(gateway_pb2.DeleteRequest(item_id=f"meta-{i}"))


def test_get_and_delete(stack: Stack, corel_indexed: dict, tmp_path: Path) -> None:
    shutil.copy(COREL / "8.jpg", tmp_path / "to-delete.jpg")
    stack.loupe("index", str(tmp_path / "to-delete.jpg"), "--quiet")
    item = json.loads(stack.loupe("get", "to-delete.jpg").stdout)
    assert item["itemId"] == "to-delete.jpg" and len(item["contentHash"]) == 64
    assert stack.loupe("delete", "to-delete.jpg").stdout.strip() == "deleted"
    missing = stack.loupe("get", "to-delete.jpg", check=False)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr


def test_the_gateway_takes_calls_with_a_key_of_the_right_role(
    stack: Stack, corel_indexed: dict
) -> None:
    with stack.channel("gateway") as channel, pytest.raises(grpc.RpcError) as error:
        gateway_pb2_grpc.GatewayStub(channel).Get(gateway_pb2.GetRequest(item_id="250.jpg"))
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    local_key = stack.data_dir / "auth" / "local.key"
    assert stat.S_IMODE(local_key.stat().st_mode) == 0o600
    assert stack.env["LOUPE_API_KEY"] == local_key.read_text().strip()

    def as_key(key: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**stack.env, "LOUPE_API_KEY": key}
        return subprocess.run([LOUPE, *args], env=env, capture_output=True, text=True, timeout=60)

    refused = as_key("", "get", "250.jpg")
    assert refused.returncode == 1 and "UNAUTHENTICATED: no API key" in refused.stderr
    # A read-only key, added while the gateway runs: taken up within the reload interval.
    created = stack.loupe("keys", "create", "reader", "--role", "read", "--data-dir",
                          str(stack.data_dir))  # fmt: skip
    reader = created.stdout.strip()
    deadline = time.monotonic() + 30
    while as_key(reader, "get", "250.jpg").returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert json.loads(as_key(reader, "get", "250.jpg").stdout)["itemId"] == "250.jpg"
    denied = as_key(reader, "delete", "250.jpg")
    assert denied.returncode == 1
    assert "PERMISSION_DENIED: Delete needs role write or above" in denied.stderr
    stack.loupe("keys", "revoke", "reader", "--data-dir", str(stack.data_dir))
    counted = stack.metrics("gateway")
    assert metric_value(counted, "loupe_gateway_auth_requests_total", key="local", outcome="ok")
    assert metric_value(counted, "loupe_gateway_auth_requests_total", key="-", outcome="no_key")
    assert metric_value(
        counted, "loupe_gateway_auth_requests_total", key="reader", outcome="permission_denied"
    )


def test_only_the_stack_itself_reaches_its_backends(stack: Stack, corel_indexed: dict) -> None:
    """Mutual TLS (on by default): a local process without the stack's client certificate
    cannot call a backend around the gateway, nor use its Redis without the password."""
    ca = str(local_tls.ca_path(stack.data_dir))
    for service in ("detection", "embedding", "retrieval", "ranking"):
        address = f"127.0.0.1:{stack.ports[service]}"
        for tls in (TLSSettings(), TLSSettings(True, ca=ca)):
            with (
                open_blocking_channel(address, tls) as channel,
                pytest.raises(grpc.RpcError) as error,
            ):
                health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=10
                )
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE, (service, tls)
        assert stack.health(service) == health_pb2.HealthCheckResponse.SERVING
    retrieval = f"127.0.0.1:{stack.ports['retrieval']}"
    request = retrieval_pb2.LookupRequest(item_id="250.jpg")
    with (
        open_blocking_channel(retrieval, TLSSettings(True, ca=ca)) as channel,
        pytest.raises(grpc.RpcError) as error,
    ):
        retrieval_pb2_grpc.RetrievalServiceStub(channel).Lookup(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    with stack.channel("retrieval") as channel:
        assert retrieval_pb2_grpc.RetrievalServiceStub(channel).Lookup(request, timeout=30).items
    # The gateway serves TLS to callers without a certificate (they bring an API key), and
    # nothing in plaintext.
    for tls, code in ((TLSSettings(True, ca=ca), "OK"), (TLSSettings(), "UNAVAILABLE")):
        with open_blocking_channel(stack.gateway, tls) as channel:
            try:
                gateway_pb2_grpc.GatewayStub(
                    with_key(channel, stack.env["LOUPE_API_KEY"])
                ).ListCatalogs(gateway_pb2.ListCatalogsRequest(), timeout=30)
                outcome = "OK"
            except grpc.RpcError as failure:
                outcome = failure.code().name  # type: ignore[attr-defined]
        assert outcome == code, tls
    for secret in [*local_tls.tls_dir(stack.data_dir).glob("*.key"),
                   local_tls.redis_password_path(stack.data_dir)]:  # fmt: skip
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    redis_port = next(p["port"] for p in stack.state()["processes"] if p["name"] == "redis")
    with socket.create_connection(("127.0.0.1", redis_port), timeout=5) as conn:
        conn.sendall(b"*3\r\n$3\r\nSET\r\n$14\r\nloupe:search:x\r\n$1\r\n1\r\n")
        assert conn.recv(64).startswith(b"-NOAUTH")
    # The password is on no command line (which any local user can read).
    password = local_tls.redis_password(stack.data_dir)
    for process in stack.state()["processes"]:
        assert password not in Path(f"/proc/{process['pid']}/cmdline").read_text()


def test_every_service_exports_request_counters_and_latency(
    stack: Stack, corel_indexed: dict
) -> None:
    for service in SERVICES:
        text = stack.metrics(service)
        assert metric_value(text, "loupe_grpc_requests_total", service=service) > 0, service
        assert (
            metric_value(text, "loupe_grpc_request_duration_seconds_count", service=service) > 0
        ), service
        assert (
            metric_value(text, "loupe_grpc_request_duration_seconds_bucket", service=service) > 0
        ), service
    gateway = stack.metrics("gateway")
    for stage in ("embed", "retrieve", "rank"):
        assert metric_value(gateway, "loupe_gateway_stage_duration_seconds_count", stage=stage) > 0


def test_catalogues_keep_their_items_apart(stack: Stack, corel_indexed: dict) -> None:
    stub = stack.stub()
    for i in (600, 601, 602):
        reply = stub.Index(
            gateway_pb2.IndexRequest(
                item_id=f"tiny-{i}", image=(COREL / f"{i}.jpg").read_bytes(), catalog="tiny"
            )
        )
        assert reply.indexed
    found = stub.Search(gateway_pb2.SearchRequest(item_id="tiny-600", catalog="tiny", top_k=10))
    assert sorted(h.item_id for h in found.results) == ["tiny-601", "tiny-602"]
    default = stub.Search(gateway_pb2.SearchRequest(image=(COREL / "600.jpg").read_bytes()))
    assert not [h for h in default.results if h.item_id.startswith("tiny-")]
    with pytest.raises(grpc.RpcError) as error:
        stub.Get(gateway_pb2.GetRequest(item_id="tiny-600"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert stub.Get(gateway_pb2.GetRequest(item_id="tiny-600", catalog="tiny")).item_id

    listed = json.loads(stack.loupe("catalogs", "list", "--json").stdout)
    sizes = {c["name"]: int(c["items"]) for c in listed["catalogs"]}
    assert sizes["tiny"] == 3 and sizes["default"] >= 1000
    assert stack.loupe("catalogs", "drop", "tiny").stdout.strip() == "dropped"
    with pytest.raises(grpc.RpcError) as error:
        stub.Search(gateway_pb2.SearchRequest(item_id="tiny-600", catalog="tiny"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as error:
        stub.Search(gateway_pb2.SearchRequest(item_id="1.jpg", catalog="Bad Name"))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(stub.Search(gateway_pb2.SearchRequest(item_id="1.jpg")).results) == 10


def labelled_gallery(root: Path, classes: range, images: range) -> Path:
    """Corel images as DIR/CLASS/FILE links: the layout `loupe eval retrieval` reads."""
    for c in classes:
        (root / f"class{c}").mkdir(parents=True)
        for i in images:
            (root / f"class{c}" / f"{c * 100 + i}.jpg").symlink_to(COREL / f"{c * 100 + i}.jpg")
    return root


def test_eval_retrieval_measures_and_cleans_up(
    stack: Stack, corel_indexed: dict, tmp_path: Path
) -> None:
    gallery = labelled_gallery(tmp_path / "gallery", range(0, 10, 3), range(12))
    report_file = tmp_path / "report.json"
    result = stack.loupe("eval", "retrieval", "--gallery", str(gallery), "--json", str(report_file))
    report = json.loads(report_file.read_text())
    metrics = report["metrics"]
    print(result.stdout)
    assert report["items"] == 48 and report["classes"] == 4 and metrics["queries"] == 48
    assert report["top_k"] == 47  # every other item: mAP over the full ranking
    assert 0.7 < metrics["map"] <= 1 and 0.7 < metrics["p_at_10"] <= 1
    assert metrics["map_at_100"] == pytest.approx(metrics["map"])  # 11 relevant, all in 47
    assert metrics["r_at_10"] <= 10 / 11 + 1e-9
    assert report["index"]["code_bytes_per_row"] * 4 <= report["index"]["full_vector_bytes"]
    assert "mAP@100" in result.stdout
    # Its catalogue is gone; the default one is untouched.
    names = {
        c.name: c.items
        for c in stack.stub().ListCatalogs(gateway_pb2.ListCatalogsRequest()).catalogs
    }
    assert names.get("default", 0) >= 1000 and not [n for n in names if n.startswith("eval_")]

    queries = labelled_gallery(tmp_path / "queries", range(0, 10, 3), range(50, 53))
    held_out = stack.loupe(
        "eval", "retrieval", "--gallery", str(gallery), "--queries", str(queries), "--top-k", "20"
    )
    assert "(12)" in held_out.stdout  # 4 classes x 3 query images

    flat = stack.loupe("eval", "retrieval", "--gallery", str(COREL), check=False)
    assert flat.returncode == 2 and "--numbered-groups" in flat.stderr


def test_indexing_objects_leaves_whole_image_results_unchanged(
    stack: Stack, corel_indexed: dict
) -> None:
    """Objects are indexed beside whole images, but a whole-image query is compared with whole
    images only: the same catalogue indexed with and without --detect answers alike."""
    images = sorted((COCO / "images").glob("*.jpg"))[:24]
    stub = stack.stub()
    for catalog, detect in (("plain", False), ("objects", True)):
        reply = stub.IndexStream(
            iter(
                gateway_pb2.IndexRequest(
                    item_id=p.name, image=p.read_bytes(), detect=detect, catalog=catalog
                )
                for p in images
            )
        )
        assert reply.indexed == len(images)
        # Index-time augmentation depends on arrival order; the batch job does not.
        stub.AugmentCatalog(gateway_pb2.AugmentCatalogRequest(catalog=catalog))
    listed = {c.name: c for c in stub.ListCatalogs(gateway_pb2.ListCatalogsRequest()).catalogs}
    assert listed["objects"].rows > listed["plain"].rows == len(images)
    for query in images[:6]:
        answers = [
            stub.Search(
                gateway_pb2.SearchRequest(image=query.read_bytes(), top_k=10, catalog=catalog)
            ).results
            for catalog in ("plain", "objects")
        ]
        assert [h.item_id for h in answers[0]] == [h.item_id for h in answers[1]]
        assert [h.object_index for h in answers[1]] == [0] * len(answers[1])
        assert [h.score for h in answers[0]] == pytest.approx([h.score for h in answers[1]])
    # A crop, unlike a whole image, is compared with objects too, each item once.
    crop = stub.Search(
        gateway_pb2.SearchRequest(
            image=images[0].read_bytes(),
            crop=common_pb2.Box(x0=10, y0=10, x1=200, y1=200),
            top_k=10,
            catalog="objects",
        )
    ).results
    assert len({h.item_id for h in crop}) == len(crop)
    # A crop over a detected object carries the detector's label to ranking: the items that
    # hold an object of that label, and only they, get the label bonus.
    labels = {}
    for image in images:
        got = stub.Get(gateway_pb2.GetRequest(item_id=image.name, catalog="objects"))
        labels[image.name] = {o.label for o in got.objects if o.object_index > 0}
    source = next(
        (p, o)
        for p in images
        for o in stub.Get(gateway_pb2.GetRequest(item_id=p.name, catalog="objects")).objects
        if o.object_index > 0 and o.box.x1 - o.box.x0 >= 64 and o.box.y1 - o.box.y0 >= 64
    )
    by_label = stub.Search(
        gateway_pb2.SearchRequest(
            image=source[0].read_bytes(), crop=source[1].box, top_k=20, catalog="objects"
        )
    ).results
    assert by_label
    for hit in by_label:
        assert (hit.parts.label > 0) == (source[1].label in labels[hit.item_id]), hit
    assert any(hit.parts.label > 0 for hit in by_label)
    for catalog in ("plain", "objects"):
        stub.DropCatalog(gateway_pb2.DropCatalogRequest(catalog=catalog))


def test_bad_images_get_invalid_argument_and_nothing_breaks(
    stack: Stack, corel_indexed: dict, tmp_path: Path
) -> None:
    stub = stack.stub()
    truncated = (COREL / "10.jpg").read_bytes()[:700]
    for image in (truncated, b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 64):
        calls = [
            (stub.Search, gateway_pb2.SearchRequest(image=image)),
            (stub.Index, gateway_pb2.IndexRequest(item_id="bad", image=image)),
            (stub.Search, gateway_pb2.SearchRequest(image=image, objects=True)),
        ]
        for method, request in calls:
            with pytest.raises(grpc.RpcError) as error:
                method(request, timeout=30)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        stub.Search(gateway_pb2.SearchRequest(item_id="no-such-item"), timeout=30)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND

    # A folder with broken files: they are reported and skipped, the rest is indexed.
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(truncated)
    (folder / "notes.txt").write_text("hello")
    shutil.copy(COREL / "11.jpg", folder / "good.jpg")
    result = stack.loupe("index", str(folder), "--json", "--quiet")
    entries = {Path(e["path"]).name: e for e in map(json.loads, result.stdout.splitlines())}
    assert entries["good.jpg"]["indexed"]
    assert not entries["broken.jpg"]["indexed"] and "corrupt" in entries["broken.jpg"]["error"]
    assert not entries["notes.txt"]["indexed"]
    stub.Delete(gateway_pb2.DeleteRequest(item_id="good.jpg"))

    for service in SERVICES:
        assert stack.health(service) == health_pb2.HealthCheckResponse.SERVING, service
        # What the Helm chart's liveness probe asks.
        assert stack.health(service, "loupe.liveness") == health_pb2.HealthCheckResponse.SERVING


def test_searches_go_on_when_redis_dies(stack: Stack, corel_indexed: dict) -> None:
    redis_pid = next(p["pid"] for p in stack.state()["processes"] if p["name"] == "redis")
    os.kill(redis_pid, signal.SIGKILL)
    time.sleep(0.5)
    stub = stack.stub()
    before = metric_value(stack.metrics("gateway"), "loupe_gateway_cache_errors_total")
    for i in range(3):
        reply = stub.Search(gateway_pb2.SearchRequest(item_id=f"{500 + i}.jpg"), timeout=30)
        assert len(reply.results) == 10 and not reply.cached
    reply = stub.Index(
        gateway_pb2.IndexRequest(item_id="during-outage", image=(COREL / "12.jpg").read_bytes())
    )
    assert reply.indexed
    after = metric_value(stack.metrics("gateway"), "loupe_gateway_cache_errors_total")
    assert after > before


def test_with_detection_down_searches_answer_degraded(stack: Stack, corel_indexed: dict) -> None:
    detection_pid = next(p["pid"] for p in stack.state()["processes"] if p["name"] == "detection")
    os.kill(detection_pid, signal.SIGTERM)  # stopped on purpose: the supervisor leaves it so
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Path(f"/proc/{detection_pid}").exists():
        time.sleep(0.1)
    stub = stack.stub()
    before = metric_value(
        stack.metrics("gateway"), "loupe_gateway_degraded_responses_total", reason="detection"
    )
    image = (COREL / "313.jpg").read_bytes()
    reply = stub.Search(gateway_pb2.SearchRequest(image=image, objects=True), timeout=30)
    assert reply.degraded and list(reply.degraded_reasons) == ["detection"]
    assert not reply.objects and not reply.cached
    # The whole-image results are those of a search that asks for no objects.
    plain = stub.Search(gateway_pb2.SearchRequest(image=image), timeout=30)
    assert not plain.degraded
    assert [h.item_id for h in reply.results] == [h.item_id for h in plain.results]
    answer = stack.loupe("search", str(COREL / "314.jpg"), "--objects")
    assert "(degraded: detection unavailable: no objects searched)" in answer.stdout
    after = metric_value(
        stack.metrics("gateway"), "loupe_gateway_degraded_responses_total", reason="detection"
    )
    assert after - before == 2
    # Indexing objects is no search: it fails rather than store less than was asked.
    with pytest.raises(grpc.RpcError) as error:
        stub.Index(gateway_pb2.IndexRequest(item_id="no-detector", image=image, detect=True))
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "detection service at" in (error.value.details() or "")


def test_a_backend_outage_is_unavailable_and_names_the_backend(
    stack: Stack, corel_indexed: dict
) -> None:
    embedding_pid = next(p["pid"] for p in stack.state()["processes"] if p["name"] == "embedding")
    os.kill(embedding_pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Path(f"/proc/{embedding_pid}").exists():
        time.sleep(0.1)
    stub = stack.stub()
    with pytest.raises(grpc.RpcError) as error:
        stub.Search(gateway_pb2.SearchRequest(image=(COREL / "77.jpg").read_bytes()), timeout=30)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "embedding service at" in error.value.details()
    # More-like-this reuses stored vectors: it needs no embedding service.
    assert len(stub.Search(gateway_pb2.SearchRequest(item_id="77.jpg"), timeout=30).results) == 10
    assert stack.health("gateway") == health_pb2.HealthCheckResponse.SERVING
    failed = stack.loupe("search", str(COREL / "78.jpg"), check=False)
    assert failed.returncode == 1 and "embedding service at" in failed.stderr
    assert "cannot reach the gateway" not in failed.stderr


def test_data_survives_a_restart(stack: Stack, corel_indexed: dict) -> None:
    stack.loupe("down", "--data-dir", str(stack.data_dir))
    assert not (stack.data_dir / "run" / "stack.json").exists()
    ca = local_tls.ca_path(stack.data_dir).read_bytes()
    stack.loupe("up", "--data-dir", str(stack.data_dir))
    # The same CA and certificates: a client that trusts the stack goes on trusting it.
    assert local_tls.ca_path(stack.data_dir).read_bytes() == ca
    item = json.loads(stack.loupe("get", "during-outage").stdout)
    assert item["itemId"] == "during-outage"
    answer = search_json(stack, "--item", "250.jpg")[0]
    assert len(answer["results"]) == 10
