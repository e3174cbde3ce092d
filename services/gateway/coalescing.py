"""Many callers, one backend call: the gateway's per-item calls of bulk ingestion, batched.

Indexing an item asks retrieval two things: is it already stored (before embedding), and
write it (after). Sent one by one, each is a gRPC call on both sides and a Milvus query or
write, and on two cores that costs as much CPU as embedding the image. Callers of the same
kind and key (the catalogue) that arrive while a call is being sent wait and go together in
the next; at most `max_in_flight` calls are out at once. Under load batches grow by
themselves; a lone caller is sent at once, unless `max_delay` asks to wait that long for
company (bulk ingestion, where an item's latency matters less than the items per second).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

Key = TypeVar("Key", bound=Hashable)
Request = TypeVar("Request")
Result = TypeVar("Result")


@dataclass
class _Waiting(Generic[Key, Request, Result]):
    key: Key
    request: Request
    future: asyncio.Future[Result]
    # When it arrived (the event loop's clock).
    since: float


class Coalescer(Generic[Key, Request, Result]):
    def __init__(
        self,
        send: Callable[[Key, list[Request]], Awaitable[list[Result]]],
        max_items: int,
        max_in_flight: int = 2,
        max_delay: float = 0.0,
    ) -> None:
        # send(key, requests) -> one result per request, in order.
        self._send = send
        self._max_items = max_items
        self._max_in_flight = max_in_flight
        self._max_delay = max_delay
        self._waiting: deque[_Waiting[Key, Request, Result]] = deque()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None

    async def submit(self, key: Key, request: Request) -> Result:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._waiting.append(_Waiting(key, request, future, loop.time()))
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = asyncio.get_running_loop()
        while self._waiting and len(self._in_flight) < self._max_in_flight:
            wait = self._waiting[0].since + self._max_delay - loop.time()
            if wait > 0 and len(self._waiting) < self._max_items:
                self._timer = loop.call_later(wait, self._dispatch)
                return
            key = self._waiting[0].key
            batch = [w for w in self._waiting if w.key == key][: self._max_items]
            taken = {id(w) for w in batch}
            self._waiting = deque(w for w in self._waiting if id(w) not in taken)
            task = asyncio.get_running_loop().create_task(self._call(key, batch))
            self._in_flight.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._dispatch()

    async def _call(self, key: Key, batch: list[_Waiting[Key, Request, Result]]) -> None:
        try:
            results = await self._send(key, [w.request for w in batch])
        except Exception as error:  # each caller gets the batch's failure
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(error)
            return
        for waiting, result in zip(batch, results, strict=True):
            if not waiting.future.done():
                waiting.future.set_result(result)
