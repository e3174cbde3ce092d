"""A real Milvus server (standalone) for tests and benchmarks, beside embedded milvus-lite.

    python tools/milvus_server.py setup                       # the server, into .cache/milvus-env
    python tools/milvus_server.py run --data DIR [--port N]   # start it, print its URI, until ^C

The only Milvus server one can pip-install is the one inside the `milvus` wheel on PyPI: a
standalone Milvus (embedded etcd, RocksMQ, local storage) built for Linux x86-64 and packed as
.lzma files, with a small Python launcher (`milvus-server`). `setup` installs that wheel into
its own virtualenv, `.cache/milvus-env` (LOUPE_MILVUS_ENV), so that its pins never touch
`.venv`, and unpacks the binary and its libraries once, into `.cache/milvus-env/server/bin`.

The launcher is not used to run it: it always binds the embedded etcd to 2379/2380 and its
metrics/health endpoint to the first free port from 9091, and unpacks the binaries again into
every new data directory. This tool writes the configuration itself, from the launcher's own
template (the file the launcher fills in), with every port the server opens set to a free
one: the public gRPC/REST port (`proxy.port`, the URI's), each component's internal gRPC port,
the embedded etcd's client and peer URLs (an etcd config file, `etcd.config.path`), and the
metrics/health port (METRICS_PORT). So two runs, and a developer's own Milvus on 19530, never
collide. Milvus 2.3 listens on every interface for its gRPC ports and advertises 127.0.0.1.
`run` again on the same DIR reuses its ports when they are free (DIR/configs/ports.json).

Started from a fresh directory it answers in about 3 s and holds about 240 MiB at idle (2 CPU
cores). Stop: SIGINT, then SIGKILL of its process group after a grace period: Milvus 2.3's own
stop can sit out internal timeouts (10 s and more) once collections were loaded, and then ends
in a harmless `panic: context canceled` (CloseEtcdClient) in its log.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, astuple, dataclass, fields
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ENV = ROOT / ".cache" / "milvus-env"
# The newest `milvus` wheel that installs and runs here: PyPI's 2.3.8 and 2.3.9 (the last
# releases) are macOS arm64 wheels only, so pip on Linux finds nothing newer than 2.3.5 (built
# January 2024). pymilvus 2.5 in .venv talks to it; what came with Milvus 2.4+ is absent.
MILVUS_VERSION = "2.3.5"
# Bounded in time everywhere: pip, start, stop.
PIP_TIMEOUT = 900.0
START_TIMEOUT = 120.0
STOP_GRACE = 20.0
# Milvus's own: the proxy's time tick, which every Strong-consistency read waits for.
DEFAULT_TIME_TICK_MS = 200


class MilvusSetupError(RuntimeError):
    pass


def progress(message: str) -> None:
    print(f"[milvus] {message}", file=sys.stderr, flush=True)


# --- the server's environment ------------------------------------------------------------------


@dataclass(frozen=True)
class MilvusInstall:
    env: Path

    @property
    def python(self) -> Path:
        return self.env / "bin" / "python"

    @property
    def package_dir(self) -> Path:
        """The `milvus` package: data/bin/*.lzma, data/config.yaml.template, data/glog.conf."""
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        return self.env / "lib" / version / "site-packages" / "milvus"

    @property
    def bin_dir(self) -> Path:
        """The unpacked `milvus` binary and the shared libraries it loads."""
        return self.env / "server" / "bin"

    @property
    def milvus(self) -> Path:
        return self.bin_dir / "milvus"

    @property
    def stamp(self) -> Path:
        # Written last by `setup`: its presence means the unpacked server is complete.
        return self.env / "server" / "version"

    def is_ready(self) -> bool:
        return (
            self.milvus.is_file()
            and self.stamp.is_file()
            and self.stamp.read_text().strip() == MILVUS_VERSION
        )


def find_install(env: Path | None = None) -> MilvusInstall:
    return MilvusInstall(env or Path(os.environ.get("LOUPE_MILVUS_ENV") or DEFAULT_ENV))


def setup(env: Path | None = None) -> MilvusInstall:
    """Make (or reuse) the server's virtualenv and unpack the server; fast when done."""
    install = find_install(env)
    if install.is_ready():
        return install
    if not install.python.exists():
        progress(f"creating {install.env}")
        subprocess.run([sys.executable, "-m", "venv", str(install.env)], check=True, timeout=300)
    requirement = f"milvus=={MILVUS_VERSION}"
    progress(f"installing {requirement} into {install.env}")
    pip = [str(install.python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    try:
        result = subprocess.run([*pip, requirement], check=False, timeout=PIP_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise MilvusSetupError(f"pip did not install {requirement} in {PIP_TIMEOUT:.0f}s") from None
    if result.returncode != 0:
        raise MilvusSetupError(f"pip could not install {requirement} into {install.env}")
    packed = sorted((install.package_dir / "data" / "bin").glob("*.lzma"))
    if not any(p.name == "milvus.lzma" for p in packed):
        raise MilvusSetupError(f"no data/bin/milvus.lzma in {install.package_dir}")
    # Unpack beside, then swap in: an interrupted setup leaves no half-written server.
    progress(f"unpacking the server into {install.bin_dir}")
    partial = install.bin_dir.with_name("bin.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for source in packed:
        target = partial / source.name.removesuffix(".lzma")
        with lzma.open(source) as packed_file, target.open("wb") as out:
            shutil.copyfileobj(packed_file, out, 1 << 20)
        target.chmod(0o755)
    shutil.rmtree(install.bin_dir, ignore_errors=True)
    partial.rename(install.bin_dir)
    install.stamp.write_text(MILVUS_VERSION + "\n")
    return install


# --- configuration ------------------------------------------------------------------------------


def port_is_free(port: int) -> bool:
    """Whether Milvus could listen on `port` now: on every interface, as its gRPC servers do
    (with SO_REUSEADDR, as Go sets it: a previous run's connections may linger in TIME_WAIT)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
        return True


def reserve_port() -> int:
    """A port free now and outside the ephemeral range (32768-60999 on Linux), so that no
    outgoing connection takes it meanwhile: for a URI that must be known before the server
    starts (tests/server)."""
    start = 20000 + os.getpid() % 9000
    for port in [*range(start, 29000), *range(20000, start)]:
        if port_is_free(port):
            return port
    raise MilvusSetupError("no free port in 20000-28999")


@dataclass(frozen=True)
class MilvusPorts:
    """Every port a standalone Milvus 2.3 listens on."""

    proxy: int  # the public gRPC (and REST) port: the URI's
    proxy_internal: int
    root_coord: int
    query_coord: int
    query_node: int
    index_node: int
    data_coord: int
    data_node: int
    index_coord: int  # only named in the config (bindIndexNodeMode is off)
    etcd_client: int
    etcd_peer: int
    metrics: int  # /metrics and /healthz

    @classmethod
    def load(cls, path: Path) -> MilvusPorts | None:
        """The ports of a previous run in the same data directory, if all are free now."""
        try:
            ports = cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        return ports if all(port_is_free(port) for port in astuple(ports)) else None

    @classmethod
    def pick(cls, proxy: int = 0) -> MilvusPorts:
        """Free ports, distinct (each socket is held until all are chosen); `proxy` if given."""
        names = [f.name for f in fields(cls)]
        sockets = [socket.socket() for _ in names]
        try:
            for name, s in zip(names, sockets, strict=True):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                port = proxy if name == "proxy" else 0
                try:
                    s.bind(("", port))
                except OSError as error:
                    raise MilvusSetupError(f"cannot listen on port {port}: {error}") from None
            chosen = {name: int(s.getsockname()[1]) for name, s in zip(names, sockets, strict=True)}
        finally:
            for s in sockets:
                s.close()
        return cls(**chosen)


# How a Go program's crash report starts, before its goroutine dump.
CRASH = re.compile(r"(panic: |fatal error: |SIG[A-Z]+: )")
# The launcher's template marks what it fills in as {{ name }}, {{ name: default }} or
# {{ name(type): default }}.
PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*(?:\(\w+\))?\s*(?::\s*([^}]*?))?\s*\}\}")


def render_config(
    template: str, data_dir: Path, ports: MilvusPorts, time_tick_ms: int = DEFAULT_TIME_TICK_MS
) -> str:
    """milvus.yaml for a server on `ports` keeping everything under `data_dir`."""
    logs, data = data_dir / "logs", data_dir / "data"
    values = {
        "etcd_port": ports.etcd_client,
        "etcd_log_path": logs / "etcd.log",
        "etcd_data_dir": data / "etcd.data",
        "local_storage_dir": data,
        "rocksmq_data_dir": data / "rocksmq",
        "root_coord_port": ports.root_coord,
        "proxy_port": ports.proxy,
        "proxy_internal_port": ports.proxy_internal,
        "query_coord_port": ports.query_coord,
        "query_node_port": ports.query_node,
        "index_coord_port": ports.index_coord,
        "index_node_port": ports.index_node,
        "data_coord_port": ports.data_coord,
        "data_node_port": ports.data_node,
        "system_log_path": logs,
    }

    def fill(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in values:
            return str(values[name])
        if default is None:
            raise MilvusSetupError(f"the config template asks for {name!r}, unknown here")
        return default

    text = PLACEHOLDER.sub(fill, template)
    # Components advertise loopback, not the machine's first address.
    text, count = re.subn(r"^(  ip:)[^\n#]*", r"\1 127.0.0.1 ", text, flags=re.MULTILINE)
    if count < 6:
        raise MilvusSetupError(f"expected an `ip:` per component in the template, found {count}")
    # The embedded etcd takes its listen URLs only from an etcd config file.
    text, count = re.subn(
        r"^etcd:\n",
        f"etcd:\n  config:\n    path: {data_dir / 'configs' / 'embedEtcd.yaml'}\n",
        text,
        count=1,
        flags=re.MULTILINE,
    )
    if count != 1:
        raise MilvusSetupError("no top-level `etcd:` section in the config template")
    # How long its own stop may take before it quits anyway: 1800 s by default, and with a
    # collection loaded a stop here took all of it (or until SIGKILL).
    text, count = re.subn(r"(gracefulStopTimeout:) *\d+", r"\1 3", text)
    if count != 1:
        raise MilvusSetupError("no `gracefulStopTimeout` in the config template")
    # A Strong-consistency read waits for the next time tick the proxy sends.
    text, count = re.subn(
        r"^(  timeTickInterval:) *\d+", rf"\g<1> {time_tick_ms}", text, flags=re.MULTILINE
    )
    if count != 1:
        raise MilvusSetupError("no `proxy.timeTickInterval` in the config template")
    return text


def etcd_config(ports: MilvusPorts) -> str:
    client = f"http://127.0.0.1:{ports.etcd_client}"
    peer = f"http://127.0.0.1:{ports.etcd_peer}"
    return (
        "# Written by tools/milvus_server.py: the embedded etcd on loopback, on free ports.\n"
        "name: default\n"
        f"listen-client-urls: {client}\n"
        f"advertise-client-urls: {client}\n"
        f"listen-peer-urls: {peer}\n"
        f"initial-advertise-peer-urls: {peer}\n"
        f"initial-cluster: default={peer}\n"
    )


# --- running it --------------------------------------------------------------------------------


@dataclass
class MilvusServer:
    """One standalone Milvus on loopback, keeping its data, config and logs under data_dir."""

    install: MilvusInstall
    data_dir: Path
    port: int = 0
    time_tick_ms: int = DEFAULT_TIME_TICK_MS
    ports: MilvusPorts | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        assert self.ports is not None, "not started"
        return f"http://127.0.0.1:{self.ports.proxy}"

    @property
    def alias(self) -> str:
        assert self.ports is not None, "not started"
        return f"p{self.ports.proxy}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "logs" / "milvus.out"

    def environment(self) -> dict[str, str]:
        assert self.ports is not None
        # Only what it needs: Milvus reads any variable whose name matches a config key
        # (LOG_LEVEL, PROXY_PORT, ...) as an override of milvus.yaml.
        env = {k: os.environ[k] for k in ("PATH", "HOME", "TMPDIR", "TZ") if k in os.environ}
        env.update(
            DEPLOY_MODE="STANDALONE",
            METRICS_PORT=str(self.ports.metrics),
            LD_LIBRARY_PATH=str(self.install.bin_dir),
        )
        return env

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        if not self.install.is_ready():
            raise MilvusSetupError(
                f"no Milvus server in {self.install.env}: run `python tools/milvus_server.py setup`"
            )
        self.data_dir = self.data_dir.resolve()
        configs = self.data_dir / "configs"
        for sub in (configs, self.data_dir / "logs", self.data_dir / "data"):
            sub.mkdir(parents=True, exist_ok=True)
        # Restarted on a data directory, it finds its previous components' sessions in etcd
        # and dials their addresses until those expire (about a minute): the same ports again,
        # when free, make it start as fast as the first time.
        previous = MilvusPorts.load(configs / "ports.json")
        if previous is not None and self.port in (0, previous.proxy):
            self.ports = previous
        else:
            self.ports = MilvusPorts.pick(self.port)
        (configs / "ports.json").write_text(json.dumps(asdict(self.ports), indent=1) + "\n")
        template = (self.install.package_dir / "data" / "config.yaml.template").read_text()
        config = render_config(template, self.data_dir, self.ports, self.time_tick_ms)
        (configs / "milvus.yaml").write_text(config)
        (configs / "embedEtcd.yaml").write_text(etcd_config(self.ports))
        shutil.copy2(self.install.package_dir / "data" / "glog.conf", configs / "glog.conf")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                # The alias names its pid file, /run/milvus/standalone-ALIAS.pid (else in
                # /tmp/milvus): one per server, not one that every server overwrites.
                [str(self.install.milvus), "run", "standalone", f"-alias={self.alias}"],
                # configs/milvus.yaml and glog.conf are read from the working directory.
                cwd=self.data_dir,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until /healthz says OK and a client lists the collections, or raise with the log."""
        assert self.ports is not None
        from pymilvus import MilvusClient

        health = f"http://127.0.0.1:{self.ports.metrics}/healthz"
        deadline = time.monotonic() + timeout
        healthy = False
        last_error = ""
        while True:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise MilvusSetupError(
                    f"milvus exited (code {code}); see {self.log_path}:\n{self.tail()}"
                )
            try:
                if not healthy:
                    with urllib.request.urlopen(health, timeout=2) as response:
                        healthy = b"OK" in response.read()
                if healthy:
                    client = MilvusClient(uri=self.uri, timeout=5)
                    try:
                        client.list_collections(timeout=5)
                    finally:
                        client.close()
                    return
            except Exception as error:  # not up yet: connection refused, UNAVAILABLE, ...
                last_error = f"{type(error).__name__}: {error}"
            if time.monotonic() > deadline:
                raise MilvusSetupError(
                    f"milvus not ready after {timeout:.0f}s ({last_error or 'no health'}); "
                    f"see {self.log_path}:\n{self.tail()}"
                )
            time.sleep(0.25)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGINT, then SIGKILL of its process group after `grace` seconds."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            with suppress(ProcessLookupError):
                process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                progress(f"milvus did not stop in {grace:.0f}s after SIGINT: killing it")
        # Whatever is left of its process group (it runs in a session of its own).
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        # What it leaves in its runtime directories when killed, or when its stop panics: its
        # pid file, and the node ids it keeps for a restart of the same process id.
        for run_dir in (Path("/run/milvus"), Path("/tmp/milvus")):
            for name in (f"standalone-{self.alias}.pid", f"server_id_{process.pid}"):
                with suppress(OSError):
                    (run_dir / name).unlink(missing_ok=True)

    def rss_bytes(self) -> int:
        """Resident memory of the server process now (0 if not running)."""
        if self.process is None or self.process.poll() is not None:
            return 0
        with suppress(OSError):
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def tail(self, lines: int = 40) -> str:
        """The end of its log; around a Go crash report, if any (its goroutine dump would fill
        the end)."""
        if not self.log_path.is_file():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        panics = [i for i, line in enumerate(text) if CRASH.match(line)]
        if panics:
            return "\n".join(text[max(0, panics[-1] - lines // 2) : panics[-1] + lines // 2])
        return "\n".join(text[-lines:])


@contextmanager
def running_milvus_server(
    data_dir: Path,
    *,
    port: int = 0,
    timeout: float = START_TIMEOUT,
    stop_grace: float = STOP_GRACE,
    time_tick_ms: int = DEFAULT_TIME_TICK_MS,
    env: Path | None = None,
) -> Iterator[str]:
    """Start a Milvus server keeping its files under `data_dir`, on free loopback ports (the
    public one `port` if given), wait until it answers (at most `timeout` s), yield its URI,
    and stop it on exit: SIGINT, then SIGKILL of its process group after `stop_grace` s.
    `time_tick_ms` (proxy.timeTickInterval): how often a Strong-consistency read can be served.

    Needs `setup` done (it never installs: tests must not pip-install behind one's back).
    """
    server = MilvusServer(find_install(env), data_dir, port=port, time_tick_ms=time_tick_ms)
    try:
        server.start()
        server.wait_ready(timeout)
        yield server.uri
    finally:
        server.stop(stop_grace)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("setup", help=f"install Milvus {MILVUS_VERSION} into .cache/milvus-env")
    run = commands.add_parser("run", help="start a server, print its URI, run until ^C")
    run.add_argument("--data", type=Path, required=True, help="its data, config and logs")
    run.add_argument("--port", type=int, default=0, help="the public port (default: a free one)")
    run.add_argument("--timeout", type=float, default=START_TIMEOUT)
    args = parser.parse_args(argv)

    try:
        if args.command == "setup":
            started = time.monotonic()
            install = setup()
            progress(f"Milvus {MILVUS_VERSION} ready ({time.monotonic() - started:.1f}s)")
            print(install.milvus)
            return 0

        def terminate(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, terminate)
        # Started in the background by a script, SIGINT would be ignored: ^C or kill -INT stop it.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        server = MilvusServer(setup(), args.data, port=args.port)
        started = time.monotonic()
        try:
            server.start()
            server.wait_ready(args.timeout)
            elapsed = time.monotonic() - started
            progress(
                f"Milvus {MILVUS_VERSION} ready in {elapsed:.1f}s, "
                f"{server.rss_bytes() / 2**20:.0f} MiB resident; data, config and logs in "
                f"{server.data_dir}; ^C stops it"
            )
            print(server.uri, flush=True)
            assert server.process is not None
            code = server.process.wait()
            progress(f"milvus exited (code {code}); see {server.log_path}:\n{server.tail()}")
            return 1
        except KeyboardInterrupt:
            return 0
        finally:
            server.stop()
    except MilvusSetupError as error:
        progress(f"error: {error}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
