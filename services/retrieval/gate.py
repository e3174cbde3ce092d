"""Per-catalogue gate between item writes and whole-catalogue jobs.

Writes (upserts, deletes) run side by side; a job that rewrites the catalogue (the DBA batch,
a drop) runs alone. Otherwise the batch job, which reads every item and writes them back,
could bring back an item deleted meanwhile or overwrite a newer version of one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class CatalogGate:
    def __init__(self) -> None:
        self._writers: dict[str, int] = {}
        self._exclusive: set[str] = set()
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def shared(self, catalog: str) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: catalog not in self._exclusive)
            self._writers[catalog] = self._writers.get(catalog, 0) + 1
        try:
            yield
        finally:
            async with self._changed:
                self._writers[catalog] -= 1
                self._changed.notify_all()

    @asynccontextmanager
    async def exclusive(self, catalog: str) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(
                lambda: catalog not in self._exclusive and not self._writers.get(catalog)
            )
            self._exclusive.add(catalog)
        try:
            yield
        finally:
            async with self._changed:
                self._exclusive.discard(catalog)
                self._changed.notify_all()

    def busy(self, catalog: str) -> bool:
        """Whether a whole-catalogue job is running on it now."""
        return catalog in self._exclusive

    async def wait_idle(self, catalog: str) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: catalog not in self._exclusive)
