"""How long Milvus itself takes to search a catalogue's compact index, by top-k.

    .venv/bin/python tools/probe_milvus_search.py DATA_DIR_OR_URI [--catalog default]
        [--topk 100,400,1000,4000] [--queries 15]

Opens the catalogue's collection the way retrieval does (milvus-lite from a `loupe up` data
directory's milvus.db, or a Milvus server by URI), with the stack stopped for milvus-lite (it
holds the file), and times searches of random sign codes: the median per top-k, and the scan
cost per row at the smallest. Retrieval asks for oversampling x K' rows, so this is the floor
of a search's time in the store, without gRPC, re-scoring or ranking around it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from pymilvus import MilvusClient

from services.retrieval.layout import CatalogLayout


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("target", help="a loupe data directory (milvus-lite) or a Milvus URI")
    parser.add_argument("--catalog", default="default")
    parser.add_argument("--prefix", default="loupe", help="LOUPE_MILVUS_COLLECTION_PREFIX")
    parser.add_argument("--topk", default="100,400,1000,4000")
    parser.add_argument("--queries", type=int, default=15)
    args = parser.parse_args()
    target = Path(args.target)
    uri = str(target / "milvus.db") if target.is_dir() else args.target
    client = MilvusClient(uri)
    name = f"{args.prefix}__{args.catalog}"
    if name not in client.list_collections():
        print(f"no collection {name} in {uri}", file=sys.stderr)
        return 1
    started = time.perf_counter()
    client.load_collection(name, timeout=3600)
    print(f"loaded {name} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    description = client.describe_collection(name)
    layout = CatalogLayout.from_description(str(description.get("description", "")))
    if layout is None or not layout.binary:
        print(f"{name} has no sign-code index to probe", file=sys.stderr)
        return 1
    rows = int(client.get_collection_stats(name)["row_count"])
    index = client.describe_index(name, "code") or {}
    print(f"{rows:,} rows, index {index.get('index_type')}, code {layout.code}, {layout.dim}-d")
    rng = np.random.default_rng(0)
    print("| top-k | median ms | min ms |")
    print("|---|---|---|")
    smallest = None
    for topk in [int(k) for k in args.topk.split(",")]:
        times = []
        for _ in range(args.queries):
            query = rng.integers(0, 256, size=layout.code_bytes, dtype=np.uint8).tobytes()
            started = time.perf_counter()
            client.search(
                name,
                data=[query],
                anns_field="code",
                limit=topk,
                output_fields=["item_id"],
                search_params={"metric_type": "HAMMING"},
            )
            times.append(1000 * (time.perf_counter() - started))
        median = statistics.median(times)
        smallest = median if smallest is None else smallest
        print(f"| {topk} | {median:.1f} | {min(times):.1f} |")
    if smallest is not None and rows:
        print(f"scan at the smallest top-k: {1e6 * smallest / rows:.0f} ns per row")
    return 0


if __name__ == "__main__":
    sys.exit(main())
