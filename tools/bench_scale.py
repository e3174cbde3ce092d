"""Loupe as its catalogue grows: ingest, search latency, candidate recall, bytes per item.

    .venv/bin/python tools/bench_scale.py --out OUT [--sizes 10000,100000,1000000]
        [--configs binary,float] [--milvus-server] [--window 5000] [--queries 200]
    .venv/bin/python tools/bench_scale.py --plot OUT [--plot OUT2 ...] --plots-to docs/images

Each configuration gets a stack of its own (`loupe up`, loopback ports): `binary`, the
defaults (sign codes in the compact index, oversampled and re-scored with the int8 vectors
stored beside it), and `float` (the full float vector in the index, FLAT). With
--milvus-server, retrieval talks to a real Milvus server (tools/milvus_server.py) instead of
the embedded milvus-lite; `binary` then uses BIN_IVF_FLAT, the index a server would.

The catalogue is Corel-1k's 1000 real vectors (embedded by models/embedder) mixed with
clustered synthetic ones drawn in the real ones' shape (tools/synthetic.py), written through
retrieval's Upsert, 32 calls in flight. At each size:
  - ingest: items per second over the last --window items written, one Upsert call each,
    duplicate detection and index-time DBA on (the defaults). Above --exhaustive-prefill-max
    (100 k), the items before the window are written with both off, 256 to an UpsertItems
    call: with them on, milvus-lite's exhaustive neighbour search would make 2 cores take
    hours to reach 1 M (the measured rates show why);
  - the DBA batch job over the whole catalogue, up to --augment-max items (100 k): items/s;
  - the stack is restarted (the time until it serves again is reported), then searches go
    through the gateway: by item id (stored vectors, no embedding) and by image (a Corel
    JPEG: decode, embed, search), one at a time and 16 at a time, each query different, the
    caches emptied first; p50/p95/p99 and queries per second;
  - candidate recall@10: the K' = 100 candidates retrieval returns for a query (what the
    gateway asks for top_k 10) against the exact top 10 by cosine over every stored vector,
    for Corel's real vectors (as image queries send them) and for fresh synthetic ones;
  - bytes per item on disk and in each process (resident memory above the empty stack's).
Results go to OUT/results.json, one entry per configuration and size, and a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from loupe.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc
from services.cli import local_tls
from services.cli.client import auth_metadata
from services.cli.stack import StackState, local_api_key
from services.common import vectors
from services.common.channels import TLSSettings, open_channel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOUPE = str(Path(sys.executable).parent / "loupe")
SERVICES = ("gateway", "detection", "embedding", "retrieval", "ranking")
COREL = ROOT.parent / "shared" / "data" / "corel1k" / "images"
IN_FLIGHT = 32
CANDIDATES = 100
TOP_K = 10
OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
]


# -- the stack --------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@dataclass
class Stack:
    data_dir: Path
    env: dict[str, str]
    ports: dict[str, int]

    @classmethod
    def create(cls, data_dir: Path, extra: dict[str, str]) -> Stack:
        ports = free_ports(2 * len(SERVICES) + 1)
        env = dict(os.environ, **extra)
        named = {}
        for i, name in enumerate(SERVICES):
            named[name] = ports[i]
            env[f"LOUPE_{name.upper()}_PORT"] = str(ports[i])
            env[f"LOUPE_{name.upper()}_METRICS_PORT"] = str(ports[len(SERVICES) + i])
        named["redis"] = ports[-1]
        env["LOUPE_REDIS_PORT"] = str(ports[-1])
        # A 1 M-item stack loads for a while; the benchmark runs no automatic batch job
        # (at 1 M items on 2 cores it would run for hours).
        env["LOUPE_DBA_REFRESH_SECONDS"] = "0"
        env["LOUPE_LOG_LEVEL"] = "WARNING"
        return cls(data_dir, env, named)

    def up(self, overrides: dict[str, str] | None = None) -> float:
        """Start it; the seconds until every service is SERVING."""
        started = time.monotonic()
        subprocess.run(
            [LOUPE, "up", "--data-dir", str(self.data_dir), "--timeout", "1800"],
            env={**self.env, **(overrides or {})},
            check=True,
            capture_output=True,
        )
        return time.monotonic() - started

    def down(self) -> None:
        subprocess.run(
            [LOUPE, "down", "--data-dir", str(self.data_dir)],
            env=self.env,
            check=False,
            capture_output=True,
        )

    def address(self, service: str) -> str:
        return f"127.0.0.1:{self.ports[service]}"

    def tls(self) -> TLSSettings:
        """The stack's CA and client certificate, which its backends require."""
        state = StackState.load(self.data_dir)
        return state.client_tls() if state is not None else TLSSettings()

    def auth(self) -> tuple[tuple[str, str], ...]:
        """Metadata with the admin key `loupe up` made, for calls to the gateway (passed per
        call: a client interceptor would add its own cost to the latencies measured)."""
        return auth_metadata(local_api_key(self.data_dir))

    def pids(self) -> dict[str, int]:
        """Every process of the stack, milvus-lite's server (a child of retrieval) included."""
        state = json.loads((self.data_dir / "run" / "stack.json").read_text())
        pids = {p["name"]: p["pid"] for p in state["processes"]}
        for child in _children(pids["retrieval"]):
            if b"milvus" in Path(f"/proc/{child}/cmdline").read_bytes():
                pids["milvus-lite"] = child
        return pids

    def flush_redis(self) -> None:
        import redis

        password = local_tls.redis_password(self.data_dir) or None
        redis.Redis(port=self.ports["redis"], password=password).flushall()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def memory(pid: int) -> dict[str, int]:
    """Resident bytes of a process: anonymous (heap) and file-backed (mapped files)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def disk_bytes(data_dir: Path) -> int:
    """Bytes of the stored catalogue: milvus-lite's file and the vectors beside it."""
    return sum(
        p.stat().st_size
        for p in data_dir.iterdir()
        if p.is_file() and (p.name.startswith("milvus.") or ".sqlite" in p.name)
    )


# -- writing ----------------------------------------------------------------------------------


@dataclass
class Writer:
    """Writes items through retrieval's Upsert, IN_FLIGHT calls at a time (the measured
    ingest), or UpsertItems, 256 items a call (the pre-fill, whose rate is not the point)."""

    address: str
    generator: synthetic.Generator
    written: int = 0
    tls: TLSSettings = field(default_factory=TLSSettings)

    async def write(
        self,
        vectors_: np.ndarray,
        ids: list[str],
        hashes: list[str],
        near: float,
        *,
        batched: bool = False,
    ) -> None:
        channel = open_channel(self.address, self.tls, options=OPTIONS)
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        slots = asyncio.Semaphore(IN_FLIGHT)

        def request(k: int) -> retrieval_pb2.UpsertRequest:
            item = retrieval_pb2.StoredItem(
                item_id=ids[k],
                content_hash=hashes[k],
                model_version="embedder/1",
                image_width=640,
                image_height=480,
                metadata={
                    "category": common_pb2.Value(string_value=f"c{k % 50}"),
                    "popularity": common_pb2.Value(number_value=k % 1000),
                },
            )
            item.objects.add(object_index=0, vector=vectors.to_vector(vectors_[k]))
            return retrieval_pb2.UpsertRequest(item=item, near_duplicate_threshold=near)

        async def one(k: int) -> None:
            async with slots:
                await stub.Upsert(request(k), timeout=120)

        async def many(start: int) -> None:
            async with slots:
                items = [request(k) for k in range(start, min(start + 256, len(ids)))]
                reply = await stub.UpsertItems(
                    retrieval_pb2.UpsertItemsRequest(items=items), timeout=600
                )
                failed = [r.error for r in reply.results if r.code]
                if failed:
                    raise RuntimeError(f"{len(failed)} items not written: {failed[0]}")

        try:
            if batched:
                await asyncio.gather(*(many(k) for k in range(0, len(ids), 256)))
            else:
                await asyncio.gather(*(one(k) for k in range(len(ids))))
        finally:
            await channel.close()

    def synthetic(self, count: int, near: float, progress: str, batched: bool = False) -> float:
        """Write `count` new synthetic items; their items per second."""
        started = time.perf_counter()
        bar = tqdm(total=count, desc=progress, unit="item", file=sys.stderr, mininterval=2)
        done = 0
        while done < count:
            step = min(4000, count - done)
            batch = self.generator.draw(step)
            ids = [f"syn/{self.written + k}" for k in range(step)]
            hashes = [hashlib.sha256(i.encode()).hexdigest() for i in ids]
            asyncio.run(self.write(batch, ids, hashes, near, batched=batched))
            self.written += step
            done += step
            bar.update(step)
        bar.close()
        return count / (time.perf_counter() - started)


# -- searching --------------------------------------------------------------------------------


def percentiles(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)

    def at(q: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50_ms": 1000 * statistics.median(ordered), "p95_ms": at(0.95), "p99_ms": at(0.99)}


def timed_searches(
    address: str,
    requests: list[gateway_pb2.SearchRequest],
    concurrency: int,
    desc: str,
    metadata: tuple[tuple[str, str], ...] = (),
    tls: TLSSettings | None = None,
) -> dict[str, float]:
    """Send the searches, `concurrency` at a time: latency percentiles and queries a second."""

    async def run() -> dict[str, float]:
        channel = open_channel(address, tls or TLSSettings(), options=OPTIONS)
        stub = gateway_pb2_grpc.GatewayStub(channel)
        slots = asyncio.Semaphore(concurrency)
        times: list[float] = []
        bar = tqdm(total=len(requests), desc=desc, unit="q", file=sys.stderr, mininterval=2)

        async def one(request: gateway_pb2.SearchRequest) -> None:
            async with slots:
                started = time.perf_counter()
                await stub.Search(request, timeout=120, metadata=metadata)
                times.append(time.perf_counter() - started)
                bar.update(1)

        started = time.perf_counter()
        await asyncio.gather(*(one(r) for r in requests))
        elapsed = time.perf_counter() - started
        bar.close()
        await channel.close()
        return {**percentiles(times), "qps": len(requests) / elapsed}

    return asyncio.run(run())


def search_latency(
    stack: Stack, item_ids: list[str], images: list[Path], queries: int
) -> dict[str, dict[str, float]]:
    """Item and image queries through the gateway, one and 16 at a time, each query new (the
    caches emptied first, so every one is computed)."""
    stack.flush_redis()
    rng = np.random.default_rng(5)
    warm = 10
    items = [str(i) for i in rng.choice(item_ids, size=warm + 2 * queries, replace=False)]
    photos = [images[i] for i in rng.permutation(len(images))[: warm + 2 * queries]]
    kinds = {
        "item": [gateway_pb2.SearchRequest(item_id=i, top_k=TOP_K) for i in items],
        "image": [gateway_pb2.SearchRequest(image=p.read_bytes(), top_k=TOP_K) for p in photos],
    }
    results = {}
    address, auth, tls = stack.address("gateway"), stack.auth(), stack.tls()
    for kind, requests in kinds.items():
        per_level = (len(requests) - warm) // 2
        timed_searches(address, requests[:warm], 1, f"{kind} warm-up", auth, tls)
        for level, chunk in (
            (1, requests[warm : warm + per_level]),
            (16, requests[warm + per_level : warm + 2 * per_level]),
        ):
            results[f"{kind}_c{level}"] = timed_searches(
                address, chunk, level, f"{kind} queries, {level} at a time", auth, tls
            )
    return results


# -- recall -----------------------------------------------------------------------------------


def stored_whole_images(stack: Stack, milvus_uri: str) -> Iterator[tuple[list[str], np.ndarray]]:
    """(item ids, stored vectors) of every whole image, a chunk at a time, read from where
    retrieval keeps them: the sidecar beside milvus-lite, or the rows on a server."""
    if not milvus_uri:
        path = stack.data_dir / "milvus.vectors.sqlite"
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        cursor = connection.execute(
            "SELECT pk, value FROM \"v__loupe__default\" WHERE pk LIKE '%#0'"
        )
        while rows := cursor.fetchmany(50000):
            yield [pk[:-2] for pk, _ in rows], vectors.dequantise([v for _, v in rows], 1280)
        connection.close()
        return
    import base64

    from pymilvus import MilvusClient

    client = MilvusClient(uri=milvus_uri)
    iterator = client.query_iterator(
        stack.env["LOUPE_MILVUS_COLLECTION_PREFIX"] + "__default",
        batch_size=10000,
        filter="object_index == 0",
        output_fields=["item_id", "vector"],
    )
    while rows := iterator.next():
        records = [base64.b64decode(r["vector"]) for r in rows]
        yield [r["item_id"] for r in rows], vectors.dequantise(records, 1280)
    iterator.close()
    client.close()


def candidate_recall(
    stack: Stack, milvus_uri: str, queries: dict[str, np.ndarray]
) -> dict[str, float]:
    """Recall@10 of retrieval's K' candidates against exact search, per kind of query."""
    everything = np.concatenate(list(queries.values()))
    # Each chunk's own best 10 per query, then the best 10 of those.
    scores: list[np.ndarray] = []
    names: list[np.ndarray] = []
    for ids, matrix in stored_whole_images(stack, milvus_uri):
        similarity = everything @ vectors.unit_rows(matrix).T
        take = min(TOP_K, similarity.shape[1])
        best = np.argpartition(-similarity, take - 1, axis=1)[:, :take]
        scores.append(np.take_along_axis(similarity, best, axis=1))
        names.append(np.asarray(ids, dtype=object)[best])
    all_scores = np.concatenate(scores, axis=1)
    all_names = np.concatenate(names, axis=1)
    order = np.argsort(-all_scores, axis=1)[:, :TOP_K]
    exact = [set(all_names[q, order[q]]) for q in range(len(everything))]

    async def candidates() -> list[set[str]]:
        channel = open_channel(stack.address("retrieval"), stack.tls(), options=OPTIONS)
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        found = []
        for query in everything:
            reply = await stub.Search(
                retrieval_pb2.RetrievalSearchRequest(
                    query=vectors.to_vector(query), limit=CANDIDATES, whole_images_only=True
                ),
                timeout=120,
            )
            found.append({c.item_id for c in reply.candidates})
        await channel.close()
        return found

    proposed = asyncio.run(candidates())
    recall = {}
    start = 0
    for kind, matrix in queries.items():
        hits = [len(exact[q] & proposed[q]) / TOP_K for q in range(start, start + len(matrix))]
        recall[kind] = float(np.mean(hits))
        start += len(matrix)
    return recall


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Point:
    config: str
    backend: str
    items: int
    ingest_items_per_s: float
    ingest_window: int
    prefill_items_per_s: float
    prefill_with_neighbours: bool
    restart_seconds: float
    search: dict[str, dict[str, float]]
    recall: dict[str, float]
    disk_bytes_per_item: float
    # Process -> {"rss": bytes, "anon": bytes, "rss_per_item": ..., "anon_per_item": ...}.
    memory: dict[str, dict[str, float]] = field(default_factory=dict)
    # The DBA batch job over the whole catalogue (--augment-max): items per second.
    augment_items_per_s: float = 0.0


def run_config(args: argparse.Namespace, config: str, real: np.ndarray, paths: list[Path]) -> None:
    out: Path = args.out
    data_dir = out / config / "data"
    subprocess.run(["rm", "-rf", str(out / config)], check=True)
    data_dir.mkdir(parents=True)
    extra = {"LOUPE_RETRIEVAL_CANDIDATE_CODE": config}
    server = None
    backend = "milvus-lite 2.5.1"
    if args.milvus_server:
        from milvus_server import MILVUS_VERSION, MilvusServer, find_install

        server = MilvusServer(find_install(), out / config / "milvus")
        server.start()
        server.wait_ready()
        backend = f"Milvus {MILVUS_VERSION} standalone"
        extra.update(
            LOUPE_MILVUS_URI=server.uri,
            LOUPE_MILVUS_COLLECTION_PREFIX=f"bench_{config}",
            LOUPE_MILVUS_INDEX_TYPE="BIN_IVF_FLAT" if config == "binary" else "HNSW",
        )
    stack = Stack.create(data_dir, extra)
    try:
        stack.up()
        base = {name: memory(pid) for name, pid in stack.pids().items()}
        base_server = server.rss_bytes() if server else 0
        writer = Writer(
            stack.address("retrieval"),
            synthetic.Generator(real, max(args.sizes)),
            tls=stack.tls(),
        )
        corel_ids = [f"corel/{p.name}" for p in paths]
        hashes = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
        asyncio.run(writer.write(real, corel_ids, hashes, 0.95))
        stored = len(paths)
        for size in args.sizes:
            prefill = max(0, size - args.window - stored)
            fast = size > args.exhaustive_prefill_max
            prefill_rate = 0.0
            if prefill:
                if fast:
                    stack.down()
                    stack.up({"LOUPE_DBA_NEIGHBOURS": "0"})
                prefill_rate = writer.synthetic(
                    prefill,
                    0.0 if fast else 0.95,
                    f"{config}: to {size - args.window:,}",
                    batched=fast,
                )
                if fast:
                    stack.down()
                    stack.up()
            window = size - stored - prefill
            with profiled(args.profile, stack, "retrieval", f"{config}-{size}-ingest"):
                rate = writer.synthetic(window, 0.95, f"{config}: ingest at {size:,}")
            stored = size
            augment_rate = 0.0
            if size <= args.augment_max:
                augment_rate = augment(stack, size)
            stack.down()
            restart = stack.up()
            item_ids = corel_ids + [f"syn/{k}" for k in range(writer.written)]
            with profiled(args.profile, stack, "retrieval", f"{config}-{size}-search"):
                search = search_latency(stack, item_ids, paths, args.queries)
            rng = np.random.default_rng(size)
            queries = {
                "corel": real[rng.choice(len(real), size=args.recall_queries, replace=False)],
                "synthetic": writer.generator.draw(args.recall_queries),
            }
            recall = candidate_recall(stack, extra.get("LOUPE_MILVUS_URI", ""), queries)
            pids = stack.pids()
            used = {}
            for name, pid in pids.items():
                now = memory(pid)
                before = base.get(name, {"VmRSS": 0, "RssAnon": 0})
                used[name] = {
                    "rss": now["VmRSS"],
                    "anon": now["RssAnon"],
                    "rss_per_item": (now["VmRSS"] - before["VmRSS"]) / size,
                    "anon_per_item": (now["RssAnon"] - before["RssAnon"]) / size,
                }
            if server is not None:
                rss = server.rss_bytes()
                used["milvus-server"] = {
                    "rss": rss,
                    "anon": rss,
                    "rss_per_item": (rss - base_server) / size,
                    "anon_per_item": (rss - base_server) / size,
                }
                disk = sum(
                    p.stat().st_size for p in (out / config / "milvus").rglob("*") if p.is_file()
                )
            else:
                disk = disk_bytes(data_dir)
            point = Point(
                config=config,
                backend=backend,
                items=size,
                ingest_items_per_s=rate,
                ingest_window=window,
                prefill_items_per_s=prefill_rate,
                prefill_with_neighbours=not fast,
                restart_seconds=restart,
                search=search,
                recall=recall,
                disk_bytes_per_item=disk / size,
                memory=used,
                augment_items_per_s=augment_rate,
            )
            save(out / "results.json", point)
            print(row(point), flush=True)
    finally:
        stack.down()
        if server is not None:
            server.stop()


@contextmanager
def profiled(target: Path | None, stack: Stack, service: str, name: str) -> Iterator[None]:
    """With --profile DIR: py-spy samples the service while the block runs (the threads
    holding the GIL, which is what limits a Python service), written as DIR/NAME.txt: the
    share of samples per function of ours, and in total."""
    if target is None:
        yield
        return
    target.mkdir(parents=True, exist_ok=True)
    raw = target / f"{name}.raw"
    spy = subprocess.Popen(
        [str(Path(sys.executable).parent / "py-spy"), "record", "--gil", "--format", "raw",
         "--output", str(raw),
         "--pid", str(stack.pids()[service])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)
        (target / f"{name}.txt").write_text(summarise_profile(raw))


def summarise_profile(raw: Path) -> str:
    """py-spy's raw stacks as two tables: inclusive share per function, and the innermost
    function of ours (services/) each sample was in."""
    inclusive: dict[str, int] = {}
    ours: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        total += samples
        frames = [frame.split(" (")[0] for frame in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + samples
        mine = [f for f in stack.split(";") if "services/" in f]
        key = mine[-1].split(" (")[0] if mine else "(gRPC, asyncio, pymilvus: not ours)"
        ours[key] = ours.get(key, 0) + samples
    lines = [f"{total} samples of the threads holding the GIL", "", "innermost function of ours:"]
    lines += [
        f"{100 * n / total:5.1f}%  {k}" for k, n in sorted(ours.items(), key=lambda x: -x[1])[:25]
    ]
    lines += ["", "inclusive:"]
    lines += [
        f"{100 * n / total:5.1f}%  {k}"
        for k, n in sorted(inclusive.items(), key=lambda x: -x[1])[:40]
    ]
    return "\n".join(lines) + "\n"


def augment(stack: Stack, items: int) -> float:
    """The DBA batch job over the catalogue, through the gateway: items per second."""

    async def run() -> float:
        channel = open_channel(stack.address("gateway"), stack.tls(), options=OPTIONS)
        reply = await gateway_pb2_grpc.GatewayStub(channel).AugmentCatalog(
            gateway_pb2.AugmentCatalogRequest(catalog="default"),
            timeout=24 * 3600,
            metadata=stack.auth(),
        )
        await channel.close()
        return reply.items / reply.seconds

    print(f"DBA batch job over {items:,} items...", file=sys.stderr, flush=True)
    return asyncio.run(run())


def save(path: Path, point: Point) -> None:
    results = json.loads(path.read_text()) if path.is_file() else []
    results = [
        r
        for r in results
        if (r["config"], r["backend"], r["items"]) != (point.config, point.backend, point.items)
    ]
    results.append(asdict(point))
    path.write_text(json.dumps(results, indent=1))


HEADER = (
    "| config | backend | items | ingest items/s | item query p50/p95/p99 ms (c=1) | QPS c=16 "
    "| image query p50/p95/p99 ms (c=1) | QPS c=16 | recall@10 corel / synthetic "
    "| disk B/item | retrieval + milvus B/item (anon) | restart s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def row(p: Point) -> str:
    def lat(kind: str) -> str:
        s = p.search[f"{kind}_c1"]
        return f"{s['p50_ms']:.0f} / {s['p95_ms']:.0f} / {s['p99_ms']:.0f}"

    store = sum(
        m["anon_per_item"]
        for name, m in p.memory.items()
        if name in ("retrieval", "milvus-lite", "milvus-server")
    )
    return (
        f"| {p.config} | {p.backend} | {p.items:,} | {p.ingest_items_per_s:.0f} | {lat('item')} "
        f"| {p.search['item_c16']['qps']:.0f} | {lat('image')} "
        f"| {p.search['image_c16']['qps']:.0f} "
        f"| {p.recall['corel']:.3f} / {p.recall['synthetic']:.3f} | {p.disk_bytes_per_item:,.0f} "
        f"| {store:,.0f} | {p.restart_seconds:.0f} |"
    )


def plot(results: list[dict[str, Any]], target: Path) -> None:
    """Four PNGs: ingest rate, search latency, candidate recall, bytes per item, against
    catalogue size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target.mkdir(parents=True, exist_ok=True)
    series: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        series.setdefault(f"{r['config']}, {r['backend']}", []).append(r)
    for points in series.values():
        points.sort(key=lambda r: r["items"])

    def chart(name: str, ylabel: str, curves: list[tuple[str, Callable[[dict], float]]]) -> None:
        figure, axes = plt.subplots(figsize=(7, 4.2))
        # One colour per configuration and backend, one line style per measure.
        for colour, (label, points) in enumerate(series.items()):
            for style, (suffix, value) in zip(("-", "--", ":"), curves, strict=False):
                axes.plot(
                    [r["items"] for r in points],
                    [value(r) for r in points],
                    marker="o",
                    color=f"C{colour}",
                    linestyle=style,
                    label=f"{label}{suffix}",
                )
        axes.set_xscale("log")
        axes.set_xlabel("items in the catalogue")
        axes.set_ylabel(ylabel)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(target / name, dpi=110)
        plt.close(figure)

    chart("scale-ingest.png", "items/s (retrieval Upsert, 32 in flight)", [
        ("", lambda r: r["ingest_items_per_s"]),
    ])  # fmt: skip
    chart("scale-latency.png", "ms, one query at a time", [
        (": item p50", lambda r: r["search"]["item_c1"]["p50_ms"]),
        (": image p50", lambda r: r["search"]["image_c1"]["p50_ms"]),
        (": item p95", lambda r: r["search"]["item_c1"]["p95_ms"]),
    ])  # fmt: skip
    chart("scale-recall.png", "candidate recall@10 (K' = 100)", [
        (": Corel vectors", lambda r: r["recall"]["corel"]),
        (": synthetic", lambda r: r["recall"]["synthetic"]),
    ])  # fmt: skip
    chart("scale-bytes.png", "bytes per item", [
        (": disk", lambda r: r["disk_bytes_per_item"]),
        (": retrieval + Milvus memory", lambda r: sum(
            m["anon_per_item"] for n, m in r["memory"].items()
            if n in ("retrieval", "milvus-lite", "milvus-server")
        )),
    ])  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="where the stacks and results.json go")
    parser.add_argument(
        "--sizes", default="10000,100000,1000000", type=lambda t: [int(v) for v in t.split(",")]
    )
    parser.add_argument("--configs", default="binary,float")
    parser.add_argument("--milvus-server", action="store_true", help="a real Milvus server")
    parser.add_argument("--window", type=int, default=5000, help="items timed per size")
    parser.add_argument("--exhaustive-prefill-max", type=int, default=100_000)
    parser.add_argument(
        "--augment-max",
        type=int,
        default=100_000,
        help="time the DBA batch job at sizes up to this (0: never)",
    )
    parser.add_argument("--queries", type=int, default=200, help="per kind and concurrency")
    parser.add_argument("--recall-queries", type=int, default=100, help="per kind")
    parser.add_argument("--corel", type=Path, default=COREL)
    parser.add_argument(
        "--profile", type=Path, help="py-spy profiles of retrieval's ingest and search here"
    )
    parser.add_argument("--plot", type=Path, action="append", default=[], help="results dirs")
    parser.add_argument("--plots-to", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    if args.plot:
        results = []
        for directory in args.plot:
            results += json.loads((directory / "results.json").read_text())
        plot(results, args.plots_to)
        print(HEADER)
        for r in sorted(results, key=lambda r: (r["backend"], r["config"], r["items"])):
            print(row(Point(**r)))
        return 0
    if args.out is None:
        parser.error("--out is required (or --plot)")
    if min(args.sizes) <= args.window + 1000:
        parser.error("every size must exceed --window + the 1000 Corel items")
    args.out.mkdir(parents=True, exist_ok=True)
    paths, real = synthetic.corel_vectors(args.corel, args.out / "corel_vectors.npy")
    print(HEADER, flush=True)
    for config in args.configs.split(","):
        run_config(args, config, real, paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
