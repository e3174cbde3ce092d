"""`loupe index --manifest` against a real stack (`loupe up` on free loopback ports), with images
on local disk, on a loopback HTTP server and on moto's S3 server: good entries indexed and
searchable, broken ones reported and skipped, an interrupted run resumed without embedding
again, and shards that together index every item once.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from loupe.v1 import gateway_pb2
from tests.integration.stacks import LOUPE, Stack, metric_value, running_stack
from tests.support import free_ports

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("LOUPE_SHARED_DIR", ROOT.parent / "shared"))
COREL = SHARED / "data" / "corel1k" / "images"

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
    with running_stack(tmp_path_factory.mktemp("loupe-data")) as running:
        yield running


class QuietFiles(SimpleHTTPRequestHandler):
    # Files under /slow/ take this long to start: a run over them lasts long enough to be
    # interrupted however fast the machine indexes.
    SLOW_SECONDS = 0.3

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/slow/"):
            time.sleep(self.SLOW_SECONDS)
        super().do_GET()


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A static file server on loopback: (base URL, the folder it serves)."""
    root = tmp_path_factory.mktemp("web")
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietFiles, directory=str(root))
    )
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def s3(stack: Stack) -> Iterator[Any]:
    """A bucket `photos` on moto's S3 server; the stack's `loupe` commands are pointed at it
    the way a deployment would be, by AWS_* variables (the credentials are dummies)."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_ports(1)[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    stack.env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL_S3=endpoint,
    )
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket="photos")
    try:
        yield client
    finally:
        server.stop()


def write_manifest(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with path.open("w", newline="") as file:
        csv.writer(file).writerows([header, *rows])
    return path


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def items_in(stack: Stack, catalog: str) -> int:
    listed = stack.stub().ListCatalogs(gateway_pb2.ListCatalogsRequest(), timeout=30)
    return next((int(c.items) for c in listed.catalogs if c.name == catalog), 0)


def stored(stack: Stack, catalog: str, item_ids: list[str]) -> set[str]:
    stub = stack.stub()
    found = set()
    for item_id in item_ids:
        try:
            stub.Get(gateway_pb2.GetRequest(item_id=item_id, catalog=catalog), timeout=30)
            found.add(item_id)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND, error
    return found


def embed_calls(stack: Stack) -> float:
    return metric_value(
        stack.metrics("embedding"), "loupe_grpc_requests_total", service="embedding", method="Embed"
    )


def test_a_mixed_manifest_indexes_the_good_and_reports_the_broken(
    stack: Stack, web: tuple[str, Path], s3: Any, tmp_path: Path
) -> None:
    base_url, web_root = web
    (tmp_path / "local").mkdir()
    rows: list[list[Any]] = []
    for i in range(40):  # relative paths: against the manifest's folder
        (tmp_path / "local" / f"{i}.jpg").symlink_to(COREL / f"{i}.jpg")
        rows.append([f"local-{i}", f"local/{i}.jpg", "food", i, "true"])
    for i in range(100, 110):
        shutil.copy(COREL / f"{i}.jpg", web_root / f"{i}.jpg")
        rows.append([f"web-{i}", f"{base_url}/{i}.jpg", "beach", i, "false"])
    for i in range(200, 210):
        s3.put_object(Bucket="photos", Key=f"corel/{i}.jpg", Body=(COREL / f"{i}.jpg").read_bytes())
        rows.append([f"s3-{i}", f"s3://photos/corel/{i}.jpg", "", "", ""])
    good = [r[0] for r in rows]
    (web_root / "notes.txt").write_text("not an image")
    closed = free_ports(1)[0]
    broken = {
        "missing-http": f"{base_url}/nope.jpg",
        "missing-file": "local/missing.jpg",
        "not-an-image": f"{base_url}/notes.txt",
        "unreachable": f"http://127.0.0.1:{closed}/a.jpg",
        "missing-s3": "s3://photos/corel/nope.jpg",
        "no-uri": "",
    }
    rows += [[item_id, uri, "x", 1, "true"] for item_id, uri in broken.items()]
    path = write_manifest(
        tmp_path / "mixed.csv", ["item_id", "uri", "category", "popularity", "featured"], rows
    )

    result = stack.loupe(
        "index", "--manifest", str(path), "--catalog", "mixed", "--json", "--quiet",
        "--download-retries", "1", "--meta", "category=unsorted", timeout=300,
    )  # fmt: skip
    lines = {line["item_id"]: line for line in json_lines(result.stdout)}
    assert sorted(lines) == sorted(good + list(broken))
    for item_id in good:
        assert lines[item_id]["indexed"], json.dumps(lines[item_id])
    for item_id in broken:
        assert not lines[item_id]["indexed"] and lines[item_id]["error"], lines[item_id]
    assert "404" in lines["missing-http"]["error"]
    assert lines["missing-file"]["error"] == "not found"
    assert "(after 2 attempts)" in lines["unreachable"]["error"]
    assert f"{len(good)} indexed" in result.stderr and f"{len(broken)} skipped" in result.stderr

    assert stored(stack, "mixed", good + list(broken)) == set(good)
    stub = stack.stub()
    item = stub.Get(gateway_pb2.GetRequest(item_id="local-7", catalog="mixed"), timeout=30)
    assert item.metadata["category"].string_value == "food"
    assert item.metadata["popularity"].number_value == 7
    assert item.metadata["featured"].bool_value is True
    if "source_uri" in gateway_pb2.GetResponse.DESCRIPTOR.fields_by_name:
        assert item.source_uri == str(tmp_path / "local" / "7.jpg")
    # --meta is under the manifest's columns: it fills in only where a cell is empty.
    s3_item = stub.Get(gateway_pb2.GetRequest(item_id="s3-201", catalog="mixed"), timeout=30)
    assert list(s3_item.metadata) == ["category"]
    assert s3_item.metadata["category"].string_value == "unsorted"
    found = stub.Search(
        gateway_pb2.SearchRequest(item_id="web-105", catalog="mixed", top_k=5), timeout=30
    )
    assert len(found.results) == 5


def test_exit_codes(stack: Stack, web: tuple[str, Path], tmp_path: Path) -> None:
    base_url, web_root = web
    shutil.copy(COREL / "900.jpg", web_root / "900.jpg")
    broken = [["gone", f"{base_url}/gone.jpg"], ["lost", str(tmp_path / "lost.jpg")]]
    only_broken = write_manifest(tmp_path / "broken.csv", ["item_id", "uri"], broken)
    failed = stack.loupe("index", "--manifest", str(only_broken), "--quiet", check=False)
    assert failed.returncode == 1 and "0 indexed" in failed.stderr
    assert "skipped row 1 (gone): HTTP 404" in failed.stderr

    some = write_manifest(
        tmp_path / "some.csv", ["item_id", "uri"], [["ok-900", f"{base_url}/900.jpg"], *broken]
    )
    assert stack.loupe("index", "--manifest", str(some), "--quiet", check=False).returncode == 0
    strict = stack.loupe("index", "--manifest", str(some), "--quiet", "--strict", check=False)
    assert strict.returncode == 1 and "1 unchanged" in strict.stderr

    # The file/folder mode: files given, none indexable.
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("hello")
    assert stack.loupe("index", str(tmp_path / "folder"), "--quiet", check=False).returncode == 1


def test_an_interrupted_run_resumes_without_embedding_again(
    stack: Stack, web: tuple[str, Path], tmp_path: Path
) -> None:
    base_url, web_root = web
    ids = [f"resume-{i}" for i in range(300, 500)]
    (web_root / "slow").mkdir()
    for i in range(300, 500):
        shutil.copy(COREL / f"{i}.jpg", web_root / "slow" / f"{i}.jpg")
    path = write_manifest(
        tmp_path / "resume.csv",
        ["item_id", "uri"],
        [
            [item_id, f"{base_url}/slow/{i}.jpg"]
            for item_id, i in zip(ids, range(300, 500), strict=True)
        ],
    )
    # 4 downloads at a time of 0.3 s each: the first run lasts 15 s or more.
    command = [
        *[LOUPE, "index", "--manifest", str(path), "--catalog", "resume", "--quiet"],
        *["--download-concurrency", "4"],
    ]
    first = subprocess.Popen(
        command, env=stack.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        # Get reads what is stored now (a catalogue's item count may be a few seconds old).
        while len(stored(stack, "resume", ids[:80])) < 40 and first.poll() is None:
            assert time.monotonic() < deadline, "no progress in 120 s"
            time.sleep(0.2)
        assert first.poll() is None, f"finished before it could be interrupted: {first.stderr}"
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=30)
    assert first.returncode == 130, stderr
    time.sleep(1)  # what the gateway had already received finishes
    before = stored(stack, "resume", ids)
    assert 40 <= len(before) < len(ids)
    embedded_before = embed_calls(stack)

    rerun = stack.loupe(
        "index", "--manifest", str(path), "--catalog", "resume", "--json", "--quiet", timeout=300
    )
    lines = {line["item_id"]: line for line in json_lines(rerun.stdout)}
    assert stored(stack, "resume", ids) == set(ids)
    assert sorted(lines) == sorted(ids) and all(line["indexed"] for line in lines.values())
    assert [i for i in before if not lines[i]["unchanged"]] == []
    missing = len(ids) - len(before)
    embedded = embed_calls(stack) - embedded_before
    # Items the gateway finished after the interruption are unchanged too.
    unchanged = sum(line["unchanged"] for line in lines.values())
    print(f"interrupted with {len(before)} stored; re-run: {unchanged} unchanged, {embedded} Embed")
    assert embedded <= missing
    assert unchanged >= len(before) and f"{unchanged} unchanged" in rerun.stderr


def test_shards_together_index_every_item_once(stack: Stack, tmp_path: Path) -> None:
    ids = [f"shard-{i}" for i in range(600, 630)]
    path = write_manifest(
        tmp_path / "shards.csv",
        ["item_id", "uri"],
        [[f"shard-{i}", str(COREL / f"{i}.jpg")] for i in range(600, 630)],
    )
    runs = []
    for index in range(3):
        # Shard 0 with its progress bar: the total is counted before the run.
        quiet = ["--quiet"] if index else []
        shard = ["--json", "--shard", f"{index}/3", *quiet]
        runs.append(stack.loupe("index", "--manifest", str(path), "--catalog", "sharded", *shard))
    per_shard = [[line["item_id"] for line in json_lines(r.stdout)] for r in runs]
    assert sorted(i for shard in per_shard for i in shard) == sorted(ids)  # once each
    assert all(per_shard), per_shard
    for run in runs:
        assert all(line["indexed"] and not line["unchanged"] for line in json_lines(run.stdout))
    total = len(per_shard[0])
    assert f"{total}/{total}" in runs[0].stderr  # the bar's total is the shard's size
    assert items_in(stack, "sharded") == len(ids)
