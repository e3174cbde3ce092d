#!/usr/bin/env python
"""Load and fault test of the embedded stack: Index and Search at a given concurrency against
a `loupe up` stack of its own (a temporary data directory, free loopback ports), with faults
injected on a schedule: kill -9 or SIGSTOP/SIGCONT of each of the stack's processes, Redis,
milvus-lite (retrieval's child) and the supervisor included.

It reports throughput, latency percentiles, errors by gRPC code, how long the stack took to
recover from each fault, the resident memory of each process, and afterwards looks up every
write that was acknowledged: each Index that answered OK must be found by Get (which reads
retrieval's sidecar) and, once the stack is down, in milvus-lite's file (what searches read).
Bounded: it stops at --duration seconds or
--max-requests requests, whichever comes first (or, with faults, once the last has
recovered and --fault-gap seconds passed), and each fault waits at most
--recover-timeout for the stack to recover. Loopback only; it signals no process but the
ones its own stack's state file (and retrieval's children) name.

    nice -n 19 .venv/bin/python tools/loadtest.py --duration 120 --concurrency 4 \\
        --faults kill:retrieval,stop:milvus-lite,kill:redis --json /tmp/loadtest.json

Exit status 0 when no acknowledged write was lost and every fault recovered within
--recover-bound seconds; 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "services" / "api")]

import grpc  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from loupe.v1 import gateway_pb2, gateway_pb2_grpc  # noqa: E402
from services.cli import stack as stacks  # noqa: E402
from services.cli.client import with_key  # noqa: E402
from services.common.channels import open_blocking_channel  # noqa: E402

LOUPE = str(Path(sys.executable).parent / "loupe")
TARGETS = (
    "redis",
    "detection",
    "embedding",
    "retrieval",
    "ranking",
    "gateway",
    "milvus-lite",
    "supervisor",
)
# Every process killed, then every process stopped (for --stop-seconds), then milvus-lite
# stopped for longer than retrieval gives it (LOUPE_MILVUS_LITE_RESTART_SECONDS, 10 s).
DEFAULT_FAULTS = ",".join(
    [f"kill:{t}" for t in TARGETS] + [f"stop:{t}" for t in TARGETS] + ["stop:milvus-lite:15"]
)
# How often the recovery monitor looks, and progress is printed.
PROBE_SECONDS = 0.25
PROGRESS_SECONDS = 5.0


# -- the stack ---------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class OwnStack:
    data_dir: Path
    env: dict[str, str]
    gateway: str

    @classmethod
    def start(cls, data_dir: Path, settings: dict[str, str], timeout: float) -> OwnStack:
        services = stacks.SERVICES
        ports = free_ports(2 * len(services) + 1)
        env = {**os.environ, **settings}
        for i, name in enumerate(services):
            env[f"LOUPE_{name.upper()}_PORT"] = str(ports[i])
            env[f"LOUPE_{name.upper()}_METRICS_PORT"] = str(ports[len(services) + i])
        env["LOUPE_REDIS_PORT"] = str(ports[-1])
        gateway = f"127.0.0.1:{env['LOUPE_GATEWAY_PORT']}"
        env["LOUPE_GATEWAY"] = gateway
        # Each client command of this stack uses its own key and CA, whatever the caller has.
        env.pop("LOUPE_API_KEY", None)
        own = cls(data_dir, env, gateway)
        own.loupe("up", timeout=timeout)
        return own

    def loupe(self, command: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [LOUPE, command, "--data-dir", str(self.data_dir)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(f"loupe {command} exited {result.returncode}: {result.stderr}")
        return result

    def state(self) -> stacks.StackState:
        state = stacks.StackState.load(self.data_dir)
        if state is None:
            raise RuntimeError(f"no stack state in {self.data_dir}")
        return state

    def stub(self) -> gateway_pb2_grpc.GatewayStub:
        channel = open_blocking_channel(
            self.gateway,
            self.state().client_tls(),
            options=[("grpc.max_receive_message_length", 64 << 20)],
        )
        key = stacks.local_api_key(self.data_dir)
        return gateway_pb2_grpc.GatewayStub(with_key(channel, key))

    def pid(self, target: str) -> int:
        """The pid of one of this stack's processes now (0 if none), from its state file."""
        state = self.state()
        if target == "supervisor":
            return state.supervisor
        if target == "milvus-lite":
            retrieval = self.pid("retrieval")
            return stacks.milvus_lite_pid(retrieval) if retrieval else 0
        process = next((p for p in state.processes if p.name == target), None)
        if process is None or not stacks.alive(process.pid, stacks.process_marker(target)):
            return 0
        return process.pid

    def healthy(self) -> bool:
        rows = stacks.status(self.data_dir)
        names = {row.name for row in rows}
        return {"supervisor", "milvus-lite", "redis", *stacks.SERVICES} <= names and all(
            row.ok for row in rows
        )

    def rss(self) -> dict[str, int]:
        """Resident memory of each process now, bytes."""
        found = {}
        for target in TARGETS:
            pid = self.pid(target)
            with contextlib.suppress(OSError, StopIteration, ValueError):
                status = Path(f"/proc/{pid}/status").read_text()
                line = next(x for x in status.splitlines() if x.startswith("VmRSS:"))
                found[target] = int(line.split()[1]) * 1024
        return found


# -- requests ------------------------------------------------------------------------------


def image(seed: int, size: tuple[int, int] = (320, 240)) -> bytes:
    """A JPEG of random shapes, the same for the same seed, different from every other."""
    rng = random.Random(seed)
    picture = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(picture)
    for _ in range(12):
        x0, y0 = rng.randrange(size[0]), rng.randrange(size[1])
        box = [x0, y0, x0 + rng.randrange(20, 160), y0 + rng.randrange(20, 120)]
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=85)
    return out.getvalue()


@dataclass
class Tally:
    """What the load saw, shared by the workers (under `lock`)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    acknowledged: dict[str, int] = field(default_factory=dict)
    requests: int = 0

    def ok(self, op: str, seconds: float) -> None:
        with self.lock:
            self.latencies[op].append(seconds)

    def failed(self, op: str, code: str) -> None:
        with self.lock:
            self.errors[op][code] += 1

    def ack(self, item_id: str, seed: int) -> None:
        with self.lock:
            self.acknowledged[item_id] = seed


class Load:
    def __init__(self, own: OwnStack, args: argparse.Namespace, tally: Tally) -> None:
        self.stub = own.stub()
        self.args = args
        self.tally = tally
        self.stop = threading.Event()
        self._seed = 0
        self._seed_lock = threading.Lock()

    def seed(self) -> int:
        with self._seed_lock:
            self._seed += 1
            return self._seed

    def index(self, prefix: str = "lt") -> bool:
        seed = self.seed()
        item_id = f"{prefix}-{seed}"
        request = gateway_pb2.IndexRequest(
            item_id=item_id, image=image(seed), detect=random.random() < self.args.detect_ratio
        )
        started = time.perf_counter()
        try:
            reply = self.stub.Index(request, timeout=self.args.rpc_timeout)
        except grpc.RpcError as error:
            self.tally.failed("index", error.code().name)
            return False
        self.tally.ok("index", time.perf_counter() - started)
        if reply.indexed:
            self.tally.ack(item_id, seed)
        return True

    def search(self) -> bool:
        # A new image each time: no cached result, the whole path every time.
        request = gateway_pb2.SearchRequest(image=image(10_000_000 + self.seed()), top_k=10)
        started = time.perf_counter()
        try:
            self.stub.Search(request, timeout=self.args.rpc_timeout)
        except grpc.RpcError as error:
            self.tally.failed("search", error.code().name)
            return False
        self.tally.ok("search", time.perf_counter() - started)
        return True

    def worker(self, deadline: float) -> None:
        while not self.stop.is_set() and time.monotonic() < deadline:
            with self.tally.lock:
                if self.tally.requests >= self.args.max_requests:
                    return
                self.tally.requests += 1
            ok = self.index() if random.random() < self.args.index_ratio else self.search()
            if not ok:
                # A failing stack is not hammered: a short pause, as a client would.
                time.sleep(0.1)


# -- faults --------------------------------------------------------------------------------


@dataclass
class Fault:
    action: str  # kill | stop
    target: str
    stop_seconds: float = 0.0
    pid: int = 0
    injected_at: float = 0.0  # seconds since the start of the run
    # Seconds from the fault (from SIGCONT, for a stop) until every process runs and
    # serves and a write and a search go through; None if not within --recover-timeout.
    recovered_s: float | None = None
    # From the fault itself, stops included.
    outage_s: float | None = None
    errors: int = 0
    note: str = ""

    @property
    def name(self) -> str:
        if self.action == "stop":
            return f"stop {self.target} {self.stop_seconds:g}s"
        return f"kill -9 {self.target}"


def parse_faults(spec: str, stop_seconds: float) -> list[Fault]:
    if spec in ("", "none"):
        return []
    faults = []
    for part in (spec if spec != "all" else DEFAULT_FAULTS).split(","):
        fields = part.strip().split(":")
        if len(fields) not in (2, 3) or fields[0] not in ("kill", "stop"):
            raise SystemExit(f"--faults: {part!r}: expected kill:TARGET or stop:TARGET[:SECONDS]")
        if fields[1] not in TARGETS:
            raise SystemExit(f"--faults: {part!r}: TARGET is one of {', '.join(TARGETS)}")
        seconds = float(fields[2]) if len(fields) == 3 else stop_seconds
        faults.append(Fault(fields[0], fields[1], seconds if fields[0] == "stop" else 0.0))
    return faults


def recover(own: OwnStack, load: Load, timeout: float) -> float | None:
    """Seconds until the stack is whole again: every process running and serving, and a
    write and a search that succeed (the write is counted as any other). None: not in time."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(Exception):
            if own.healthy() and load.index("probe") and load.search():
                return time.monotonic() - started
        time.sleep(PROBE_SECONDS)
    return None


def inject(own: OwnStack, load: Load, fault: Fault, args: argparse.Namespace, t0: float) -> None:
    pid = own.pid(fault.target)
    if not pid:
        fault.note = "no such process at the time"
        return
    fault.pid, fault.injected_at = pid, time.monotonic() - t0
    began = time.monotonic()
    before = sum(sum(c.values()) for c in load.tally.errors.values())
    if fault.action == "kill":
        os.kill(pid, signal.SIGKILL)
        if fault.target == "supervisor":
            # Nothing restarts a supervisor: the operator's `loupe up` repairs the stack.
            time.sleep(1.0)
            own.loupe("up", timeout=args.recover_timeout)
            fault.note = "repaired by `loupe up`"
        # Give the supervisor (or retrieval's watch) time to notice before looking.
        time.sleep(0.5)
        resumed = began
    else:
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(fault.stop_seconds)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        resumed = time.monotonic()
        if not stacks.alive(pid) and fault.target != "milvus-lite":
            fault.note = "killed while stopped"
        elif fault.target == "milvus-lite" and own.pid("milvus-lite") != pid:
            fault.note = "restarted by retrieval while stopped"
    took = recover(own, load, args.recover_timeout)
    if took is not None:
        fault.recovered_s = round(time.monotonic() - resumed, 2)
        fault.outage_s = round(time.monotonic() - began, 2)
    fault.errors = sum(sum(c.values()) for c in load.tally.errors.values()) - before


# -- the run -------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def verify(own: OwnStack, tally: Tally, args: argparse.Namespace) -> dict[str, Any]:
    """Every acknowledged write, looked up by Get; a sample, searched by its own image (for
    information: random shapes look alike to the embedder, so a search may rank an item
    low; whether it is in Milvus is read from the file, missing_from_milvus)."""
    stub = own.stub()
    missing: list[str] = []
    failed: Counter[str] = Counter()

    def get(item_id: str) -> None:
        for attempt in range(3):
            try:
                stub.Get(gateway_pb2.GetRequest(item_id=item_id), timeout=args.rpc_timeout)
                return
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    missing.append(item_id)
                    return
                if attempt == 2:
                    failed[error.code().name] += 1
                time.sleep(1.0)

    acknowledged = dict(tally.acknowledged)
    with ThreadPoolExecutor(max(1, args.concurrency)) as pool:
        list(pool.map(get, acknowledged))
    sample = random.Random(7).sample(
        sorted(acknowledged), min(args.verify_search, len(acknowledged))
    )
    unsearchable = []
    for item_id in sample:
        # Top 50: random shapes look alike to the embedder, and augmentation moves stored
        # vectors towards their neighbours.
        request = gateway_pb2.SearchRequest(image=image(acknowledged[item_id]), top_k=50)
        reply = stub.Search(request, timeout=args.rpc_timeout)
        if item_id not in [hit.item_id for hit in reply.results]:
            unsearchable.append(item_id)
    return {
        "acknowledged": len(acknowledged),
        "found_by_get": len(acknowledged) - len(missing) - sum(failed.values()),
        "lost": sorted(missing),
        "get_errors": dict(failed),
        "searched": len(sample),
        "not_found_by_search": unsearchable,
    }


def missing_from_milvus(data_dir: Path, item_ids: list[str]) -> list[str]:
    """Items with no whole-image row in the stack's milvus-lite file, read directly once the
    stack is down: Get answers from retrieval's sidecar, so this is what shows a row that
    Milvus lost behind the sidecar's back (it would be found, but never searched)."""
    with warnings.catch_warnings():
        # milvus-lite 2.5 imports pkg_resources, deprecated; nothing to act on here.
        warnings.simplefilter("ignore", UserWarning)
        from milvus_lite.server_manager import server_manager_instance
    from pymilvus import MilvusClient

    from services.retrieval.store import row_key

    uri = str(data_dir / "milvus.db")
    client = MilvusClient(uri=uri)
    try:
        collection = "loupe__default"
        client.load_collection(collection)
        pks = {row_key(item_id, 0): item_id for item_id in item_ids}
        found: set[str] = set()
        keys = sorted(pks)
        for start in range(0, len(keys), 1000):
            listed = ", ".join(json.dumps(pk) for pk in keys[start : start + 1000])
            rows = client.query(collection, filter=f"pk in [{listed}]", output_fields=["pk"])
            found |= {row["pk"] for row in rows}
    finally:
        client.close()
        server_manager_instance.release_server(uri)
    return sorted(item_id for pk, item_id in pks.items() if pk not in found)


def run(args: argparse.Namespace) -> dict[str, Any]:
    faults = parse_faults(args.faults, args.stop_seconds)
    temporary = args.data_dir is None
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="loupe-loadtest-")).resolve()
    say(f"starting a stack in {data_dir}")
    settings = {"LOUPE_REDIS_RETRY_SECONDS": "1"}
    started_stack = time.monotonic()
    own = OwnStack.start(data_dir, settings, args.startup_timeout)
    say(f"stack up in {time.monotonic() - started_stack:.1f}s: gateway {own.gateway}")
    tally = Tally()
    load = Load(own, args, tally)
    rss_max: dict[str, int] = {}
    rss_last: dict[str, int] = {}
    # The first sample after the load began: growth over a soak is last - first.
    rss_first: dict[str, int] = {}
    t0 = time.monotonic()
    deadline = t0 + args.duration
    workers = [
        threading.Thread(target=load.worker, args=(deadline,), daemon=True)
        for _ in range(args.concurrency)
    ]
    for worker in workers:
        worker.start()

    def sample_rss() -> None:
        for name, value in own.rss().items():
            rss_first.setdefault(name, value)
            rss_last[name] = value
            rss_max[name] = max(value, rss_max.get(name, 0))

    def progress(now: float, current: str) -> None:
        done = {op: len(v) for op, v in tally.latencies.items()}
        errors = sum(sum(c.values()) for c in tally.errors.values())
        elapsed = now - t0
        rate = sum(done.values()) / max(elapsed, 1e-9)
        say(
            f"t={elapsed:5.0f}s ok {sum(done.values())} ({rate:.1f}/s; index {done.get('index', 0)}"
            f", search {done.get('search', 0)}) errors {errors} acked {len(tally.acknowledged)}"
            + (f" | {current}" if current else "")
        )

    stopping = threading.Event()
    current = [""]

    def reporter() -> None:
        while not stopping.wait(PROGRESS_SECONDS):
            with contextlib.suppress(Exception):
                sample_rss()
            progress(time.monotonic(), current[0])

    reporting = threading.Thread(target=reporter, daemon=True)
    reporting.start()
    try:
        time.sleep(min(args.warmup, args.duration))
        for fault in faults:
            if time.monotonic() + args.fault_gap > deadline or load.stop.is_set():
                fault.note = "not injected: out of time"
                continue
            if not any(w.is_alive() for w in workers):
                fault.note = "not injected: request budget spent"
                continue
            current[0] = f"fault: {fault.name}"
            say(f"fault: {fault.name}")
            with contextlib.suppress(Exception):
                sample_rss()
            try:
                inject(own, load, fault, args, t0)
            except Exception as error:
                # Reported with the fault (not recovered), and the run goes on.
                fault.note = f"{type(error).__name__}: {str(error)[-500:]}"
            say(
                f"  {fault.name}: "
                + (
                    f"recovered in {fault.recovered_s}s (outage {fault.outage_s}s), "
                    f"{fault.errors} failed requests"
                    if fault.recovered_s is not None
                    else f"NOT recovered within {args.recover_timeout}s"
                )
                + (f"; {fault.note}" if fault.note else "")
            )
            current[0] = ""
            time.sleep(args.fault_gap)
        if faults:
            # The schedule is done: so is the run, rather than idling until --duration.
            load.stop.set()
        for worker in workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()) + args.rpc_timeout + 5)
        load.stop.set()
        elapsed = time.monotonic() - t0
        stopping.set()
        with contextlib.suppress(Exception):
            sample_rss()
        progress(time.monotonic(), "load done; verifying acknowledged writes")
        verified = verify(own, tally, args)
        if not args.keep:
            own.loupe("down", timeout=300)
            say("stack down; reading milvus-lite's file for every acknowledged write")
            lost = missing_from_milvus(data_dir, sorted(tally.acknowledged))
            verified["not_in_milvus"] = lost
            verified["checked_in_milvus"] = len(tally.acknowledged)
    finally:
        load.stop.set()
        stopping.set()
        if not args.keep:
            with contextlib.suppress(Exception):
                own.loupe("down", timeout=300)
            if temporary:
                shutil.rmtree(data_dir, ignore_errors=True)
    ops = {
        op: {
            "ok": len(values),
            "errors": dict(tally.errors.get(op, {})),
            "per_s": round(len(values) / elapsed, 2),
            "p50_ms": round(1000 * percentile(values, 0.50), 1),
            "p95_ms": round(1000 * percentile(values, 0.95), 1),
            "p99_ms": round(1000 * percentile(values, 0.99), 1),
        }
        for op in ("index", "search")
        for values in [tally.latencies.get(op, [])]
    }
    recovered = [f.recovered_s for f in faults if f.pid]
    worst = None if None in recovered else max((r for r in recovered if r is not None), default=0.0)
    return {
        "settings": {k: v for k, v in vars(args).items() if k not in ("json",) and v is not None},
        "data_dir": str(data_dir),
        "elapsed_s": round(elapsed, 1),
        "requests": tally.requests,
        "throughput_per_s": round(sum(len(v) for v in tally.latencies.values()) / elapsed, 2),
        "ops": ops,
        "errors_by_code": dict(
            sum((Counter(c) for c in tally.errors.values()), Counter()).most_common()
        ),
        "faults": [asdict(f) | {"name": f.name} for f in faults],
        "worst_recovery_s": worst,
        "rss_mib": {
            name: {
                "first": round(rss_first.get(name, 0) / 2**20),
                "last": round(rss_last.get(name, 0) / 2**20),
                "max": round(v / 2**20),
            }
            for name, v in sorted(rss_max.items())
        },
        "verification": verified,
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        f"ran {result['elapsed_s']}s, {result['requests']} requests, "
        f"{result['throughput_per_s']} ok/s",
        "op      ok     /s    p50 ms   p95 ms   p99 ms  errors",
    ]
    for op, o in result["ops"].items():
        lines.append(
            f"{op:<7}{o['ok']:>5} {o['per_s']:>6} {o['p50_ms']:>8} {o['p95_ms']:>8} "
            f"{o['p99_ms']:>8}  {o['errors'] or '-'}"
        )
    lines.append(f"errors by code: {result['errors_by_code'] or 'none'}")
    if result["faults"]:
        lines.append("fault                      recovered s  outage s  failed requests  note")
        for f in result["faults"]:
            recovered = "-" if f["recovered_s"] is None else f["recovered_s"]
            outage = "-" if f["outage_s"] is None else f["outage_s"]
            lines.append(
                f"{f['name']:<27}{recovered!s:>11} {outage!s:>9} {f['errors']:>16}  {f['note']}"
            )
        lines.append(f"worst recovery: {result['worst_recovery_s']}s")
    lines.append(
        "RSS MiB (first / last / max): "
        + ", ".join(
            f"{n} {v['first']}/{v['last']}/{v['max']}" for n, v in result["rss_mib"].items()
        )
    )
    v = result["verification"]
    lines.append(
        f"acknowledged writes: {v['acknowledged']}, found by Get {v['found_by_get']}, "
        f"lost {len(v['lost'])}{' ' + str(v['lost'][:10]) if v['lost'] else ''}, "
        f"Get errors {v['get_errors'] or 0}; in milvus-lite's file "
        + (
            f"{v['checked_in_milvus'] - len(v['not_in_milvus'])} of {v['checked_in_milvus']}"
            if "checked_in_milvus" in v
            else "not checked (--keep)"
        )
        + f"; searched by own image {v['searched']}, not in the top 50 "
        f"{len(v['not_found_by_search'])} (search quality, not a loss: the row is in Milvus)"
    )
    return "\n".join(lines)


def passed(result: dict[str, Any], bound: float) -> bool:
    v = result["verification"]
    worst = result["worst_recovery_s"]
    return (
        not v["lost"]
        and not v["get_errors"]
        and not v.get("not_in_milvus")
        and worst is not None
        and worst <= bound
    )


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=120.0, help="seconds (120)")
    parser.add_argument(
        "--max-requests", type=int, default=100_000, help="requests at most (100000)"
    )
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (4)")
    parser.add_argument("--index-ratio", type=float, default=0.3, help="share of Index (0.3)")
    parser.add_argument(
        "--detect-ratio", type=float, default=0.5, help="share of Index with detection (0.5)"
    )
    parser.add_argument(
        "--faults",
        default="none",
        help="comma-separated kill:TARGET or stop:TARGET[:SECONDS], 'all' or 'none' (none); "
        f"TARGET: {', '.join(TARGETS)}",
    )
    parser.add_argument("--stop-seconds", type=float, default=3.0, help="how long a stop lasts (3)")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before faults (10)")
    parser.add_argument(
        "--fault-gap", type=float, default=5.0, help="seconds of load after a recovery (5)"
    )
    parser.add_argument(
        "--recover-timeout", type=float, default=120.0, help="wait per fault at most (120)"
    )
    parser.add_argument(
        "--recover-bound", type=float, default=60.0, help="worst recovery that passes (60)"
    )
    parser.add_argument("--rpc-timeout", type=float, default=30.0, help="per request (30)")
    parser.add_argument(
        "--verify-search", type=int, default=20, help="acknowledged items searched after (20)"
    )
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--data-dir", help="the stack's data directory (a temporary one)")
    parser.add_argument("--keep", action="store_true", help="leave the stack running")
    parser.add_argument("--json", help="write the result here as JSON too")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or not 0 <= args.index_ratio <= 1 or args.duration <= 0:
        parser.error("--concurrency >= 1, --index-ratio in [0, 1], --duration > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    ok = passed(result, args.recover_bound)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
