"""Cache keys, and the cache against a real redis-server, including one that dies."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from loupe.v1 import common_pb2, gateway_pb2
from services.cli.stack import redis_server_binary
from services.gateway.cache import Cache, embedding_key, search_key
from services.gateway.metrics import CACHE_ERRORS


def request_bytes(**fields: object) -> bytes:
    return gateway_pb2.SearchRequest(**fields).SerializeToString(deterministic=True)  # type: ignore[arg-type]


def test_search_key_is_stable_for_equal_requests() -> None:
    a = gateway_pb2.SearchRequest(item_id="x", top_k=5)
    a.context_metadata["b"].string_value = "2"
    a.context_metadata["a"].string_value = "1"
    b = gateway_pb2.SearchRequest(item_id="x", top_k=5)
    b.context_metadata["a"].string_value = "1"
    b.context_metadata["b"].string_value = "2"
    assert search_key(3, a.SerializeToString(deterministic=True)) == search_key(
        3, b.SerializeToString(deterministic=True)
    )


def test_search_key_changes_with_generation_and_every_field() -> None:
    base = request_bytes(item_id="x", top_k=5)
    keys = {
        search_key(1, base),
        search_key(2, base),
        search_key(1, request_bytes(item_id="y", top_k=5)),
        search_key(1, request_bytes(item_id="x", top_k=6)),
        search_key(1, request_bytes(item_id="x", top_k=5, objects=True)),
        search_key(
            1,
            request_bytes(
                item_id="x",
                top_k=5,
                filter=common_pb2.Filter(
                    all=[common_pb2.Condition(field="c", equals=common_pb2.Value(bool_value=True))]
                ),
            ),
        ),
    }
    assert len(keys) == 6


def test_embedding_key_names_both_models_and_the_content() -> None:
    key = embedding_key("embedder/1", "detector/1", "ab" * 32)
    assert key == f"loupe:emb:embedder/1:detector/1:{'ab' * 32}"
    assert embedding_key("embedder/2", "detector/1", "ab" * 32) != key
    assert embedding_key("embedder/1", "-", "ab" * 32) != key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def redis_server(tmp_path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    process = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield process, port
    process.kill()
    process.wait()


def errors() -> float:
    return sum(
        sample.value
        for metric in CACHE_ERRORS.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


def test_cache_round_trip_and_survives_redis_dying(redis_server) -> None:
    process, port = redis_server

    async def scenario() -> None:
        cache = Cache(f"redis://127.0.0.1:{port}/0", "", 0.2, 0.0, 60, 60)
        assert await cache.generation("default") == 0
        await cache.bump_generation("default")
        assert await cache.generation("default") == 1
        # Catalogues keep separate generations: a write to one keeps the other's results.
        assert await cache.generation("other") == 0
        await cache.set_search("k", b"v")
        assert await cache.get_search("k") == b"v"
        await cache.set_embedding("e", b"vec")
        assert await cache.get_embedding("e") == b"vec"

        process.kill()
        process.wait()
        before = errors()
        # Every operation degrades to "no cache" instead of raising.
        assert await cache.get_search("k") is None
        assert await cache.generation("default") is None
        await cache.set_search("k", b"v")
        await cache.bump_generation("default")
        assert errors() >= before + 4
        await cache.close()

    asyncio.run(scenario())


def test_after_a_failure_redis_is_left_alone_for_the_retry_period(redis_server) -> None:
    process, port = redis_server
    process.kill()
    process.wait()

    async def scenario() -> float:
        cache = Cache(f"redis://127.0.0.1:{port}/0", "", 0.2, 60.0, 60, 60)
        await cache.get_search("k")  # fails and starts the retry period
        started = time.perf_counter()
        for _ in range(50):
            assert await cache.get_search("k") is None
        await cache.close()
        return time.perf_counter() - started

    # Skipped calls do not even open a socket.
    assert asyncio.run(scenario()) < 0.5


def test_no_url_means_no_cache() -> None:
    async def scenario() -> None:
        cache = Cache("", "", 0.1, 1.0, 60, 60)
        assert not cache.enabled
        assert await cache.generation("default") is None
        assert await cache.get_embedding("x") is None

    asyncio.run(scenario())
