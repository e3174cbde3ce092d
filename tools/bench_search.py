"""Search latency through a running stack, with the candidate-fetch baseline beside it.

    loupe up && loupe index DIR
    python tools/bench_search.py DIR [--queries 200] [--top-k 10,100]

One query at a time: image queries through the gateway once (decode, embed, search); then for
each top_k, searches by item id (no embedding: retrieval and ranking only), the same again
from the result cache, and the retrieval step alone fetching the gateway's K' candidates
without and with their full-precision vectors (what ranking re-scores with). Prints medians
and p95 in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from loupe.v1 import gateway_pb2, gateway_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc
from services.cli.client import gateway_address

OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


def timed(method: Callable[[Any], object], requests: list[Any]) -> tuple[float, float]:
    """Median and p95 milliseconds of `method(request)`, one request at a time."""
    times = []
    for request in requests:
        started = time.perf_counter()
        method(request)
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.95))]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("images", type=Path, help="the indexed folder (item id = relative path)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--top-k", default="10,100")
    parser.add_argument("--gateway")
    parser.add_argument("--retrieval", default="127.0.0.1:50054")
    parser.add_argument(
        "--min-candidates", type=int, default=100, help="LOUPE_GATEWAY_MIN_CANDIDATES"
    )
    args = parser.parse_args()

    files = sorted(p for p in args.images.rglob("*") if p.is_file())
    step = max(1, len(files) // args.queries)
    queries = [(p.read_bytes(), p.relative_to(args.images).as_posix()) for p in files[::step]][
        : args.queries
    ]
    gateway = gateway_pb2_grpc.GatewayStub(
        grpc.insecure_channel(gateway_address(args.gateway), options=OPTIONS)
    )
    retrieval = retrieval_pb2_grpc.RetrievalServiceStub(
        grpc.insecure_channel(args.retrieval, options=OPTIONS)
    )
    stats = retrieval.Stats(retrieval_pb2.StatsRequest())
    vectors = [
        retrieval.Lookup(retrieval_pb2.LookupRequest(item_id=item_id, include_vectors=True))
        .items[0]
        .objects[0]
        .vector
        for _, item_id in queries
    ]
    print(
        f"{len(queries)} queries, one at a time; {stats.rows} rows, {stats.index_type} index "
        f"(exact scores: {stats.exact_scores})",
        file=sys.stderr,
    )
    print(f"{'top_k':>5}  {'step':<44}{'median ms':>10}{'p95 ms':>9}")
    top_ks = [int(k) for k in args.top_k.split(",")]
    first = [gateway_pb2.SearchRequest(image=d, top_k=top_ks[0]) for d, _ in queries]
    median, p95 = timed(gateway.Search, first)
    print(f"{top_ks[0]:>5}  {'gateway Search, image query (embeds)':<44}{median:>10.1f}{p95:>9.1f}")
    for top_k in top_ks:
        limit = max(args.min_candidates, 2 * top_k)
        by_item = [gateway_pb2.SearchRequest(item_id=i, top_k=top_k) for _, i in queries]
        fetches = [retrieval_pb2.RetrievalSearchRequest(query=v, limit=limit) for v in vectors]
        with_vectors = [
            retrieval_pb2.RetrievalSearchRequest(query=v, limit=limit, include_vectors=True)
            for v in vectors
        ]
        rows: list[tuple[str, Callable[[Any], object], list[Any]]] = [
            ("gateway Search, item query", gateway.Search, by_item),
            ("gateway Search, same again (result cache)", gateway.Search, by_item),
            (f"retrieval Search, {limit} candidates", retrieval.Search, fetches),
            ("  same, with vectors (what the gateway asks)", retrieval.Search, with_vectors),
        ]
        for name, method, requests in rows:
            median, p95 = timed(method, requests)
            print(f"{top_k:>5}  {name:<44}{median:>10.1f}{p95:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
