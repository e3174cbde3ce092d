"""The stack's supervisor (services/cli/supervisor.py) as `loupe up` runs it, a process of
its own, here with small stand-in programs and short backoffs: a killed process is
restarted, one that keeps failing at once is given up on after exponentially longer waits,
a configuration error is not retried, a clean exit is left alone until SIGHUP, and SIGTERM
stops every program with what it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from services.cli.stack import Process, StackState, process_state, state_path
from services.cli.supervisor import Plan, Program

SLEEPER = "import time; time.sleep(600)"
# A sleeper with a child of its own in its session, as retrieval has milvus-lite.
PARENT = (
    "import subprocess, sys, time; "
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)"
)
BACKOFF = 0.1


def program(name: str, code: str, tmp_path: Path) -> Program:
    return Program(name, [sys.executable, "-c", code], 0, 0, log=str(tmp_path / f"{name}.log"))


@contextmanager
def supervising(tmp_path: Path, *programs: Program) -> Iterator[subprocess.Popen[bytes]]:
    Plan(str(tmp_path), "127.0.0.1:1", False, list(programs)).save()
    env = {
        **os.environ,
        "LOUPE_SUPERVISOR_BACKOFF_SECONDS": str(BACKOFF),
        "LOUPE_SUPERVISOR_MAX_FAST_FAILURES": "5",
        "LOUPE_SUPERVISOR_GRACE_SECONDS": "5",
    }
    with open(tmp_path / "supervisor.log", "ab") as log:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "services.cli.supervisor", str(tmp_path)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield supervisor
    finally:
        if supervisor.poll() is None:
            supervisor.terminate()
            supervisor.wait(timeout=30)
        # Whatever a failed test left behind.
        state = StackState.load(tmp_path)
        for process in state.processes if state else []:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)


def process(tmp_path: Path, name: str) -> Process:
    state = StackState.load(tmp_path)
    assert state is not None
    return next(p for p in state.processes if p.name == name)


def wait(check: Callable[[], bool], seconds: float = 30.0) -> float:
    started = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - started
        except (StopIteration, AssertionError):
            pass
        if time.monotonic() - started > seconds:
            raise AssertionError(f"not so after {seconds}s")
        time.sleep(0.05)


def test_a_killed_process_is_restarted_and_the_rest_left_alone(tmp_path: Path) -> None:
    with supervising(
        tmp_path, program("one", SLEEPER, tmp_path), program("two", SLEEPER, tmp_path)
    ) as supervisor:
        wait(lambda: process(tmp_path, "two").pid > 0)
        first, other = process(tmp_path, "one"), process(tmp_path, "two")
        os.kill(first.pid, signal.SIGKILL)
        took = wait(lambda: process(tmp_path, "one").restarts == 1)
        again = process(tmp_path, "one")
        assert again.pid != first.pid and again.state == "running"
        assert again.last_exit == "killed by signal 9 (SIGKILL)"
        assert running(again.pid)
        # Within the first backoff (it ran under STABLE_SECONDS: 2 x BACKOFF) and a poll.
        assert took < 5, took
        assert process(tmp_path, "two").pid == other.pid
        assert StackState.load(tmp_path).supervisor == supervisor.pid  # type: ignore[union-attr]


def test_a_crash_loop_backs_off_exponentially_then_gives_up(tmp_path: Path) -> None:
    started = time.monotonic()
    with supervising(tmp_path, program("crash", "import sys; sys.exit(1)", tmp_path)):
        wait(lambda: process(tmp_path, "crash").state == "failed")
        took = time.monotonic() - started
        crashed = process(tmp_path, "crash")
        # Five fast failures: four restarts, after 2, 4, 8 and 16 x BACKOFF.
        assert crashed.restarts == 4 and crashed.last_exit == "exit status 1"
        assert took >= 30 * BACKOFF, took
        log = (tmp_path / "supervisor.log").read_text()
        assert "exited; giving up" in log and "exits too fast" in log
        # And it stays so.
        time.sleep(1.0)
        assert process(tmp_path, "crash").restarts == 4


def test_a_configuration_error_is_not_retried(tmp_path: Path) -> None:
    with supervising(tmp_path, program("bad", "import sys; sys.exit(2)", tmp_path)):
        wait(lambda: process(tmp_path, "bad").state == "failed")
        assert process(tmp_path, "bad").restarts == 0
        assert "configuration error" in (tmp_path / "supervisor.log").read_text()


def test_a_clean_exit_stays_until_sighup(tmp_path: Path) -> None:
    with supervising(tmp_path, program("done", SLEEPER, tmp_path)) as supervisor:
        wait(lambda: process(tmp_path, "done").pid > 0)
        pid = process(tmp_path, "done").pid
        os.kill(pid, signal.SIGTERM)  # Python's default: killed by SIGTERM, not a clean exit
        wait(lambda: process(tmp_path, "done").restarts == 1)
    with supervising(tmp_path, program("done", "import sys; sys.exit(0)", tmp_path)) as supervisor:
        wait(lambda: process(tmp_path, "done").state == "exited")
        time.sleep(1.0)
        assert process(tmp_path, "done").restarts == 0
        os.kill(supervisor.pid, signal.SIGHUP)
        wait(lambda: process(tmp_path, "done").restarts == 1)


def test_sigterm_stops_every_program_and_what_it_started(tmp_path: Path) -> None:
    with supervising(
        tmp_path, program("parent", PARENT, tmp_path), program("plain", SLEEPER, tmp_path)
    ) as supervisor:
        wait(lambda: process(tmp_path, "plain").pid > 0)
        parent = process(tmp_path, "parent").pid
        wait(lambda: bool(children_of(parent)))
        (child,) = children_of(parent)
        # A stopped program must not hold the stop up.
        os.kill(process(tmp_path, "plain").pid, signal.SIGSTOP)
        supervisor.terminate()
        assert supervisor.wait(timeout=30) == 0
    assert not state_path(tmp_path).exists()
    wait(lambda: not running(child) and not running(parent), 10)


def running(pid: int) -> bool:
    return process_state(pid) not in ("", "Z")


def children_of(pid: int) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"\nPPid:\t{pid}\n" in (proc / "status").read_text():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("code", [1, -9])
def test_describe_exit(code: int) -> None:
    from services.cli.supervisor import describe_exit

    assert describe_exit(code) in ("exit status 1", "killed by signal 9 (SIGKILL)")
