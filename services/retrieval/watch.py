"""Retrieval's watch on Milvus: health follows it, and a milvus-lite that fails is restarted.

pymilvus starts milvus-lite's server as a child of retrieval. When that process died, or was
stopped, nothing noticed: retrieval stayed SERVING and each call waited out pymilvus's retries
(about 12.7 s with a 10 s timeout) before UNAVAILABLE. The watch looks every
LOUPE_MILVUS_WATCH_SECONDS at the process (for milvus-lite) and asks Milvus a cheap question.
On a failure it turns retrieval NOT_SERVING and makes every call fail at once, naming Milvus
(MilvusStore.mark_down); a dead milvus-lite is started again at once, a stopped or silent one
after LOUPE_MILVUS_LITE_RESTART_SECONDS, and the catalogues that were open are loaded again.
Nothing acknowledged is lost: milvus-lite commits a write before answering it, and the
sidecar, written after Milvus, is the commit point of a write (vector_store.py). A Milvus
server is only watched: it restarts on its own, and pymilvus reconnects to it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from prometheus_client import Counter

from services.retrieval.settings import RetrievalSettings
from services.retrieval.store import MilvusStore

log = logging.getLogger(__name__)

# Waits between failed attempts to start milvus-lite again, doubling up to the most.
RESTART_BACKOFF_SECONDS = 1.0
RESTART_BACKOFF_MAX_SECONDS = 30.0

RESTARTS = Counter(
    "loupe_retrieval_milvus_lite_restarts_total",
    "Times milvus-lite's process was started again after it died, stopped or hung.",
)
OUTAGES = Counter(
    "loupe_retrieval_milvus_outages_total",
    "Times the watch found Milvus unable to serve (retrieval turned NOT_SERVING).",
)


async def watch_milvus(
    store: MilvusStore,
    settings: RetrievalSettings,
    report: Callable[[bool], Awaitable[None]],
) -> None:
    """Until cancelled: report whether Milvus can serve each time that changes, and restart
    milvus-lite when it cannot. LOUPE_MILVUS_WATCH_SECONDS=0 turns the watch off."""
    if settings.milvus_watch_seconds <= 0:
        return
    serving = True
    failing_since = 0.0
    next_attempt = 0.0
    backoff = RESTART_BACKOFF_SECONDS
    while True:
        await asyncio.sleep(settings.milvus_watch_seconds)
        problem = await asyncio.to_thread(store.probe, settings.milvus_probe_timeout_seconds)
        now = time.monotonic()
        if not problem:
            backoff = RESTART_BACKOFF_SECONDS
            if not serving:
                serving = True
                store.mark_up()
                await report(True)
                log.warning("Milvus serves again", extra={"after_s": round(now - failing_since, 1)})
            continue
        store.mark_down(problem)
        if serving:
            serving, failing_since = False, now
            OUTAGES.inc()
            await report(False)
            log.error("Milvus cannot serve", extra={"reason": problem})
        if not settings.is_lite or now < next_attempt:
            continue
        process = store.lite_process()
        dead = process is None or process.poll() is not None
        if not dead and now - failing_since < settings.milvus_lite_restart_seconds:
            continue
        log.warning("restarting milvus-lite", extra={"reason": problem})
        try:
            await asyncio.to_thread(store.restart_lite)
        except Exception as error:
            store.mark_down(f"milvus-lite could not be started again ({error})")
            next_attempt = time.monotonic() + backoff
            log.error(
                "restarting milvus-lite failed",
                extra={"error": str(error), "retry_s": backoff},
            )
            backoff = min(2 * backoff, RESTART_BACKOFF_MAX_SECONDS)
            continue
        RESTARTS.inc()
        serving = True
        await report(True)
        log.warning("Milvus serves again", extra={"after_s": round(now - failing_since, 1)})
