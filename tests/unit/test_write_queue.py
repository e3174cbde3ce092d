"""The write queue: concurrent writes share batches, in order, one catalogue at a time."""

import asyncio

import numpy as np
import pytest

from services.retrieval.writes import Outcome, PendingItem, WriteQueue


def pending(item_id: str) -> PendingItem:
    return PendingItem(item_id, "h", [], np.zeros((1, 2), np.float32))


def test_concurrent_writes_are_coalesced_and_each_id_is_written_in_order() -> None:
    batches: list[tuple[str, list[str]]] = []

    async def run(catalog: str, items: list[PendingItem]) -> list[Outcome]:
        batches.append((catalog, [i.item_id for i in items]))
        await asyncio.sleep(0.01)  # a write takes time: later calls queue meanwhile
        return [Outcome(True, False, False) for _ in items]

    async def main() -> None:
        queue = WriteQueue(run, max_items=4)
        calls = [
            queue.submit("a", pending("1")),
            queue.submit("a", pending("2")),
            queue.submit("b", pending("1")),
            queue.submit("a", pending("1")),  # the same id again: a later batch
            queue.submit("a", pending("3")),
            queue.submit("a", pending("4")),
            queue.submit("a", pending("5")),
            queue.submit("a", pending("6")),
        ]
        outcomes = await asyncio.gather(*calls)
        assert all(o.written for o in outcomes)
        await queue.close()

    asyncio.run(main())
    # Everything was queued before the worker ran: the oldest catalogue's items first, up
    # to 4, each id once; the second write of a/1 waits for a later batch.
    assert batches[0] == ("a", ["1", "2", "3", "4"])
    firsts = [n for n, (catalog, items) in enumerate(batches) if catalog == "a" and "1" in items]
    assert len(firsts) == 2 and firsts[0] == 0
    flat = [(catalog, item) for catalog, items in batches for item in items]
    assert sorted(flat) == sorted(
        [
            ("a", "1"),
            ("a", "2"),
            ("b", "1"),
            ("a", "1"),
            ("a", "3"),
            ("a", "4"),
            ("a", "5"),
            ("a", "6"),
        ]
    )
    assert all(len(items) <= 4 for _, items in batches)
    assert all(len(set(items)) == len(items) for _, items in batches)
    assert len(batches) < 8


def test_a_failed_batch_fails_each_of_its_callers_and_the_queue_goes_on() -> None:
    calls = 0

    async def run(catalog: str, items: list[PendingItem]) -> list[Outcome]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("Milvus is down")
        return [Outcome(True, False, False) for _ in items]

    async def main() -> None:
        queue = WriteQueue(run, max_items=8)
        with pytest.raises(RuntimeError, match="Milvus is down"):
            await queue.submit("a", pending("x"))
        assert (await queue.submit("a", pending("y"))).written

    asyncio.run(main())
