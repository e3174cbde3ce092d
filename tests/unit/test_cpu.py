"""Cores a process may use: affinity and a cgroup CPU quota."""

from pathlib import Path

import pytest

from services.common import cpu


def test_a_cgroup_quota_caps_the_cores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(cpu, "_CPU_MAX", cpu_max)
    monkeypatch.setattr(cpu, "_CFS_QUOTA", tmp_path / "missing")
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda _: set(range(16)))
    cpu_max.write_text("150000 100000\n")  # a Kubernetes limit of 1.5 CPU
    assert cpu.available_cores() == 2
    cpu_max.write_text("max 100000\n")
    assert cpu.available_cores() == 16
    cpu_max.write_text("garbage")
    assert cpu.available_cores() == 16


def test_thread_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "available_cores", lambda: 2)
    monkeypatch.delenv("LOUPE_BLAS_THREADS", raising=False)
    monkeypatch.delenv("LOUPE_WORKER_THREADS", raising=False)
    assert cpu.ThreadSettings.from_env() == cpu.ThreadSettings(blas_threads=1, worker_threads=8)
    monkeypatch.setenv("LOUPE_BLAS_THREADS", "0")
    with pytest.raises(ValueError, match="LOUPE_BLAS_THREADS"):
        cpu.ThreadSettings.from_env()


def test_blas_threads_are_set_at_run_time() -> None:
    from threadpoolctl import threadpool_info

    cpu.limit_blas_threads(1)
    blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
    assert blas and all(pool["num_threads"] == 1 for pool in blas)
