"""The write queue: concurrent writes share batches, in order, one catalogue at a time."""

import asyncio

import numpy as np
import pytest

from services.retrieval.writes import Outcome, PendingItem, WriteQueue


def pending(item_id: str) -> PendingItem:
    return PendingItem(item_id, "h", [], np.zeros((1, 2), np.float32))


def test_concurrent_writes_are_coalesced_and_each_id_is_written_in_order() -> None:
    batches: list[tuple[str, list[str]]] = []
    events: list[tuple[str, str, str]] = []  # (start|end, catalog, item id)
    running = 0
    most_running = 0

    async def run(catalog: str, items: list[PendingItem]) -> list[Outcome]:
        nonlocal running, most_running
        batches.append((catalog, [i.item_id for i in items]))
        events.extend(("start", catalog, i.item_id) for i in items)
        running += 1
        most_running = max(most_running, running)
        await asyncio.sleep(0.01)  # a write takes time: later calls queue meanwhile
        running -= 1
        events.extend(("end", catalog, i.item_id) for i in items)
        return [Outcome(True, False, False) for _ in items]

    async def main() -> None:
        queue = WriteQueue(run, max_items=4, max_batches=2)
        calls = [
            queue.submit("a", pending("1")),
            queue.submit("a", pending("2")),
            queue.submit("b", pending("1")),
            queue.submit("a", pending("1")),  # the same id again: after the first one
            *(queue.submit("a", pending(str(k))) for k in range(3, 12)),
        ]
        outcomes = await asyncio.gather(*calls)
        assert all(o.written for o in outcomes)
        await queue.close()

    asyncio.run(main())
    flat = sorted((catalog, item) for catalog, items in batches for item in items)
    expected = [("a", "1"), ("a", "2"), ("b", "1"), ("a", "1")]
    assert flat == sorted(expected + [("a", str(k)) for k in range(3, 12)])
    assert all(len(items) <= 4 and len(set(items)) == len(items) for _, items in batches)
    assert most_running == 2 and len(batches) < 13
    # The second write of a/1 started only once the first had ended.
    a1 = [n for n, event in enumerate(events) if event[1:] == ("a", "1")]
    assert [events[n][0] for n in a1] == ["start", "end", "start", "end"]


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
