"""Retrieval's watch on milvus-lite (services/retrieval/watch.py), with a real milvus-lite
process killed or stopped under a RetrievalService serving through real gRPC: health turns
NOT_SERVING at once, calls fail at once naming Milvus, milvus-lite is started again by
itself, and every write that was acknowledged is still there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from loupe.v1 import retrieval_pb2 as r
from loupe.v1 import retrieval_pb2_grpc
from services.common.server import MetricsInterceptor
from services.retrieval.service import RetrievalService
from tests.test_retrieval_service import SERVER_URI, item, lookup, search, settings_for

pytestmark = pytest.mark.skipif(bool(SERVER_URI), reason="kills milvus-lite under the service")

# How soon the watch must turn NOT_SERVING, and a call must fail, once milvus-lite fails.
NOTICE_SECONDS = 2.0
# How soon milvus-lite must be serving again: restarted at once when dead, after
# RESTART_SECONDS when stopped, and loading takes a few seconds on a busy machine.
RESTART_SECONDS = 2.0
RECOVER_SECONDS = 30.0


@dataclasses.dataclass
class Watched:
    service: RetrievalService
    stub: retrieval_pb2_grpc.RetrievalServiceStub
    # Each health change the watch reported, with its time.
    reports: list[tuple[float, bool]]

    def serving(self) -> bool:
        return not self.reports or self.reports[-1][1]

    def wait(self, check: Callable[[], bool], seconds: float, what: str) -> float:
        started = time.monotonic()
        while not check():
            if time.monotonic() - started > seconds:
                raise AssertionError(f"not {what} after {seconds}s; reports {self.reports}")
            time.sleep(0.05)
        return time.monotonic() - started


@contextmanager
def watched(data_dir: Path) -> Iterator[Watched]:
    """A RetrievalService with its watch running, as services/common/server.py runs it."""
    settings = dataclasses.replace(
        settings_for(data_dir),
        timeout_seconds=10,
        milvus_watch_seconds=0.1,
        milvus_lite_restart_seconds=RESTART_SECONDS,
    )
    service = RetrievalService(settings)
    reports: list[tuple[float, bool]] = []
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def report(serving: bool) -> None:
        reports.append((time.monotonic(), serving))

    async def start() -> tuple[grpc.aio.Server, int, asyncio.Task[None]]:
        server = grpc.aio.server(interceptors=[MetricsInterceptor(service.name)])
        service.register(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await service.start()
        await server.start()
        return server, port, asyncio.create_task(service.watch_readiness(report))

    server, port, watch = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=120)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Watched(service, retrieval_pb2_grpc.RetrievalServiceStub(channel), reports)
    finally:
        channel.close()

        async def stop() -> None:
            watch.cancel()
            await server.stop(None)
            await service.close()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def lite_pid(service: RetrievalService) -> int:
    process = service.store.lite_process()
    assert process is not None and process.poll() is None
    return process.pid


def writer(stub: retrieval_pb2_grpc.RetrievalServiceStub, stop: threading.Event) -> list[str]:
    """Upserts until `stop`; the ids of those acknowledged."""
    acknowledged: list[str] = []

    def run() -> None:
        number = 0
        while not stop.is_set():
            number += 1
            item_id = f"w-{number}"
            try:
                if stub.Upsert(r.UpsertRequest(item=item(item_id)), timeout=30).written:
                    acknowledged.append(item_id)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
                assert "Milvus at" in error.details(), error.details()
                time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    stop.wait()
    thread.join(timeout=60)
    return acknowledged


def fails_fast(watched: Watched) -> None:
    """A call while milvus-lite is down answers UNAVAILABLE naming Milvus, in well under
    pymilvus's own timeout (10 s here)."""
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        watched.stub.Stats(r.StatsRequest(), timeout=30)
    elapsed = time.monotonic() - started
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "Milvus at" in error.value.details(), error.value.details()
    assert elapsed < 1.0, elapsed


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_milvus_lite_killed_or_stopped_under_writes_recovers_losing_nothing(
    tmp_path: Path, fault: str
) -> None:
    with watched(tmp_path) as w:
        first = item("before")
        assert w.stub.Upsert(r.UpsertRequest(item=first)).written
        old = lite_pid(w.service)
        stop = threading.Event()
        acknowledged: list[str] = []
        collecting = threading.Thread(target=lambda: acknowledged.extend(writer(w.stub, stop)))
        collecting.start()
        time.sleep(1.0)
        os.kill(old, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        try:
            w.wait(lambda: not w.serving(), NOTICE_SECONDS, "NOT_SERVING")
            if fault == "stop":
                # Stopped, milvus-lite is given RESTART_SECONDS: calls meanwhile fail fast.
                fails_fast(w)
            w.wait(w.serving, RECOVER_SECONDS, "SERVING again")
        finally:
            if fault == "stop":
                # Killed and reaped by the watch by now, unless the test failed first.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(old, signal.SIGCONT)
        new = lite_pid(w.service)
        assert new != old
        time.sleep(1.0)
        stop.set()
        collecting.join(timeout=60)
        assert len(acknowledged) > 5, acknowledged
        # Every acknowledged write is there, by lookup and by search.
        for item_id in ["before", *acknowledged]:
            assert lookup(w.stub, item_id), item_id
        assert [c.item_id for c in search(w.stub, first.objects[0].vector, 1)] == ["before"]
        down_at, up_at = (t for t, _ in w.reports[:2])
        assert up_at - down_at < RECOVER_SECONDS
