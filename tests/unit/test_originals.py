"""The originals store (services/gateway/originals.py) on a local folder and on moto's S3
server (a real S3-compatible HTTP endpoint on loopback): content-addressed, write-once,
verified on read; the gateway setting that names it, and the gateway keeping the bytes
before anything else (or refusing keep_original without a store)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from loupe.v1 import gateway_pb2
from services.common.config import ConfigError
from services.gateway.backends import Backends, RequestError
from services.gateway.cache import Cache
from services.gateway.originals import OriginalsError, OriginalsStore
from services.gateway.service import GatewayServicer
from services.gateway.settings import GatewaySettings
from tests.support import free_ports, s3_server

IMAGE = b"\xff\xd8\xff\xe0 an image, as far as the store cares" * 20


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_local_store_keeps_bytes_once_under_their_hash(tmp_path: Path) -> None:
    store = OriginalsStore(str(tmp_path / "originals"))
    sha = digest(IMAGE)
    assert sha not in store
    assert store.keep(IMAGE) is True
    path = tmp_path / "originals" / sha[:2] / sha
    assert path.read_bytes() == IMAGE and store.location(sha) == str(path)
    first_written = path.stat().st_mtime_ns
    assert store.keep(IMAGE, sha) is False  # write-once: already there
    assert path.stat().st_mtime_ns == first_written
    assert store.read(sha, max_bytes=len(IMAGE)) == IMAGE
    # Nothing but the object is left in its folder (no partial files).
    assert os.listdir(path.parent) == [sha]


def test_a_local_store_refuses_what_it_should_not_return(tmp_path: Path) -> None:
    store = OriginalsStore(f"file://{tmp_path}/originals")
    sha = digest(IMAGE)
    store.keep(IMAGE)
    with pytest.raises(OriginalsError, match="larger than 10 bytes"):
        store.read(sha, max_bytes=10)
    (tmp_path / "originals" / sha[:2] / sha).write_bytes(b"changed on disk")
    with pytest.raises(OriginalsError, match="no longer match"):
        store.read(sha, max_bytes=len(IMAGE))
    with pytest.raises(FileNotFoundError):
        store.read(digest(b"never kept"), max_bytes=100)
    with pytest.raises(OriginalsError, match="not a sha256"):
        store.path("../../etc/passwd")


@pytest.fixture(scope="module")
def s3_bucket() -> Iterator[Any]:
    """A bucket on moto's S3 server on loopback."""
    with s3_server("keep") as client:
        yield client


def test_an_s3_store_keeps_bytes_once_under_their_hash(s3_bucket: Any) -> None:
    store = OriginalsStore("s3://keep/loupe/originals")
    sha = digest(IMAGE)
    assert store.keep(IMAGE) is True
    key = f"loupe/originals/{sha[:2]}/{sha}"
    assert s3_bucket.get_object(Bucket="keep", Key=key)["Body"].read() == IMAGE
    assert store.location(sha) == f"s3://keep/{key}"
    modified = s3_bucket.head_object(Bucket="keep", Key=key)["LastModified"]
    assert store.keep(IMAGE) is False
    assert s3_bucket.head_object(Bucket="keep", Key=key)["LastModified"] == modified
    assert store.read(sha, max_bytes=len(IMAGE)) == IMAGE
    s3_bucket.put_object(Bucket="keep", Key=key, Body=b"overwritten by someone")
    with pytest.raises(OriginalsError, match="no longer match"):
        store.read(sha, max_bytes=len(IMAGE))


def test_an_unusable_bucket_is_an_originals_error(s3_bucket: Any) -> None:
    store = OriginalsStore("s3://no-such-bucket/originals")
    with pytest.raises(OriginalsError, match="cannot keep"):
        store.keep(IMAGE)


def test_the_gateway_setting_is_checked_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOUPE_AUTH", "open")
    monkeypatch.delenv("LOUPE_ORIGINALS_URI", raising=False)
    assert GatewaySettings.from_env().originals_uri == ""  # default: no store
    monkeypatch.setenv("LOUPE_ORIGINALS_URI", "nosuchprotocol://bucket/x")
    with pytest.raises(ConfigError, match="LOUPE_ORIGINALS_URI"):
        GatewaySettings.from_env()
    monkeypatch.delenv("LOUPE_ORIGINALS_URI")
    assert GatewaySettings.from_env().originals_keep == "request"
    # A policy that keeps bytes needs somewhere to keep them.
    monkeypatch.setenv("LOUPE_ORIGINALS_KEEP", "unsourced")
    with pytest.raises(ConfigError, match="LOUPE_ORIGINALS_URI"):
        GatewaySettings.from_env()
    monkeypatch.setenv("LOUPE_ORIGINALS_KEEP", "sometimes")
    with pytest.raises(ConfigError, match="LOUPE_ORIGINALS_KEEP"):
        GatewaySettings.from_env()


def gateway_index(settings: GatewaySettings, request: gateway_pb2.IndexRequest) -> RequestError:
    """What the gateway's index path raises for `request` with no backend reachable."""

    async def scenario() -> RequestError:
        backends = Backends(settings)
        servicer = GatewayServicer(settings, backends, Cache("", "", 0.1, 1.0, 1, 1))
        try:
            with pytest.raises(RequestError) as raised:
                await servicer._index(request, None)  # type: ignore[arg-type]
        finally:
            await backends.close()
        return raised.value

    return asyncio.run(scenario())


def test_the_gateway_keeps_the_bytes_before_anything_else(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LOUPE_AUTH", "open")
    monkeypatch.setenv("LOUPE_TLS", "off")
    monkeypatch.delenv("LOUPE_ORIGINALS_URI", raising=False)
    (port,) = free_ports(1)  # nothing listens: every backend call fails
    for name in ("DETECTION", "EMBEDDING", "RETRIEVAL", "RANKING"):
        monkeypatch.setenv(f"LOUPE_{name}_ADDR", f"127.0.0.1:{port}")
    settings = dataclasses.replace(
        GatewaySettings.from_env(), redis_url="", backend_timeout_seconds=0.2, retry_attempts=1
    )
    request = gateway_pb2.IndexRequest(item_id="a", image=IMAGE, keep_original=True)
    refused = gateway_index(settings, request)
    assert refused.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "LOUPE_ORIGINALS_URI" in refused.message
    # With a store, the bytes are kept first: the backends' failure comes after.
    kept = dataclasses.replace(settings, originals_uri=str(tmp_path / "originals"))
    failed = gateway_index(kept, request)
    assert failed.code != grpc.StatusCode.FAILED_PRECONDITION
    assert OriginalsStore(str(tmp_path / "originals")).read(digest(IMAGE), len(IMAGE)) == IMAGE


def test_the_keep_policy_decides_whose_bytes_are_kept(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LOUPE_AUTH", "open")
    monkeypatch.setenv("LOUPE_TLS", "off")
    (port,) = free_ports(1)  # nothing listens: every backend call fails, after the keeping
    for name in ("DETECTION", "EMBEDDING", "RETRIEVAL", "RANKING"):
        monkeypatch.setenv(f"LOUPE_{name}_ADDR", f"127.0.0.1:{port}")
    base = dataclasses.replace(
        GatewaySettings.from_env(),
        redis_url="",
        backend_timeout_seconds=0.2,
        retry_attempts=1,
    )
    cases = [
        # (policy, source_uri, keep_original) -> kept
        ("request", "", False, False),
        ("request", "/photos/a.jpg", True, True),
        ("unsourced", "", False, True),
        ("unsourced", "/photos/a.jpg", False, False),
        ("always", "/photos/a.jpg", False, True),
    ]
    for number, (policy, source_uri, keep_original, kept) in enumerate(cases):
        root = tmp_path / f"originals{number}"
        image = IMAGE + bytes([number])
        settings = dataclasses.replace(base, originals_uri=str(root), originals_keep=policy)
        request = gateway_pb2.IndexRequest(
            item_id="a", image=image, source_uri=source_uri, keep_original=keep_original
        )
        gateway_index(settings, request)
        stored = (root / digest(image)[:2] / digest(image)).exists()
        assert stored == kept, (policy, source_uri, keep_original)
