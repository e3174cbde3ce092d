"""The embedded stack's supervisor: `loupe up` starts it, and it starts, watches and restarts
redis-server and the five services, and stops them all on SIGTERM (`loupe down`).

Why not supervisord, circus or honcho: honcho stops everything when one process exits;
circus is barely maintained and brings ZeroMQ; supervisord is well kept, but it backs off
linearly and only while a process is starting (one that ran past `startsecs` is restarted
at once, forever), keeps no restart count, and cannot adopt processes it did not start, so
after its own crash every service would have to be stopped and started again. What is
needed here is small: one process per program, each in its own session (so that a stop
also reaches milvus-lite's server, a child of retrieval), a restart with exponential backoff
that gives up, visibly, after repeated fast failures, and adopting whatever still runs when
`loupe up` repairs a stack whose supervisor died.

Policy (LOUPE_SUPERVISOR_*, read from the environment of `loupe up`): a process that fails
(killed by a signal, or a non-zero exit status) is started again after BACKOFF_SECONDS x
2^n, n being how many times in a row it failed within STABLE_SECONDS of its start, at most
MAX_BACKOFF_SECONDS; after MAX_FAST_FAILURES such failures in a row it is left `failed`
(and `loupe up` tries it again). Exit status 2 is a configuration error, which no restart
can mend: `failed` at once. Exit status 0 is a service stopped on purpose (SIGTERM):
`exited`, left so until `loupe up`.

DIR/run/plan.json says what to run (written by `loupe up`; the environment, which holds
the Redis password, is inherited and never written down). DIR/run/stack.json is the state,
rewritten (atomically) at every change: each process's pid, state (running, restarting,
failed, exited), restarts and last exit, which `loupe status` shows. SIGHUP: start every
failed, exited or waiting process now (`loupe up` on a half-dead stack).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from services.cli.stack import (
    EXITED,
    FAILED,
    RESTARTING,
    RUNNING,
    Process,
    StackState,
    alive,
    plan_path,
    process_marker,
    state_path,
    stop_order,
)
from services.common import logs
from services.common.config import ConfigError, env_float, env_int

log = logging.getLogger("loupe.supervisor")

# How often processes are looked at: a dead one is noticed within this.
POLL_SECONDS = 0.2
# Exit status of a service's configuration error (services/common/server.py).
CONFIG_ERROR = 2


@dataclass
class Program:
    name: str
    argv: list[str]
    port: int
    metrics_port: int
    # Where its output goes ('' for none: redis-server writes its own log file).
    log: str
    # Set over the supervisor's own environment (no secrets: those are inherited).
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Plan:
    data_dir: str
    gateway: str
    tls: bool
    programs: list[Program]

    def save(self) -> None:
        path = plan_path(Path(self.data_dir))
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(self), indent=2))
        os.replace(temporary, path)

    @classmethod
    def load(cls, data_dir: Path) -> Plan:
        raw = json.loads(plan_path(data_dir).read_text())
        return cls(
            data_dir=raw["data_dir"],
            gateway=raw["gateway"],
            tls=bool(raw["tls"]),
            programs=[Program(**p) for p in raw["programs"]],
        )


@dataclass(frozen=True)
class Policy:
    backoff_seconds: float
    max_backoff_seconds: float
    stable_seconds: float
    max_fast_failures: int
    grace_seconds: float

    @classmethod
    def from_env(cls) -> Policy:
        return cls(
            backoff_seconds=env_float(
                "LOUPE_SUPERVISOR_BACKOFF_SECONDS", 1.0, minimum=0.0, maximum=600.0
            ),
            max_backoff_seconds=env_float(
                "LOUPE_SUPERVISOR_MAX_BACKOFF_SECONDS", 30.0, minimum=0.0, maximum=3600.0
            ),
            stable_seconds=env_float(
                "LOUPE_SUPERVISOR_STABLE_SECONDS", 60.0, minimum=0.0, maximum=86400.0
            ),
            max_fast_failures=env_int(
                "LOUPE_SUPERVISOR_MAX_FAST_FAILURES", 5, minimum=1, maximum=1000
            ),
            grace_seconds=env_float(
                "LOUPE_SUPERVISOR_GRACE_SECONDS", 20.0, minimum=0.0, maximum=600.0
            ),
        )


class Child:
    """One program and the process that runs it now."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.popen: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.state = RESTARTING
        self.restarts = 0
        self.last_exit = ""
        self.started = 0.0
        self.fast_failures = 0
        self.next_start = 0.0
        # Known to an earlier supervisor: its first start here is a restart.
        self.carried = False

    def poll(self) -> tuple[bool, int | None]:
        """Whether it has exited, and its exit status (negative: the signal) when known: a
        process adopted from an earlier supervisor is not our child."""
        if self.popen is not None:
            code = self.popen.poll()
            return code is not None, code
        return not alive(self.pid, process_marker(self.program.name)), None

    def record(self) -> Process:
        return Process(
            self.program.name,
            self.pid,
            self.program.port,
            self.program.metrics_port,
            state=self.state,
            restarts=self.restarts,
            last_exit=self.last_exit,
            since=self.started,
        )


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exited (status unknown: adopted)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "?"
        return f"killed by signal {-code} ({name})"
    return f"exit status {code}"


class Supervisor:
    def __init__(self, plan: Plan, policy: Policy) -> None:
        self.plan = plan
        self.policy = policy
        self.children = [Child(p) for p in plan.programs]
        self.stopping = False
        self.repair = False

    # -- signals -----------------------------------------------------------------------------

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def _on_repair(self, signum: int, frame: FrameType | None) -> None:
        self.repair = True

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_repair)
        self._adopt()
        for child in self.children:
            if child.state != RUNNING:
                self._start(child, first=not child.carried)
        self._save()
        log.info("supervising", extra={"programs": [c.program.name for c in self.children]})
        while not self.stopping:
            changed = self._tick(time.monotonic())
            if changed:
                self._save()
            time.sleep(POLL_SECONDS)
        self._stop_all()

    def _adopt(self) -> None:
        """Keep what an earlier supervisor left running (`loupe up` on a half-dead stack)."""
        previous = StackState.load(Path(self.plan.data_dir))
        if previous is None:
            return
        by_name = {p.name: p for p in previous.processes}
        running = {n for n, p in by_name.items() if alive(p.pid, process_marker(n))}
        if not running:
            return  # a fresh start, not a repair
        for child in self.children:
            old = by_name.get(child.program.name)
            if old is None:
                continue
            child.restarts, child.last_exit = old.restarts, old.last_exit
            if old.name not in running:
                # It died while no supervisor ran: starting it again is a restart.
                child.carried = True
                child.last_exit = old.last_exit or "exited (no supervisor was running)"
                continue
            child.pid, child.state, child.started = old.pid, RUNNING, time.monotonic()
            log.info("adopted", extra={"program": old.name, "pid": old.pid})

    def _tick(self, now: float) -> bool:
        changed = False
        if self.repair:
            self.repair = False
            for child in self.children:
                if child.state in (FAILED, RESTARTING, EXITED):
                    log.info("repair: starting now", extra={"program": child.program.name})
                    child.fast_failures = 0
                    child.next_start = now
                    child.state = RESTARTING
                    changed = True
        for child in self.children:
            if child.state == RUNNING:
                gone, code = child.poll()
                if gone:
                    self._on_exit(child, code, now)
                    changed = True
            if child.state == RESTARTING and now >= child.next_start:
                self._start(child, first=False)
                changed = True
        return changed

    def _on_exit(self, child: Child, code: int | None, now: float) -> None:
        name = child.program.name
        # Whatever it left in its session: milvus-lite's server holds the database's lock.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
        child.popen = None
        child.last_exit = describe_exit(code)
        ran = now - child.started
        if code == 0:
            # A clean exit is a service's answer to SIGTERM: someone stopped it on purpose.
            # It stays stopped (as systemd's Restart=on-failure does) until `loupe up`.
            child.state = EXITED
            log.warning("exited cleanly; not restarted", extra={"program": name, "pid": child.pid})
            return
        child.fast_failures = child.fast_failures + 1 if ran < self.policy.stable_seconds else 0
        if code == CONFIG_ERROR or child.fast_failures >= self.policy.max_fast_failures:
            child.state = FAILED
            log.error(
                "exited; giving up",
                extra={
                    "program": name,
                    "pid": child.pid,
                    "exit": child.last_exit,
                    "ran_s": round(ran, 1),
                    "fast_failures": child.fast_failures,
                    "why": "configuration error" if code == CONFIG_ERROR else "exits too fast",
                },
            )
            return
        delay = min(
            self.policy.backoff_seconds * 2**child.fast_failures, self.policy.max_backoff_seconds
        )
        child.state, child.next_start = RESTARTING, now + delay
        log.warning(
            "exited; restarting",
            extra={
                "program": name,
                "pid": child.pid,
                "exit": child.last_exit,
                "ran_s": round(ran, 1),
                "in_s": round(delay, 2),
            },
        )

    def _start(self, child: Child, *, first: bool) -> None:
        program = child.program
        output: IO[bytes] | int = subprocess.DEVNULL
        try:
            if program.log:
                output = open(program.log, "ab")  # noqa: SIM115 (the child keeps it)
            child.popen = subprocess.Popen(
                program.argv,
                env={**os.environ, **program.env},
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                # Its own session: a stop reaches its children (milvus-lite) through its group.
                start_new_session=True,
            )
        except OSError as error:
            child.started = time.monotonic()
            child.pid = 0
            self._on_exit(child, 127, child.started)
            child.last_exit = f"could not start: {error}"
            return
        finally:
            if not isinstance(output, int):
                output.close()
        child.pid, child.state, child.started = child.popen.pid, RUNNING, time.monotonic()
        if not first:
            child.restarts += 1
        log.info(
            "started" if first else "restarted",
            extra={"program": program.name, "pid": child.pid, "restarts": child.restarts},
        )

    def _stop_all(self) -> None:
        log.info("stopping")
        order = stop_order()
        for child in sorted(self.children, key=lambda c: order.get(c.program.name, 99)):
            if child.state != RUNNING or child.poll()[0]:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
                # A stopped process would never act on SIGTERM.
                os.kill(child.pid, signal.SIGCONT)
            deadline = time.monotonic() + self.policy.grace_seconds
            while not child.poll()[0] and time.monotonic() < deadline:
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
            if child.popen is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.popen.wait(timeout=5)
            log.info("stopped", extra={"program": child.program.name, "pid": child.pid})
        state_path(Path(self.plan.data_dir)).unlink(missing_ok=True)
        log.info("stopped every process")

    def _save(self) -> None:
        StackState(
            self.plan.data_dir,
            self.plan.gateway,
            [child.record() for child in self.children],
            tls=self.plan.tls,
            supervisor=os.getpid(),
        ).save()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    logs.configure("supervisor", "INFO")
    if len(args) != 1:
        log.critical("usage: python -m services.cli.supervisor DATA_DIR")
        sys.exit(2)
    try:
        policy = Policy.from_env()
    except ConfigError as error:
        log.critical(f"loupe-supervisor: configuration error: {error}")
        sys.exit(2)
    Supervisor(Plan.load(Path(args[0])), policy).run()


if __name__ == "__main__":
    main()
