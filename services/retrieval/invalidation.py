"""Telling the gateway's result cache that a catalogue's rows changed.

Retrieval owns the rows, so it bumps the catalogue's index generation in Redis after every
change, whatever path made it (an Upsert, a Delete, a drop, the DBA batch job rewriting rows):
cached results keyed by an older generation are unreachable at once. Redis is never a
dependency: a failure is logged and counted, the write stands, and the gateway's results age
out by their TTL (LOUPE_CACHE_SEARCH_TTL_SECONDS).
"""

from __future__ import annotations

import logging

import redis.asyncio as redis
from prometheus_client import Counter
from redis.exceptions import RedisError

from services.common.cache_keys import generation_key
from services.common.channels import TLSSettings, redis_tls_options

log = logging.getLogger(__name__)

INVALIDATIONS = Counter(
    "loupe_retrieval_cache_invalidations_total",
    "Index generation bumps sent to the result cache, by outcome (ok, failed).",
    ["outcome"],
)


class CacheInvalidator:
    def __init__(
        self, url: str, password: str, timeout_seconds: float, tls: TLSSettings | None = None
    ) -> None:
        # rediss://: LOUPE_TLS_* (given, else this process's environment).
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

    async def changed(self, catalog: str) -> None:
        if self._client is None:
            return
        try:
            await self._client.incr(generation_key(catalog))
            INVALIDATIONS.labels("ok").inc()
        except (RedisError, OSError, TimeoutError) as error:
            INVALIDATIONS.labels("failed").inc()
            log.warning(
                "cannot invalidate cached results", extra={"catalog": catalog, "error": str(error)}
            )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
