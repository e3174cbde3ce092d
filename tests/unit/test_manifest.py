"""`loupe index --manifest`: reading and typing manifests, shards, URI resolution, and fetching
against real servers on loopback: a stdlib HTTP server whose routes fail in the ways the
network does, and moto's S3 server (s3fs talks HTTP to it as to AWS)."""

from __future__ import annotations

import asyncio
import csv
import datetime
import importlib.util
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.cli import manifest
from services.cli.main import main
from services.cli.manifest import Entry, Fetcher, FetchError, Manifest, ManifestError, Source
from services.cli.parsing import MAX_IMAGE_BYTES
from tests.support import free_ports, s3_server

IMAGE = b"\xff\xd8\xff\xe0 a jpeg, as far as fetching cares" * 10


# ---- reading and typing -----------------------------------------------------------------


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as file:
        csv.writer(file).writerows(rows)
    return path


def by_id(entries: Iterator[Entry]) -> dict[str, Entry]:
    return {e.item_id: e for e in entries}


def test_csv_cells_are_typed_like_meta_values(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "m.csv",
        [
            ["item_id", "uri", "category", "price", "in_stock", "note", "sku"],
            ["a", "images/a.jpg", "shoes", "12.5", "true", "", '"42"'],
            ["b", " /abs/b.jpg ", "bags", "3", "false", "hello, world", "x"],
            ["c", "c.jpg", "nan"],  # a short row: the missing cells are absent
        ],
    )
    entries = by_id(Manifest(str(path)).entries())
    a = entries["a"].metadata
    assert a["category"].string_value == "shoes"
    assert a["price"].number_value == 12.5
    assert a["in_stock"].WhichOneof("kind") == "bool_value" and a["in_stock"].bool_value
    assert "note" not in a  # empty cell: absent
    assert a["sku"].string_value == "42"  # quoted: stays a string
    b = entries["b"]
    assert b.uri == "/abs/b.jpg" and b.metadata["in_stock"].bool_value is False
    assert b.metadata["note"].string_value == "hello, world"
    assert b.metadata["price"].number_value == 3
    assert entries["c"].metadata == {} and not entries["c"].problem
    assert [e.row for e in entries.values()] == [1, 2, 3]


def test_broken_rows_are_entries_with_a_problem(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "m.csv",
        [
            ["item_id", "uri", "tag"],
            ["", "a.jpg", "x"],
            ["b", "", "x"],
            ["c", "c.jpg", "x", "one cell too many"],
            ["d", "d.jpg", "x"],
        ],
    )
    problems = [(e.row, e.problem) for e in Manifest(str(path)).entries()]
    assert problems == [
        (1, "empty item_id"),
        (2, "empty uri"),
        (3, "the row has more cells than the header"),
        (4, ""),
    ]


def test_parquet_values_keep_their_types(tmp_path: Path) -> None:
    table = pa.table(
        {
            "sku": pa.array([1, 2, 3], pa.int64()),
            "image": ["x/1.jpg", "x/2.jpg", "x/3.jpg"],
            "price": pa.array([9.5, None, float("nan")], pa.float64()),
            "count": pa.array([7, 8, 9], pa.int32()),
            "ok": [True, False, None],
            "category": pa.array(["a", "b", "a"]).dictionary_encode(),
            "added": pa.array([datetime.datetime(2024, 5, 1, 12, 30)] * 3, pa.timestamp("s")),
            "day": pa.array([datetime.date(2024, 5, 1)] * 3, pa.date32()),
            "nothing": pa.array([None] * 3, pa.null()),
        }
    )
    path = tmp_path / "m.parquet"
    pq.write_table(table, path)
    source = Manifest(str(path), id_column="sku", uri_column="image")
    entries = by_id(source.entries())
    assert sorted(entries) == ["1", "2", "3"]  # integer ids become strings
    first = entries["1"].metadata
    assert first["price"].number_value == 9.5
    assert first["count"].WhichOneof("kind") == "number_value" and first["count"].number_value == 7
    assert first["ok"].WhichOneof("kind") == "bool_value" and first["ok"].bool_value
    assert first["category"].string_value == "a"
    assert first["added"].string_value == "2024-05-01T12:30:00"
    assert first["day"].string_value == "2024-05-01"
    assert "nothing" not in first
    assert "price" not in entries["2"].metadata  # null
    assert "price" not in entries["3"].metadata  # NaN, pandas' missing number
    assert "ok" not in entries["3"].metadata
    assert entries["2"].metadata["ok"].bool_value is False
    assert source.count() == 3


def test_parquet_is_read_in_batches(tmp_path: Path) -> None:
    rows = 3 * manifest.PARQUET_BATCH_ROWS + 7
    path = tmp_path / "big.pq"
    pq.write_table(
        pa.table({"item_id": [f"i{n}" for n in range(rows)], "uri": ["u.jpg"] * rows}),
        path,
        row_group_size=1000,
    )
    source = Manifest(str(path))
    entries = source.entries()
    first = next(entries)
    assert first.item_id == "i0" and first.row == 1
    assert sum(1 for _ in entries) == rows - 1
    assert source.count() == rows


@pytest.mark.parametrize(
    ("header", "named"),
    [
        (["item_id", "uri", "bad-key"], "bad-key"),
        (["item_id", "uri", "9lives"], "9lives"),
        (["item_id", "uri", "x" * 65], "x" * 65),
        (["item_id", "uri", "ok", "ok"], "ok"),
        (["item_id", "url"], "uri"),
        (["id", "uri"], "item_id"),
    ],
)
def test_bad_columns_refuse_the_manifest(tmp_path: Path, header: list[str], named: str) -> None:
    path = write_csv(tmp_path / "m.csv", [header, ["a"] * len(header)])
    with pytest.raises(ManifestError, match=repr(named)):
        Manifest(str(path))


def test_too_many_metadata_columns_refuse_the_manifest(tmp_path: Path) -> None:
    header = ["item_id", "uri", *(f"k{i}" for i in range(manifest.MAX_METADATA_KEYS + 1))]
    with pytest.raises(ManifestError, match="at most 64"):
        Manifest(str(write_csv(tmp_path / "m.csv", [header])))


def test_unsupported_parquet_types_and_files_refuse_the_manifest(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"item_id": ["a"], "uri": ["a.jpg"], "tags": [["x", "y"]]}), path)
    with pytest.raises(ManifestError, match="'tags'"):
        Manifest(str(path))
    with pytest.raises(ManifestError, match=r"\.csv or \.parquet"):
        Manifest(str(tmp_path / "m.txt"))
    with pytest.raises(ManifestError, match="cannot read manifest"):
        Manifest(str(tmp_path / "missing.csv"))
    (tmp_path / "fake.parquet").write_bytes(b"item_id,uri\n")
    with pytest.raises(ManifestError, match="not a readable Parquet file"):
        Manifest(str(tmp_path / "fake.parquet"))


def test_a_manifest_that_breaks_part_way_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    good = b"".join(b"item-%d,%d.jpg\n" % (i, i) for i in range(2000))
    path.write_bytes(b"item_id,uri\n" + good + b"\xff\xfe,c.jpg\n")
    entries = Manifest(str(path)).entries()
    assert next(entries).item_id == "item-0"
    with pytest.raises(ManifestError, match="cannot read past row") as error:
        for _ in range(3000):
            next(entries)
    assert "invalid start byte" in str(error.value)
    path.write_bytes(b"item_id,\xffuri\n")
    with pytest.raises(ManifestError, match="not a readable CSV file"):
        Manifest(str(path))


# ---- shards -----------------------------------------------------------------------------


def test_shard_argument() -> None:
    assert manifest.parse_shard("0/3") == manifest.Shard(0, 3)
    assert manifest.parse_shard("2/3") == manifest.Shard(2, 3)
    for bad in ("3/3", "-1/3", "1/0", "a/b", "1", "", "1/2/3"):
        with pytest.raises(ManifestError, match="--shard"):
            manifest.parse_shard(bad)


def test_shards_are_a_stable_hash_of_the_id() -> None:
    # Pinned: a shard must not move between releases, or a re-run would index into a
    # different shard's items (first 8 bytes of SHA-256, big-endian, mod N).
    assert [manifest.shard_of("a", n) for n in (2, 3, 10, 1000)] == [0, 1, 0, 250]
    assert [manifest.shard_of("é/ü.jpg", n) for n in (2, 3, 10, 1000)] == [0, 2, 0, 160]
    ids = [f"item-{i}" for i in range(3000)]
    sizes = Counter(manifest.shard_of(i, 3) for i in ids)
    assert sorted(sizes) == [0, 1, 2] and min(sizes.values()) > 900


def test_shards_are_disjoint_complete_and_independent_of_row_order(tmp_path: Path) -> None:
    ids = [f"photos/{i}.jpg" for i in range(300)]
    rows = [[i, f"{i}"] for i in ids]
    ordered = Manifest(str(write_csv(tmp_path / "a.csv", [["item_id", "uri"], *rows])))
    random.Random(7).shuffle(rows)
    shuffled = Manifest(str(write_csv(tmp_path / "b.csv", [["item_id", "uri"], *rows])))
    seen: list[str] = []
    for index in range(3):
        shard = manifest.Shard(index, 3)
        mine = [e.item_id for e in ordered.entries(shard)]
        assert set(mine) == {e.item_id for e in shuffled.entries(shard)}
        assert ordered.count(shard) == len(mine) == shuffled.count(shard)
        seen += mine
    assert sorted(seen) == sorted(ids)  # every row in exactly one shard
    assert ordered.count() == 300


# ---- URI resolution ---------------------------------------------------------------------


def test_uris_resolve_against_a_local_manifest(tmp_path: Path) -> None:
    base = Manifest(str(write_csv(tmp_path / "m.csv", [["item_id", "uri"]]))).base
    assert base == tmp_path
    assert manifest.resolve("img/a.jpg", base) == Source(
        "file", str(tmp_path / "img/a.jpg"), str(tmp_path / "img/a.jpg")
    )
    assert manifest.resolve("../x/../b.jpg", base).location == str(tmp_path.parent / "b.jpg")
    assert manifest.resolve("/data/c.jpg", base).location == "/data/c.jpg"
    assert manifest.resolve("file:///data/my%20photo.jpg", base).location == "/data/my photo.jpg"
    assert manifest.resolve("d.jpg", None).location == os.path.abspath("d.jpg")
    assert manifest.resolve("https://example.com/a.jpg?x=1", base) == Source(
        "http", "https://example.com/a.jpg?x=1", "https://example.com/a.jpg?x=1"
    )
    assert manifest.resolve("S3://bucket/key.jpg", base).protocol == "s3"
    assert manifest.resolve("gs://bucket/key.jpg", base).protocol == "gs"


# ---- fetching: a loopback HTTP server ---------------------------------------------------


class Routes(BaseHTTPRequestHandler):
    hits: Counter[str] = Counter()
    in_flight = 0
    most_in_flight = 0
    lock = threading.Lock()

    def log_message(self, *args: Any) -> None:
        pass

    def send(self, status: int, body: bytes = b"", length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path
        counted = path.startswith("/pause")  # other routes may outlive their client
        with self.lock:
            self.hits[path] += 1
            hits = self.hits[path]
            Routes.in_flight += counted
            Routes.most_in_flight = max(Routes.most_in_flight, Routes.in_flight)
        try:
            self.route(path, hits)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should have
        finally:
            with self.lock:
                Routes.in_flight -= counted

    def route(self, path: str, hits: int) -> None:
        if path.startswith("/ok"):
            self.send(200, IMAGE)
        elif path.startswith("/flaky"):  # 503 twice, then the image
            self.send(503) if hits <= 2 else self.send(200, IMAGE)
        elif path.startswith("/busy"):
            self.send(429)
        elif path.startswith("/forbidden"):
            self.send(403)
        elif path.startswith("/slow"):
            time.sleep(1.0)
            self.send(200, IMAGE)
        elif path.startswith("/pause"):
            time.sleep(0.2)
            self.send(200, IMAGE)
        elif path.startswith("/huge"):
            # Declares more than the limit, then sends slowly: a client that reads before it
            # looks at the length would time out instead of refusing at once.
            self.send(200, b"\0" * 65536, length=MAX_IMAGE_BYTES + 1)
            for _ in range(50):
                time.sleep(0.1)
                self.wfile.write(b"\0" * 1024)
        elif path.startswith("/unsized"):  # no Content-Length: read until the server closes
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"\0" * 300_000)
        else:
            self.send(404)


@pytest.fixture(scope="module")
def http_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Routes)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def fetch_all(uris: list[str], **options: Any) -> list[bytes | BaseException]:
    """Each URI fetched by one Fetcher, with the test's own deadline on the whole."""
    options.setdefault("backoff", 0.01)

    async def run() -> list[bytes | BaseException]:
        async with Fetcher(**options) as fetcher:
            return await asyncio.gather(
                *(fetcher.fetch(manifest.resolve(u, None)) for u in uris), return_exceptions=True
            )

    return asyncio.run(asyncio.wait_for(run(), 30))


def test_http_ok_and_permanent_failures_are_not_retried(http_server: str) -> None:
    ok, missing, forbidden = fetch_all(
        [f"{http_server}/ok-1", f"{http_server}/missing-1", f"{http_server}/forbidden-1"]
    )
    assert ok == IMAGE
    assert isinstance(missing, FetchError) and str(missing) == "HTTP 404 Not Found"
    assert isinstance(forbidden, FetchError) and "HTTP 403" in str(forbidden)
    assert Routes.hits["/missing-1"] == 1 and Routes.hits["/forbidden-1"] == 1


def test_http_503_is_retried_until_it_succeeds(http_server: str) -> None:
    [data] = fetch_all([f"{http_server}/flaky-1"], retries=3)
    assert data == IMAGE and Routes.hits["/flaky-1"] == 3


def test_http_429_is_retried_then_reported(http_server: str) -> None:
    [error] = fetch_all([f"{http_server}/busy-1"], retries=2)
    assert isinstance(error, FetchError)
    assert str(error) == "HTTP 429 Too Many Requests (after 3 attempts)"
    assert Routes.hits["/busy-1"] == 3


def test_a_slow_response_times_out_is_retried_then_reported(http_server: str) -> None:
    started = time.monotonic()
    [error] = fetch_all([f"{http_server}/slow-1"], timeout=0.2, retries=2)
    assert isinstance(error, FetchError)
    assert str(error) == "timed out after 0.2s (after 3 attempts)"
    assert Routes.hits["/slow-1"] == 3 and time.monotonic() - started < 5


def test_oversized_bodies_are_refused(http_server: str) -> None:
    started = time.monotonic()
    [declared] = fetch_all([f"{http_server}/huge-1"], timeout=3)
    # Refused from its Content-Length, long before the server would finish sending.
    assert isinstance(declared, FetchError) and time.monotonic() - started < 2
    assert str(declared) == f"{MAX_IMAGE_BYTES + 1} bytes; the limit is {MAX_IMAGE_BYTES}"
    [unsized] = fetch_all([f"{http_server}/unsized-1"], max_bytes=100_000)
    assert isinstance(unsized, FetchError) and "limit of 100000 bytes" in str(unsized)
    assert Routes.hits["/huge-1"] == 1 and Routes.hits["/unsized-1"] == 1


def test_an_unreachable_host_is_retried_then_reported() -> None:
    closed = free_ports(1)[0]
    [error] = fetch_all([f"http://127.0.0.1:{closed}/a.jpg"], retries=1)
    assert isinstance(error, FetchError) and "(after 2 attempts)" in str(error)
    assert "127.0.0.1" in str(error)


def test_downloads_in_flight_are_bounded(http_server: str) -> None:
    Routes.most_in_flight = 0
    started = time.monotonic()
    results = fetch_all([f"{http_server}/pause-{i}" for i in range(9)], concurrency=3)
    assert results == [IMAGE] * 9
    assert 2 <= Routes.most_in_flight <= 3
    assert time.monotonic() - started >= 0.55  # three rounds of 0.2 s


def test_local_files(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(IMAGE)
    (tmp_path / "big.jpg").write_bytes(b"\0" * 2000)
    (tmp_path / "folder").mkdir()
    paths = [str(tmp_path / n) for n in ("a.jpg", "missing.jpg", "big.jpg", "folder")]
    ok, missing, big, folder = fetch_all(paths, max_bytes=1000)
    assert ok == IMAGE
    assert str(missing) == "not found"
    assert str(big) == "2000 bytes; the limit is 1000"
    assert str(folder) == "not a regular file"


def test_other_fsspec_filesystems_and_missing_ones() -> None:
    # fsspec's in-memory filesystem is synchronous: the blocking path, in a thread.
    fsspec.filesystem("memory").pipe("/loupe-test/a.jpg", IMAGE)
    ok, unknown = fetch_all(["memory://loupe-test/a.jpg", "nosuch://bucket/a.jpg"])
    assert ok == IMAGE
    assert str(unknown) == "no filesystem for nosuch:// URIs"


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_gs_without_gcsfs_says_what_to_install() -> None:
    [error] = fetch_all(["gs://bucket/a.jpg"])
    assert isinstance(error, FetchError) and "pip install gcsfs" in str(error)


# ---- fetching and manifests on S3: moto's server ----------------------------------------


@pytest.fixture(scope="module")
def s3_bucket() -> Iterator[Any]:
    """A bucket on moto's S3 server on loopback."""
    with s3_server("photos") as client:
        yield client


def test_s3_objects_are_fetched_and_failures_reported(s3_bucket: Any) -> None:
    s3_bucket.put_object(Bucket="photos", Key="a.jpg", Body=IMAGE)
    s3_bucket.put_object(Bucket="photos", Key="big.jpg", Body=b"\0" * 5000)
    s3_bucket.put_object(Bucket="photos", Key="empty.jpg", Body=b"")
    ok, missing, big, no_bucket, empty = fetch_all(
        [
            "s3://photos/a.jpg",
            "s3://photos/nope.jpg",
            "s3://photos/big.jpg",
            "s3://nobucket/a",
            "s3://photos/empty.jpg",
        ],
        max_bytes=1000,
    )
    assert ok == IMAGE
    assert str(missing) == "not found" and str(no_bucket) == "not found"
    assert str(big) == "5000 bytes; the limit is 1000"
    assert str(empty) == "empty file"


def test_a_manifest_on_s3(s3_bucket: Any, tmp_path: Path) -> None:
    local = write_csv(tmp_path / "m.csv", [["item_id", "uri", "n"], ["a", "s3://photos/a", "1"]])
    s3_bucket.put_object(Bucket="photos", Key="lists/m.csv", Body=local.read_bytes())
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"item_id": ["p", "q"], "uri": ["p.jpg", "q.jpg"]}), path)
    s3_bucket.put_object(Bucket="photos", Key="lists/m.parquet", Body=path.read_bytes())
    remote = Manifest("s3://photos/lists/m.csv")
    assert remote.base is None
    [entry] = remote.entries()
    assert (entry.item_id, entry.uri, entry.metadata["n"].number_value) == ("a", "s3://photos/a", 1)
    parquet = Manifest("s3://photos/lists/m.parquet")
    assert [e.item_id for e in parquet.entries()] == ["p", "q"] and parquet.count() == 2


@pytest.mark.parametrize(
    ("status", "code", "transient"),
    [(503, "SlowDown", True), (500, "InternalError", True), (404, "NoSuchKey", False),
     (403, "AccessDenied", False), (400, "InvalidRequest", False)],
)  # fmt: skip
def test_s3_errors_are_retried_by_their_status(status: int, code: str, transient: bool) -> None:
    """S3 throttling and 5xx cannot be had from moto on demand: the error s3fs raises for
    them is built here, through s3fs's own translation of botocore's error."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    response: Any = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    error = translate_boto_error(ClientError(response, "GetObject"))
    assert manifest.is_transient(error) is transient


# ---- the command's own checks (no stack needed) -----------------------------------------


def test_usage_errors_and_an_unreachable_gateway(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "a.jpg"
    image.write_bytes(IMAGE)
    good = write_csv(tmp_path / "m.csv", [["item_id", "uri"], ["a", "a.jpg"]])
    bad = write_csv(tmp_path / "bad.csv", [["item_id", "uri", "price-eur"], ["a", "a.jpg", "1"]])
    gateway = f"127.0.0.1:{free_ports(1)[0]}"
    base = ["index", "--quiet", "--gateway", gateway]

    assert main([*base, "--manifest", str(bad)]) == 2
    assert "'price-eur'" in capsys.readouterr().err
    assert main([*base, "--manifest", str(good), "--shard", "3/3"]) == 2
    assert "--shard '3/3'" in capsys.readouterr().err
    assert main([*base, "--manifest", str(good), str(image)]) == 2
    assert main([*base, str(image), "--shard", "0/2"]) == 2
    assert "applies to --manifest only" in capsys.readouterr().err
    assert main([*base, "--manifest", str(good)]) == 1
    assert "cannot reach the gateway" in capsys.readouterr().err
