"""Thread pools sized to the cores a process really has.

On two cores, pools that each size themselves to the machine fight: numpy's OpenBLAS starts
one thread per core for every product (a 1x1280 by 1280x1280 product took 0.17 ms with one
thread and 6.9 ms with two while the service's own threads ran), ONNX Runtime starts its own,
and asyncio's default executor grows to cores + 4 threads. A container's CPU limit is not
what os.cpu_count() reports either: it is the cgroup's quota.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from services.common.config import env_int

log = logging.getLogger(__name__)

# cgroup v2 and v1 locations of the CPU quota.
_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
_CFS_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
_CFS_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota (a
    Kubernetes CPU limit), rounded up, at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _cgroup_quota() -> float | None:
    try:
        if _CPU_MAX.is_file():
            quota, period = _CPU_MAX.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if _CFS_QUOTA.is_file():
            quota_us = int(_CFS_QUOTA.read_text())
            return None if quota_us <= 0 else quota_us / int(_CFS_PERIOD.read_text())
    except (OSError, ValueError):
        return None
    return None


@dataclass(frozen=True)
class ThreadSettings:
    """LOUPE_BLAS_THREADS and LOUPE_WORKER_THREADS (README, "Configuration")."""

    blas_threads: int
    worker_threads: int

    @classmethod
    def from_env(cls) -> ThreadSettings:
        cores = available_cores()
        return cls(
            # Every product the services make is small (a query against a few hundred
            # candidates): threads cost more than they save, and the service has other
            # threads for the cores.
            blas_threads=env_int("LOUPE_BLAS_THREADS", 1, minimum=1, maximum=256),
            # Threads for blocking work (Milvus and SQLite calls, image decoding): enough to
            # keep several calls in flight while others wait on I/O.
            worker_threads=env_int("LOUPE_WORKER_THREADS", 4 * cores, minimum=1, maximum=1024),
        )


def limit_blas_threads(threads: int) -> None:
    """Set the BLAS pools already loaded (numpy's OpenBLAS) to `threads`."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads, user_api="blas")


def configure(settings: ThreadSettings, loop: asyncio.AbstractEventLoop) -> None:
    """BLAS threads and the event loop's default executor (asyncio.to_thread's pool)."""
    limit_blas_threads(settings.blas_threads)
    loop.set_default_executor(
        ThreadPoolExecutor(max_workers=settings.worker_threads, thread_name_prefix="loupe-worker")
    )
    log.info(
        "threads",
        extra={
            "cores": available_cores(),
            "blas_threads": settings.blas_threads,
            "worker_threads": settings.worker_threads,
        },
    )
