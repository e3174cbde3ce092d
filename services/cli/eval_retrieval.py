"""Measure search quality on a labelled image set, through the gateway's public API.

The gallery is indexed into a fresh catalogue, searched, and the catalogue is dropped after
(unless --keep). A file's class is its first-level folder under the gallery (gallery/CLASS/...);
for a flat folder of numbered files give --numbered-groups N (class = number // N: Corel-1k's
and Wang's convention, N = 100; UKBench's, N = 4) or --labels CSV (path,class rows).

Without --queries, every gallery item queries the others (leave-one-out: a search by item id,
which never returns the item itself). With --queries DIR, each query image (classes from its
first-level folders) is searched by its bytes.

Reported: mAP over the returned list (top-k; relevant items not returned count as misses),
mAP@100, P@1/5/10, R@10, and median / p95 query latency as this client sees it.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import re
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tqdm import tqdm

from loupe.v1 import gateway_pb2, gateway_pb2_grpc
from services.cli.client import DEFAULT_DATA_DIR, api_key, channel, gateway_address
from services.cli.parsing import MAX_CANDIDATES, MAX_TOP_K, int_in

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
INDEX_CHUNK = 32
DEFAULT_TOP_K = 500
NUMBER = re.compile(r"\d+")


class EvalError(Exception):
    """Something the user must fix; the message says what."""


@dataclass(frozen=True)
class Labelled:
    path: Path
    key: str  # the path relative to its set: the item id in the catalogue
    label: str


@dataclass
class Metrics:
    queries: int = 0
    skipped_queries: int = 0
    map: float = 0.0
    map_at_100: float = 0.0
    p_at_1: float = 0.0
    p_at_5: float = 0.0
    p_at_10: float = 0.0
    r_at_10: float = 0.0
    latency_ms_median: float = 0.0
    latency_ms_p95: float = 0.0
    per_query: list[float] = field(default_factory=list, repr=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gallery", required=True, type=Path, metavar="DIR")
    parser.add_argument("--queries", type=Path, metavar="DIR", help="held-out query images")
    parser.add_argument("--labels", type=Path, metavar="CSV", help="path,class rows (gallery)")
    parser.add_argument(
        "--numbered-groups",
        type=int_in(0, 1_000_000_000),
        default=0,
        metavar="N",
        help="flat folder of numbered files: class = number // N",
    )
    parser.add_argument(
        "--catalog",
        default="",
        metavar="NAME",
        help="the catalogue to create (default eval_<random>); it must not exist",
    )
    parser.add_argument(
        "--top-k",
        type=int_in(0, MAX_TOP_K),
        default=0,
        metavar="K",
        help=f"results per query (default: gallery size - 1, at most {DEFAULT_TOP_K})",
    )
    parser.add_argument(
        "--candidates",
        type=candidate_list,
        default=[0],
        metavar="K'[,K'...]",
        help="candidates from the index per query (default: the gateway's); several values "
        "query the same catalogue once per value, a row each",
    )
    parser.add_argument("--detect", action="store_true", help="index detected objects too")
    add_run_arguments(parser, "catalogue")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help=argparse.SUPPRESS)


def add_run_arguments(parser: argparse.ArgumentParser, catalogues: str) -> None:
    """The options every evaluation through the gateway takes: how its fresh `catalogues`
    are indexed and kept, where the figures go, and the gateway with its key."""
    parser.add_argument(
        "--no-augment",
        action="store_true",
        help="skip the batch database-side augmentation after indexing",
    )
    parser.add_argument("--keep", action="store_true", help=f"keep the {catalogues} afterwards")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    parser.add_argument(
        "--gateway",
        metavar="HOST:PORT",
        help="gateway address (default: LOUPE_GATEWAY, else the local stack)",
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"an admin API key: the run creates and drops the {catalogues} (default: "
        "LOUPE_API_KEY, else the local stack's own key)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(evaluate(args))
    except EvalError as error:
        print(f"loupe eval retrieval: {error}", file=sys.stderr)
        return 2


def candidate_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers such as 100,200") from None
    if any(not 0 <= v <= MAX_CANDIDATES for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: each must be 0 to {MAX_CANDIDATES}")
    return values


# ---- labelled sets ------------------------------------------------------------------------


def image_files(root: Path) -> list[Path]:
    if not root.is_dir():
        raise EvalError(f"{root}: not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise EvalError(f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def labelled_set(root: Path, labels: Path | None = None, groups: int = 0) -> list[Labelled]:
    files = image_files(root)
    by_file: dict[str, str] = {}
    if labels is not None:
        try:
            with labels.open(newline="") as handle:
                by_file = {row[0]: row[1] for row in csv.reader(handle) if len(row) >= 2}
        except OSError as error:
            raise EvalError(f"{labels}: {error.strerror or error}") from None
    result = []
    for path in files:
        key = path.relative_to(root).as_posix()
        if labels is not None:
            if key not in by_file:
                raise EvalError(f"{labels} has no class for {key}")
            label = by_file[key]
        elif groups > 0:
            numbers = NUMBER.findall(path.stem)
            if not numbers:
                raise EvalError(f"{key}: no number in the file name (--numbered-groups)")
            label = str(int(numbers[-1]) // groups)
        elif "/" in key:
            label = key.split("/", 1)[0]
        else:
            raise EvalError(
                f"{key} sits directly in {root}, so it has no class folder: put images in "
                "DIR/CLASS/..., or give --labels CSV, or --numbered-groups N for numbered "
                "files (Corel-1k: --numbered-groups 100)"
            )
        result.append(Labelled(path, key, label))
    if len({item.label for item in result}) < 2:
        raise EvalError(f"{root}: only one class found; a retrieval evaluation needs two or more")
    return result


# ---- metrics --------------------------------------------------------------------------------


def query_metrics(ranked: list[bool], relevant: int) -> dict[str, float]:
    """`ranked[i]`: whether result i is relevant; `relevant`: how many exist in the gallery."""
    hits = np.asarray(ranked, dtype=bool)
    cumulative = np.cumsum(hits)
    precision = cumulative / np.arange(1, len(hits) + 1) if len(hits) else np.zeros(0)
    top100 = hits[:100]
    return {
        "ap": float(precision[hits].sum() / relevant) if relevant else 0.0,
        "ap100": float(precision[:100][top100].sum() / min(relevant, 100)) if relevant else 0.0,
        "p1": float(hits[:1].sum()),
        "p5": float(hits[:5].sum() / 5),
        "p10": float(hits[:10].sum() / 10),
        "r10": float(hits[:10].sum() / relevant) if relevant else 0.0,
    }


def summarise(per_query: list[dict[str, float]], latencies: list[float], skipped: int) -> Metrics:
    if not per_query:
        raise EvalError("no query had a relevant item in the gallery")

    def mean(key: str) -> float:
        return float(np.mean([q[key] for q in per_query]))

    return Metrics(
        queries=len(per_query),
        skipped_queries=skipped,
        map=mean("ap"),
        map_at_100=mean("ap100"),
        p_at_1=mean("p1"),
        p_at_5=mean("p5"),
        p_at_10=mean("p10"),
        r_at_10=mean("r10"),
        latency_ms_median=float(np.median(latencies) * 1000),
        latency_ms_p95=float(np.percentile(latencies, 95) * 1000),
        per_query=[q["ap"] for q in per_query],
    )


# ---- the run ----------------------------------------------------------------------------


async def evaluate(args: argparse.Namespace) -> int:
    gallery = labelled_set(args.gallery, args.labels, args.numbered_groups)
    queries = labelled_set(args.queries) if args.queries else None
    catalog = args.catalog or f"eval_{uuid.uuid4().hex[:8]}"
    top_k = args.top_k or min(DEFAULT_TOP_K, len(gallery) - (0 if queries else 1))
    address = gateway_address(args.gateway, args.data_dir)
    key = api_key(args.api_key, address, args.data_dir)
    async with channel(address, key, data_dir=args.data_dir) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        try:
            existing = await stub.ListCatalogs(gateway_pb2.ListCatalogsRequest())
        except grpc.aio.AioRpcError as error:
            raise EvalError(
                f"gateway at {address}: {error.code().name}: {error.details()}"
            ) from None
        if any(c.name == catalog for c in existing.catalogs):
            raise EvalError(
                f"catalog {catalog!r} already exists: an evaluation needs a fresh one "
                f"(choose another --catalog, or `loupe catalogs drop {catalog}`)"
            )
        say(f"indexing {len(gallery)} images into catalog {catalog!r} at {address}")
        try:
            started = time.perf_counter()
            failed = await index_gallery(stub, catalog, gallery, args.detect)
            index_seconds = time.perf_counter() - started
            augment_seconds = 0.0
            info = await catalog_info(stub, catalog)
            if not args.no_augment and info.dba_neighbours > 0:
                say(f"augmenting the catalogue (DBA, k={info.dba_neighbours})")
                reply = await stub.AugmentCatalog(
                    gateway_pb2.AugmentCatalogRequest(catalog=catalog)
                )
                augment_seconds = reply.seconds
            indexed = {item.key for item in gallery} - failed
            runs = []
            for candidates in args.candidates:
                if len(args.candidates) > 1:
                    say(f"queries with {candidates or 'the default'} candidates")
                metrics = await run_queries(
                    stub, catalog, gallery, queries, indexed, top_k, candidates
                )
                runs.append((candidates, metrics))
        except grpc.aio.AioRpcError as error:
            raise EvalError(
                f"gateway at {address}: {error.code().name}: {error.details()}"
            ) from None
        finally:
            if not args.keep:
                try:
                    await stub.DropCatalog(gateway_pb2.DropCatalogRequest(catalog=catalog))
                except grpc.aio.AioRpcError as error:
                    say(f"could not drop catalog {catalog!r}: {error.details()}")

    report: dict[str, Any] = {
        "gallery": str(args.gallery),
        "queries": str(args.queries) if args.queries else "leave-one-out",
        "catalog": catalog,
        "kept": bool(args.keep),
        "gateway": address,
        "items": len(gallery) - len(failed),
        "index_failures": len(failed),
        "classes": len({item.label for item in gallery}),
        "top_k": top_k,
        "detect": bool(args.detect),
        "index_seconds": round(index_seconds, 2),
        "augment_seconds": round(augment_seconds, 2),
        "index": {
            "type": info.index_type,
            "code": info.candidate_code,
            "code_bytes_per_row": info.code_bytes,
            "full_vector_bytes": info.full_vector_bytes,
            "code_fraction_of_full": round(info.code_bytes / max(info.full_vector_bytes, 1), 4),
            "rows": info.rows,
            "dba_neighbours": info.dba_neighbours,
        },
        "runs": [
            {"candidates": candidates or "gateway default", "metrics": _rounded(metrics)}
            for candidates, metrics in runs
        ],
    }
    # The first run also at the top level: the figures of a single-run evaluation.
    report["candidates"] = report["runs"][0]["candidates"]
    report["metrics"] = report["runs"][0]["metrics"]
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        say(f"wrote {args.json}")
    return 0


async def catalog_info(stub: gateway_pb2_grpc.GatewayStub, catalog: str) -> gateway_pb2.Catalog:
    listed = await stub.ListCatalogs(gateway_pb2.ListCatalogsRequest())
    for info in listed.catalogs:
        if info.name == catalog:
            return info
    raise EvalError(f"catalog {catalog!r} was not created: did every image fail to index?")


async def index_gallery(
    stub: gateway_pb2_grpc.GatewayStub, catalog: str, gallery: list[Labelled], detect: bool
) -> set[str]:
    """Index every image (streamed in chunks); the keys of those that failed."""
    failed: set[str] = set()
    with tqdm(total=len(gallery), unit="img", file=sys.stderr, mininterval=0.5) as bar:
        for start in range(0, len(gallery), INDEX_CHUNK):
            chunk = gallery[start : start + INDEX_CHUNK]
            requests = []
            for item in chunk:
                try:
                    image = item.path.read_bytes()
                except OSError as error:
                    failed.add(item.key)
                    bar.write(
                        f"not indexed: {item.key}: {error.strerror or error}", file=sys.stderr
                    )
                    continue
                requests.append(
                    gateway_pb2.IndexRequest(
                        item_id=item.key, image=image, detect=detect, catalog=catalog
                    )
                )
            reply = await stub.IndexStream(iter(requests))
            for result in reply.results:
                if result.code != 0:
                    failed.add(result.item_id)
                    bar.write(f"not indexed: {result.item_id}: {result.error}", file=sys.stderr)
            bar.update(len(chunk))
    return failed


async def run_queries(
    stub: gateway_pb2_grpc.GatewayStub,
    catalog: str,
    gallery: list[Labelled],
    queries: list[Labelled] | None,
    indexed: set[str],
    top_k: int,
    candidates: int,
) -> Metrics:
    """One query at a time, so that latencies are not queueing time."""
    label_of = {item.key: item.label for item in gallery if item.key in indexed}
    class_sizes: dict[str, int] = {}
    for label in label_of.values():
        class_sizes[label] = class_sizes.get(label, 0) + 1
    held_out = queries is not None
    todo = queries if queries is not None else [g for g in gallery if g.key in indexed]
    per_query: list[dict[str, float]] = []
    latencies: list[float] = []
    skipped = 0
    bar = tqdm(todo, unit="query", file=sys.stderr, mininterval=0.5)
    for query in bar:
        relevant = class_sizes.get(query.label, 0) - (0 if held_out else 1)
        if relevant <= 0:
            skipped += 1
            continue
        request = gateway_pb2.SearchRequest(top_k=top_k, catalog=catalog, candidates=candidates)
        try:
            if held_out:
                request.image = query.path.read_bytes()
            else:
                request.item_id = query.key
            started = time.perf_counter()
            reply = await stub.Search(request)
        except (OSError, grpc.aio.AioRpcError) as error:
            # An unreadable or undecodable query image is skipped; anything else ends the run.
            if isinstance(error, grpc.aio.AioRpcError) and (
                error.code() != grpc.StatusCode.INVALID_ARGUMENT
            ):
                raise
            skipped += 1
            reason = error.details() if isinstance(error, grpc.aio.AioRpcError) else error
            bar.write(f"query skipped: {query.key}: {reason}", file=sys.stderr)
            continue
        latencies.append(time.perf_counter() - started)
        ranked = [label_of.get(hit.item_id) == query.label for hit in reply.results]
        per_query.append(query_metrics(ranked, relevant))
    return summarise(per_query, latencies, skipped)


def _rounded(metrics: Metrics) -> dict[str, float | int]:
    figures: dict[str, float | int] = {
        k: round(v, 4) for k, v in asdict(metrics).items() if isinstance(v, float)
    }
    return figures | {"queries": metrics.queries, "skipped_queries": metrics.skipped_queries}


def table(report: dict[str, Any]) -> str:
    index = report["index"]
    lines = [
        f"gallery {report['gallery']} ({report['items']} items, {report['classes']} classes), "
        f"queries: {report['queries']} ({report['metrics']['queries']})",
        f"index {index['type']} over {index['code']} codes: {index['code_bytes_per_row']} B "
        f"per row = {index['code_fraction_of_full']:.3f} of the {index['full_vector_bytes']} B "
        f"float32 vector; DBA k={index['dba_neighbours']}; top_k {report['top_k']}",
        "",
        f"{'candidates':>15} {'mAP':>7} {'mAP@100':>8} {'P@1':>7} {'P@5':>7} {'P@10':>7} "
        f"{'R@10':>7} {'p50 ms':>8} {'p95 ms':>8}",
    ]
    for run in report["runs"]:
        m = run["metrics"]
        lines.append(
            f"{run['candidates']!s:>15} {m['map']:>7.4f} {m['map_at_100']:>8.4f} "
            f"{m['p_at_1']:>7.4f} {m['p_at_5']:>7.4f} {m['p_at_10']:>7.4f} {m['r_at_10']:>7.4f} "
            f"{m['latency_ms_median']:>8.1f} {m['latency_ms_p95']:>8.1f}"
        )
    return "\n".join(lines)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
