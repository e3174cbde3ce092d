"""Redis caches for the gateway: embeddings by content, search results by request.

Redis is an optimisation, never a dependency: every failure is counted
(loupe_gateway_cache_errors_total) and the request goes on uncached. After a failure the
gateway leaves Redis alone for LOUPE_REDIS_RETRY_SECONDS, so an outage costs one timeout,
not one per request.

Search results are keyed by an index generation that every write increments, so a write
makes every older cached result unreachable at once; TTLs reclaim the memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as redis
from redis.exceptions import RedisError

from services.common.cache_keys import embedding_key, generation_key, search_key
from services.common.channels import TLSSettings, redis_tls_options
from services.gateway.metrics import CACHE_ERRORS

__all__ = ["Cache", "embedding_key", "generation_key", "search_key"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def _as_bytes(value: bytes | str | None) -> bytes | None:
    # The client is built without decode_responses, so values are bytes; str only in theory.
    return value.encode() if isinstance(value, str) else value


class Cache:
    def __init__(
        self,
        url: str,
        password: str,
        timeout_seconds: float,
        retry_seconds: float,
        embedding_ttl_seconds: int,
        search_ttl_seconds: int,
        tls: TLSSettings | None = None,
    ) -> None:
        # rediss://: LOUPE_TLS_* (the gateway's settings, else this process's environment).
        if tls is None and url.startswith("rediss://"):
            tls = TLSSettings.from_env()
        self._client = (
            redis.Redis.from_url(
                url,
                password=password or None,
                socket_timeout=timeout_seconds,
                socket_connect_timeout=timeout_seconds,
                retry_on_timeout=False,
                **redis_tls_options(url, tls),
            )
            if url
            else None
        )
        self._retry_seconds = retry_seconds
        self._embedding_ttl = embedding_ttl_seconds
        self._search_ttl = search_ttl_seconds
        self._skip_until = 0.0

    @property
    def enabled(self) -> bool:
        return self._client is not None

    async def _run(
        self, operation: str, call: Callable[[redis.Redis], Awaitable[T]]
    ) -> tuple[bool, T | None]:
        """(True, result) when Redis answered; (False, None) when disabled or failed."""
        if self._client is None:
            return False, None
        if time.monotonic() < self._skip_until:
            CACHE_ERRORS.labels(operation).inc()
            return False, None
        try:
            return True, await call(self._client)
        except (RedisError, OSError, TimeoutError) as error:
            CACHE_ERRORS.labels(operation).inc()
            self._skip_until = time.monotonic() + self._retry_seconds
            log.warning(
                "redis failed; continuing without cache",
                extra={
                    "operation": operation,
                    "error": str(error),
                    "retry_seconds": self._retry_seconds,
                },
            )
            return False, None

    async def get_embedding(self, key: str) -> bytes | None:
        return _as_bytes((await self._run("get_embedding", lambda r: r.get(key)))[1])

    async def set_embedding(self, key: str, value: bytes) -> None:
        await self._run("set_embedding", lambda r: r.set(key, value, ex=self._embedding_ttl))

    async def generation(self, catalog: str) -> int | None:
        """The catalogue's index generation, or None when it cannot be read (then no search is
        cached)."""
        key = generation_key(catalog)
        answered, value = await self._run("get_generation", lambda r: r.get(key))
        if not answered:
            return None
        return int(value) if value is not None else 0

    async def bump_generation(self, catalog: str) -> None:
        key = generation_key(catalog)
        await self._run("bump_generation", lambda r: r.incr(key))

    async def get_search(self, key: str) -> bytes | None:
        return _as_bytes((await self._run("get_search", lambda r: r.get(key)))[1])

    async def set_search(self, key: str, value: bytes) -> None:
        await self._run("set_search", lambda r: r.set(key, value, ex=self._search_ttl))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
