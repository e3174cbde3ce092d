"""`loupe reindex`'s own logic against a scripted gateway on loopback (real gRPC, the CLI run
in-process): which items it sends and how, where it gets their bytes, what it reports, when it
switches, how a second run resumes and how shards split the work. The whole migration against
a real stack is tests/integration/test_lifecycle.py."""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from loupe.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, retrieval_pb2
from services.cli.main import main
from services.cli.manifest import Shard
from services.cli.reindex import model_id, side_by_side
from services.gateway.originals import OriginalsStore
from tests.support import free_ports, s3_server, serving

Action = retrieval_pb2.MigrateCatalogRequest.Action
OLD, NEW = "embedder/1", "embedder_gem3/1"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Row:
    content_hash: str
    source_uri: str = ""
    objects: int = 0


@dataclass
class FakeGateway(gateway_pb2_grpc.GatewayServicer):
    """A catalogue's two collections as dicts; MigrateCatalog and IndexStream as the contract
    describes them (BEGIN idempotent, if_live_content_hash honoured)."""

    live: dict[str, Row] = field(default_factory=dict)
    next: dict[str, Row] | None = None
    previous: dict[str, Row] | None = None
    live_model: str = OLD
    sent: list[gateway_pb2.IndexRequest] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    # When the first stream comes, a writer replaces item01 and deletes item02, and the gateway
    # writes the replacement into both collections (dual writes).
    race: bool = False
    # When the first stream comes, a gateway that has not seen the new collection yet writes
    # item99 into the live one only.
    late: bytes = b""
    late_source: str = ""
    name: str = "gateway"
    grpc_services: list[str] = field(default_factory=list)

    def register(self, server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_GatewayServicer_to_server(self, server)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return []

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def record(self) -> retrieval_pb2.CatalogRecord:
        record = retrieval_pb2.CatalogRecord(catalog="c")
        record.live.CopyFrom(retrieval_pb2.ModelBinding(embedder=self.live_model, collection="c"))
        if self.next is not None:
            record.next.CopyFrom(retrieval_pb2.ModelBinding(embedder=NEW, collection="c__g2"))
        if self.previous is not None:
            record.previous.CopyFrom(retrieval_pb2.ModelBinding(embedder=OLD, collection="c"))
        return record

    async def MigrateCatalog(
        self, request: retrieval_pb2.MigrateCatalogRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.CatalogRecord:
        action = Action.Name(request.action)
        self.actions.append(action)
        if action == "BEGIN":
            assert request.binding.embedder in (NEW, NEW.split("/")[0])  # bare: resolved here
            if self.next is None:
                self.next = {}
        elif action == "SWITCH":
            assert self.next is not None
            self.previous, self.live, self.next = self.live, self.next, None
            self.live_model = NEW
        return self.record()

    async def ListItems(
        self, request: retrieval_pb2.ListItemsRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.ListItemsResponse:
        rows = self.live if request.model in ("", self.live_model) else self.next
        assert rows is not None
        # Small pages: the listing's paging is part of what is tested.
        ids = sorted(i for i in rows if i > request.after_item_id)[:3]
        reply = retrieval_pb2.ListItemsResponse(next_after_item_id=ids[-1] if len(ids) == 3 else "")
        for item_id in ids:
            row = rows[item_id]
            reply.items.add(
                item_id=item_id,
                content_hash=row.content_hash,
                source_uri=row.source_uri,
                objects=row.objects,
                metadata={"n": common_pb2.Value(number_value=len(item_id))},
            )
        return reply

    async def ListCatalogs(
        self, request: gateway_pb2.ListCatalogsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListCatalogsResponse:
        return gateway_pb2.ListCatalogsResponse(
            catalogs=[gateway_pb2.Catalog(name="c", items=len(self.live))]
        )

    async def IndexStream(
        self,
        request_iterator: AsyncIterator[gateway_pb2.IndexRequest],
        context: grpc.aio.ServicerContext,
    ) -> gateway_pb2.IndexStreamResponse:
        reply = gateway_pb2.IndexStreamResponse()
        if self.race and self.next is not None:
            self.race = False
            self.live["item01"] = self.next["item01"] = Row(sha(b"new bytes"))
            self.live.pop("item02", None)
        if self.late:
            self.live["item99"] = Row(sha(self.late), self.late_source)
            self.late = b""
        async for request in request_iterator:
            self.sent.append(request)
            assert request.model == NEW and self.next is not None
            content_hash = sha(request.image)
            live = self.live.get(request.item_id)
            response = gateway_pb2.IndexResponse(item_id=request.item_id)
            if live is None:
                response.skipped = "deleted"
            elif live.content_hash != request.if_live_content_hash:
                response.skipped = "changed"
            else:
                assert content_hash == request.if_live_content_hash
                self.next[request.item_id] = Row(content_hash, request.source_uri)
                response.indexed = True
            reply.results.add(item_id=request.item_id, response=response)
        return reply


@pytest.fixture
def files(tmp_path: Path) -> dict[str, bytes]:
    images = {f"item{n:02d}": f"image {n}".encode() * 10 for n in range(10)}
    for item_id, data in images.items():
        (tmp_path / f"{item_id}.jpg").write_bytes(data)
    return images


@pytest.fixture
def gateway(tmp_path: Path, files: dict[str, bytes]) -> Iterator[tuple[FakeGateway, str]]:
    fake = FakeGateway()
    for item_id, data in files.items():
        fake.live[item_id] = Row(sha(data), str(tmp_path / f"{item_id}.jpg"), objects=1)
    (port,) = free_ports(1)
    with serving(fake, port):  # type: ignore[arg-type]
        yield fake, f"127.0.0.1:{port}"


def reindex(address: str, tmp_path: Path, *args: str) -> int:
    return main(
        [
            "reindex", "c", "--gateway", address, "--api-key", "k", "--quiet",
            "--data-dir", str(tmp_path / "data"), *args,
        ]
    )  # fmt: skip


def failures(tmp_path: Path) -> list[dict[str, str]]:
    path = tmp_path / "data" / "reindex" / "c.failures.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_item_is_sent_with_the_new_model_then_the_catalogue_switches(
    gateway: tuple[FakeGateway, str], tmp_path: Path, files: dict[str, bytes]
) -> None:
    fake, address = gateway
    assert reindex(address, tmp_path, "--model", "embedder_gem3:1") == 0
    assert fake.actions == ["STATUS", "BEGIN", "SWITCH"]
    assert sorted(r.item_id for r in fake.sent) == sorted(files)
    for request in fake.sent:
        assert request.image == files[request.item_id]
        assert request.if_live_content_hash == sha(request.image)
        assert request.detect and request.catalog == "c"
        assert request.source_uri.endswith(f"{request.item_id}.jpg")
        assert request.metadata["n"].number_value == len(request.item_id)
    assert fake.live_model == NEW and fake.previous is not None
    # Nothing left to do: it says so and changes nothing.
    fake.sent.clear()
    assert reindex(address, tmp_path, "--model", "embedder_gem3:1") == 0
    assert not fake.sent and fake.actions[-1] == "STATUS"


def test_a_missing_source_stops_the_switch_unless_allowed(
    gateway: tuple[FakeGateway, str], tmp_path: Path, files: dict[str, bytes]
) -> None:
    fake, address = gateway
    (tmp_path / "item03.jpg").unlink()
    (tmp_path / "item04.jpg").write_bytes(b"other bytes now")
    fake.live["item05"].source_uri = ""
    assert reindex(address, tmp_path, "--model", "embedder_gem3", "--no-switch") == 1
    assert "SWITCH" not in fake.actions
    reported = {f["item_id"]: f["error"] for f in failures(tmp_path)}
    assert set(reported) == {"item03", "item04", "item05"}
    assert "not found" in reported["item03"]
    assert "has changed since it was indexed" in reported["item04"]
    assert "no source recorded" in reported["item05"]
    assert fake.next is not None and len(fake.next) == 7

    # A second run resumes: only the three missing items are tried again; with the originals
    # store holding two of them and --allow-missing, it switches without the third.
    store = OriginalsStore(str(tmp_path / "originals"))
    store.keep(files["item03"])
    store.keep(files["item04"])
    fake.sent.clear()
    code = reindex(
        address, tmp_path, "--model", "embedder_gem3", "--allow-missing",
        "--originals", str(tmp_path / "originals"),
    )  # fmt: skip
    assert code == 1  # switched, but an item is left out: said by the exit status
    assert sorted(r.item_id for r in fake.sent) == ["item03", "item04"]
    assert fake.actions[-1] == "SWITCH"
    assert [f["item_id"] for f in failures(tmp_path)] == ["item05"]
    assert "item05" not in fake.live


def test_shards_split_the_items_and_never_switch(
    gateway: tuple[FakeGateway, str], tmp_path: Path, files: dict[str, bytes]
) -> None:
    fake, address = gateway
    seen: list[set[str]] = []
    for index in range(3):
        fake.sent.clear()
        assert (
            reindex(address, tmp_path, "--model", "embedder_gem3:1", "--shard", f"{index}/3") == 0
        )
        seen.append({r.item_id for r in fake.sent})
        assert "SWITCH" not in fake.actions
    assert set().union(*seen) == set(files) and sum(map(len, seen)) == len(files)
    fake.sent.clear()
    assert reindex(address, tmp_path, "--model", "embedder_gem3:1") == 0
    assert not fake.sent and fake.actions[-1] == "SWITCH"


def test_items_changed_or_deleted_meanwhile_are_not_missing(
    gateway: tuple[FakeGateway, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake, address = gateway
    fake.race = True
    assert reindex(address, tmp_path, "--model", "embedder_gem3:1") == 0
    assert "0 missing, skipped as 1 changed, 1 deleted meanwhile" in capsys.readouterr().err
    assert fake.actions[-1] == "SWITCH"
    assert fake.live["item01"].content_hash == sha(b"new bytes") and "item02" not in fake.live


def test_a_live_only_write_during_the_walk_is_caught_up(
    gateway: tuple[FakeGateway, str], tmp_path: Path
) -> None:
    fake, address = gateway
    (tmp_path / "late.jpg").write_bytes(b"written late")
    fake.late, fake.late_source = b"written late", str(tmp_path / "late.jpg")
    assert reindex(address, tmp_path, "--model", "embedder_gem3:1") == 0
    assert fake.actions[-1] == "SWITCH"
    assert fake.live["item99"].content_hash == sha(b"written late")
    assert [r.item_id for r in fake.sent].count("item99") == 1


def test_model_names_and_the_merge() -> None:
    assert model_id("embedder_gem3:1") == "embedder_gem3/1"
    assert model_id("embedder_gem3/2") == "embedder_gem3/2"
    assert model_id("embedder_gem3") == "embedder_gem3"

    async def items(*ids: str) -> AsyncIterator[retrieval_pb2.ListedItem]:
        for item_id in ids:
            yield retrieval_pb2.ListedItem(item_id=item_id)

    async def merged(shard: Shard | None) -> list[tuple[str, str]]:
        return [
            (a.item_id, b.item_id if b else "")
            async for a, b in side_by_side(
                items("a", "c", "d", "f"), items("b", "c", "f", "g"), shard
            )
        ]

    import asyncio

    assert asyncio.run(merged(None)) == [("a", ""), ("c", "c"), ("d", ""), ("f", "f")]
    halves = [asyncio.run(merged(Shard(i, 2))) for i in range(2)]
    assert sorted(sum(halves, [])) == [("a", ""), ("c", "c"), ("d", ""), ("f", "f")]


@pytest.fixture
def s3_bucket() -> Iterator[Any]:
    """A bucket on moto's S3 server on loopback."""
    with s3_server("photos") as client:
        yield client


def test_sources_and_originals_on_s3(
    gateway: tuple[FakeGateway, str], tmp_path: Path, files: dict[str, bytes], s3_bucket: Any
) -> None:
    """Sources at s3:// URIs, and an originals store in a bucket (LOUPE_ORIGINALS_URI) for the
    item whose object is gone."""
    fake, address = gateway
    for item_id, data in files.items():
        s3_bucket.put_object(Bucket="photos", Key=f"{item_id}.jpg", Body=data)
        fake.live[item_id].source_uri = f"s3://photos/{item_id}.jpg"
    s3_bucket.delete_object(Bucket="photos", Key="item07.jpg")
    OriginalsStore("s3://photos/originals").keep(files["item07"])
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LOUPE_ORIGINALS_URI", "s3://photos/originals")
        assert reindex(address, tmp_path, "--model", "embedder_gem3:1") == 0
    assert fake.actions[-1] == "SWITCH"
    assert {r.item_id: r.image for r in fake.sent} == files


def test_failures_go_to_the_temporary_folder_when_the_data_dir_is_read_only(
    gateway: tuple[FakeGateway, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """As in the chart's Jobs (read-only root, a /tmp emptyDir): not a traceback."""
    fake, address = gateway
    (tmp_path / "item03.jpg").unlink()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    # Its reindex folder cannot be made (root may write anywhere, so a file stands in the way).
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "reindex").write_text("not a folder")
    code = reindex(address, tmp_path, "--model", "embedder_gem3:1")
    assert code == 1 and "SWITCH" not in fake.actions
    written = tmp_path / "tmp" / "loupe-reindex" / "c.failures.jsonl"
    assert [json.loads(line)["item_id"] for line in written.read_text().splitlines()] == ["item03"]
    err = capsys.readouterr().err
    assert f"using {written}" in err and "missing item03: " in err  # logged with --quiet too


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["c"], "give --model"),
        (["c", "--rollback", "--model", "x"], "takes no --model"),
        (["c", "--status", "--abort"], "give one of"),
        (["c", "--model", "x:y"], "NAME:VERSION"),
        (["c", "--model", "x", "--shard", "3/2"], "0 <= I < N"),
    ],
)
def test_bad_usage_is_refused_before_any_call(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (port,) = free_ports(1)  # nothing listens there: a call would fail with exit status 1
    assert main(["reindex", *args, "--gateway", f"127.0.0.1:{port}", "--api-key", "k"]) == 2
    assert message in capsys.readouterr().err
