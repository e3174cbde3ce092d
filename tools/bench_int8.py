"""CPU throughput of embedder models side by side: fp32 against its INT8 build (or any others).

    python tools/bench_int8.py [--model embedder --model embedder_int8] [--batches 1,16]
        [--rounds 5] [--seconds 2] [--threads 0]

Loads each model as the embedding service does (ONNX Runtime, CPU, all graph optimisations),
then for each round and batch size runs every model in turn (the order alternates between
rounds) for about --seconds each on the same random batch. Prints the median images/s per model
and batch size, and the median over rounds of each model's ratio to the first model's speed
measured in the same round: on a shared machine only ratios measured side by side mean much.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from services.common.inference import REPOSITORY_IN_CHECKOUT, load_model_spec


def session_for(path: Path, threads: int) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def images_per_second(session: object, feed: dict[str, np.ndarray], seconds: float) -> float:
    run = session.run  # type: ignore[attr-defined]
    run(None, feed)  # warm-up
    batch = len(next(iter(feed.values())))
    done, started = 0, time.perf_counter()
    while True:
        run(None, feed)
        done += batch
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return done / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=REPOSITORY_IN_CHECKOUT)
    parser.add_argument("--model", action="append", help="first = baseline (repeat)")
    parser.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="per model, batch and round")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ORT decides)")
    args = parser.parse_args(argv)

    names = args.model or ["embedder", "embedder_int8"]
    batches = [int(b) for b in args.batches.split(",")]
    specs = [load_model_spec(args.repository, name) for name in names]
    sessions = [session_for(spec.path, args.threads) for spec in specs]
    dims = specs[0].inputs[0].dims
    rng = np.random.default_rng(0)
    speeds: dict[tuple[int, int], list[float]] = {}
    ratios: dict[tuple[int, int], list[float]] = {}
    for round_index in range(args.rounds):
        for batch in batches:
            feed = rng.standard_normal((batch, *dims), dtype=np.float32)
            order = list(range(len(specs)))
            if round_index % 2:
                order.reverse()
            measured = {}
            for i in order:
                feed_i = {specs[i].inputs[0].name: feed}
                measured[i] = images_per_second(sessions[i], feed_i, args.seconds)
                speeds.setdefault((i, batch), []).append(measured[i])
            for i in range(len(specs)):
                ratios.setdefault((i, batch), []).append(measured[i] / measured[0])
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    print(f"threads={args.threads or 'auto'} rounds={args.rounds} seconds={args.seconds}")
    print(f"{'model':<28} {'batch':>5} {'img/s (median)':>15} {'min':>8} {'max':>8} {'ratio':>6}")
    for batch in batches:
        for i, spec in enumerate(specs):
            values = speeds[(i, batch)]
            print(
                f"{spec.name:<28} {batch:>5} {statistics.median(values):>15.1f} "
                f"{min(values):>8.1f} {max(values):>8.1f} "
                f"{statistics.median(ratios[(i, batch)]):>6.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
