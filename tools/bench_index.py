"""Indexing throughput: `loupe index` beside raw ONNX Runtime embedding of the same files.

    .venv/bin/python tools/bench_index.py [--images DIR] [--rounds 3] [--detect]

The baseline is the model alone, as fast as this machine runs it: every file decoded and
prepared exactly as the embedding service prepares it (services/embedding/preprocess.py),
then the embedder on ONNX Runtime in batches of the service's micro-batch size, its intra-op
threads sized like the service's (the cores this process may use), one process, no gRPC, no
storage. With --detect, the detector runs on every file too, as `loupe index --detect` does.

Against it, `loupe index DIR` on a fresh stack (`loupe up` on loopback ports, a new data
directory each round, so nothing comes from a cache): every file read, sent to the gateway,
hashed, embedded by the embedding service, checked for duplicates and augmented against what
is stored, and written to milvus-lite. Rounds alternate between the two; the table reports
the median of each and their ratio (the target: `loupe index` >= 0.7 x the baseline).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from services.cli import local_tls
from services.cli.stack import local_api_key
from services.common.cpu import available_cores, limit_blas_threads
from services.common.images import DEFAULT_MAX_PIXELS
from services.common.inference import (
    DEFAULT_BATCH_MAX_SIZE,
    REPOSITORY_IN_CHECKOUT,
    load_model_spec,
)
from services.embedding.preprocess import StretchPreprocessing, prepare_batch

ROOT = Path(__file__).resolve().parents[1]
LOUPE = str(Path(sys.executable).parent / "loupe")
COREL = ROOT.parent / "shared" / "data" / "corel1k" / "images"
SERVICES = ("gateway", "detection", "embedding", "retrieval", "ranking")


def raw_embedding(files: list[Path], detect: bool) -> float:
    """Images per second: decode, prepare and embed (and detect) in this process."""
    import onnxruntime as ort

    limit_blas_threads(1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = available_cores()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    spec = load_model_spec(REPOSITORY_IN_CHECKOUT, "embedder")
    session = ort.InferenceSession(str(spec.path), options, providers=["CPUExecutionProvider"])
    preprocess = StretchPreprocessing.from_spec(spec)
    detect_one = raw_detector(options) if detect else None
    started = time.perf_counter()
    pending: list[np.ndarray] = []
    for path in files:
        data = path.read_bytes()
        if detect_one is not None:
            detect_one(data)
        _, tensors = prepare_batch(
            data, whole_image=True, regions=[], preprocess=preprocess, max_pixels=DEFAULT_MAX_PIXELS
        )
        pending.append(tensors[0])
        if len(pending) == DEFAULT_BATCH_MAX_SIZE:
            session.run(None, {spec.inputs[0].name: np.stack(pending)})
            pending.clear()
    if pending:
        session.run(None, {spec.inputs[0].name: np.stack(pending)})
    return len(files) / (time.perf_counter() - started)


def raw_detector(options: object) -> Callable[[bytes], object]:
    """The detection service's own preparation and decoding around the detector, in process."""
    import onnxruntime as ort

    from services.detection.service import DetectionService
    from services.detection.settings import DetectionSettings

    service = DetectionService(DetectionSettings.from_env())
    session = ort.InferenceSession(
        str(service.spec.path), options, providers=["CPUExecutionProvider"]
    )
    settings = service.settings

    def detect(data: bytes) -> object:
        _, view, letterboxed = service._prepare(data)
        (output,) = session.run(None, {service.spec.inputs[0].name: letterboxed.tensor})
        return service.decoder(
            output,
            ratio=letterboxed.ratio,
            image_width=view.width,
            image_height=view.height,
            score_threshold=settings.score_threshold,
            iou_threshold=settings.nms_iou,
            max_detections=settings.max_detections,
        )

    return detect


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def loupe_index(images: Path, detect: bool) -> float:
    """Files per second of `loupe index` on a fresh stack (start-up not counted)."""
    data_dir = Path(tempfile.mkdtemp(prefix="bench-index-"))
    ports = free_ports(2 * len(SERVICES) + 1)
    env = dict(os.environ)
    for i, name in enumerate(SERVICES):
        env[f"LOUPE_{name.upper()}_PORT"] = str(ports[i])
        env[f"LOUPE_{name.upper()}_METRICS_PORT"] = str(ports[len(SERVICES) + i])
    env["LOUPE_REDIS_PORT"] = str(ports[-1])
    env["LOUPE_GATEWAY"] = f"127.0.0.1:{ports[0]}"
    # The automatic batch DBA runs after a load, not during it: keep it out of the timing.
    env["LOUPE_DBA_REFRESH_SECONDS"] = "0"
    try:
        subprocess.run(
            [LOUPE, "up", "--data-dir", str(data_dir)], env=env, check=True, capture_output=True
        )
        # The stack's own admin key, for `loupe index` against a gateway on a port of its own.
        env["LOUPE_API_KEY"] = local_api_key(data_dir)
        # And its CA (the gateway serves TLS), for the same reason.
        if local_tls.ca_path(data_dir).is_file():
            env["LOUPE_TLS_CA"] = str(local_tls.ca_path(data_dir))
        command = [LOUPE, "index", str(images), "--quiet", *(["--detect"] if detect else [])]
        result = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        match = re.search(r"\(([\d.]+) files/s\)", result.stderr)
        if match is None:
            raise SystemExit(f"no rate in loupe index's output:\n{result.stderr[-2000:]}")
        return float(match.group(1))
    finally:
        subprocess.run(
            [LOUPE, "down", "--data-dir", str(data_dir)], env=env, check=False, capture_output=True
        )
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, default=COREL)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--detect", action="store_true")
    args = parser.parse_args()
    files = sorted(p for p in args.images.rglob("*") if p.is_file())
    if not files:
        raise SystemExit(f"{args.images}: no files")
    raw, index = [], []
    for round_ in range(1, args.rounds + 1):
        raw.append(raw_embedding(files, args.detect))
        print(f"round {round_}: raw ONNX Runtime {raw[-1]:.1f} images/s", file=sys.stderr)
        index.append(loupe_index(args.images, args.detect))
        print(f"round {round_}: loupe index {index[-1]:.1f} files/s", file=sys.stderr)
    what = "detect + embed" if args.detect else "embed"
    print(f"{len(files)} files from {args.images}, {available_cores()} cores, {what}:")
    print("| | images/s (median of rounds) | rounds |")
    print("|---|---|---|")
    for name, rates in (("raw ONNX Runtime", raw), ("loupe index", index)):
        listed = ", ".join(f"{r:.1f}" for r in rates)
        print(f"| {name} | {statistics.median(rates):.1f} | {listed} |")
    print(f"ratio: {statistics.median(index) / statistics.median(raw):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
