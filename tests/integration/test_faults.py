"""Faults under load, and repair, through a whole stack as users run it (`loupe up`).

- tools/loadtest.py, short: Index and Search at a small concurrency while retrieval,
  milvus-lite (killed, and stopped past retrieval's patience), Redis, the gateway and the
  supervisor are killed in turn. Every acknowledged write must be found afterwards (by Get,
  and in milvus-lite's file), and the stack must be whole again (every process running and
  serving, a write and a search through) within RECOVERY_BOUND_SECONDS of each fault.
- `loupe up` on a half-dead stack (supervisor and a service dead; then a service stopped on
  purpose) starts only what is missing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.stacks import Stack, running_stack

ROOT = Path(__file__).resolve().parents[2]
# A killed retrieval takes longest: the supervisor's backoff, then loading its models and
# milvus-lite; about 12 s on an idle 2-core machine, and much more when it is shared.
RECOVERY_BOUND_SECONDS = 60
FAULTS = (
    "kill:retrieval,kill:milvus-lite,stop:milvus-lite:12,kill:redis,kill:gateway,kill:supervisor"
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not (ROOT / "models" / "embedder" / "1" / "model.onnx").is_file(),
        reason="models not built: python models/build_models.py",
    ),
]


def test_no_acknowledged_write_is_lost_and_every_fault_recovers(tmp_path: Path) -> None:
    out = tmp_path / "loadtest.json"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "loadtest.py"),
            "--duration", "240",
            "--concurrency", "2",
            "--faults", FAULTS,
            "--warmup", "5",
            "--fault-gap", "2",
            "--recover-timeout", "90",
            "--recover-bound", str(RECOVERY_BOUND_SECONDS),
            "--verify-search", "10",
            "--data-dir", str(tmp_path / "stack"),
            "--json", str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert out.is_file(), run.stderr[-5000:]
    result = json.loads(out.read_text())
    summary = f"{run.stdout}\n{run.stderr[-3000:]}"
    verified = result["verification"]
    assert verified["acknowledged"] > 20, summary
    assert verified["lost"] == [] and not verified["get_errors"], summary
    assert verified["found_by_get"] == verified["acknowledged"], summary
    # And in milvus-lite's file, which searches read (Get reads retrieval's sidecar).
    assert verified["not_in_milvus"] == [], summary
    assert verified["checked_in_milvus"] == verified["acknowledged"], summary
    for fault in result["faults"]:
        assert fault["pid"], (fault, summary)
        assert fault["recovered_s"] is not None, (fault, summary)
        assert fault["recovered_s"] <= RECOVERY_BOUND_SECONDS, (fault, summary)
    # Stopped for 12 s, past LOUPE_MILVUS_LITE_RESTART_SECONDS (10): retrieval restarted it.
    stopped = next(f for f in result["faults"] if f["name"].startswith("stop milvus-lite"))
    assert "restarted by retrieval" in stopped["note"], summary
    # Failures during the faults are UNAVAILABLE, never INTERNAL or a hang past its deadline.
    assert set(result["errors_by_code"]) <= {"UNAVAILABLE"}, summary
    assert run.returncode == 0, summary
    assert "PASS" in run.stdout


def pid_of(stack: Stack, name: str) -> int:
    return next(p["pid"] for p in stack.state()["processes"] if p["name"] == name)


def test_up_repairs_a_half_dead_stack(tmp_path: Path) -> None:
    with running_stack(tmp_path / "stack") as stack:
        before = {p["name"]: p["pid"] for p in stack.state()["processes"]}
        assert stack.loupe("status", "--data-dir", str(stack.data_dir)).returncode == 0
        os.kill(stack.state()["supervisor"], signal.SIGKILL)
        os.kill(before["embedding"], signal.SIGKILL)
        time.sleep(0.5)
        broken = stack.loupe("status", "--data-dir", str(stack.data_dir), check=False)
        assert broken.returncode == 1
        lines = {line.split()[0]: line.split() for line in broken.stdout.splitlines()}
        assert lines["supervisor"][2] == "dead" and lines["embedding"][2] == "dead", broken.stdout

        repaired = stack.loupe("up", "--data-dir", str(stack.data_dir))
        assert "repairing: no supervisor" in repaired.stderr + repaired.stdout
        after = {p["name"]: p for p in stack.state()["processes"]}
        assert after["embedding"]["pid"] != before["embedding"]
        assert after["embedding"]["restarts"] == 1
        for name, pid in before.items():
            if name != "embedding":
                assert after[name]["pid"] == pid, name
        status = stack.loupe("status", "--data-dir", str(stack.data_dir))
        assert "milvus-lite" in status.stdout and " failed " not in status.stdout

        # With the supervisor alive: a service stopped on purpose (SIGTERM, a clean exit)
        # stays stopped until `loupe up`, which asks the supervisor to start it. (Embedding:
        # the new supervisor's own child; an adopted process's exit status is unknown to it.)
        embedding = after["embedding"]["pid"]
        os.kill(embedding, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and state_of(stack, "embedding") != "exited":
            time.sleep(0.2)
        assert state_of(stack, "embedding") == "exited"
        repaired = stack.loupe("up", "--data-dir", str(stack.data_dir))
        assert "repairing: embedding not running" in repaired.stderr + repaired.stdout
        assert pid_of(stack, "embedding") != embedding
        assert state_of(stack, "embedding") == "running"
        assert pid_of(stack, "retrieval") == after["retrieval"]["pid"]
        again = stack.loupe("up", "--data-dir", str(stack.data_dir))
        assert "already running" in again.stderr + again.stdout


def state_of(stack: Stack, name: str) -> str:
    return next(p["state"] for p in stack.state()["processes"] if p["name"] == name)
