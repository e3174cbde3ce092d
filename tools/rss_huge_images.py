"""Memory a model service keeps after huge images: its RSS before and after each.

    python tools/rss_huge_images.py [--service detection|embedding] [--megapixels 49]
                                    [--formats PNG,JPEG,WEBP,TIFF,GIF] [--repeat 2]

Starts the service as its own process on loopback (as `loupe up` does), warms it up with a
small image, then sends each format's image (a gradient with noise: cheap to encode, the
full size to decode) and prints one JSON line per request with the process's resident memory
(VmRSS) before and after, in MiB, and a last line with the baseline and the worst growth.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from loupe.v1 import detection_pb2, detection_pb2_grpc, embedding_pb2, embedding_pb2_grpc
from services.common.channels import open_blocking_channel
from services.common.config import DEFAULT_PORTS

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
# Big enough for the largest image the services accept (LOUPE_MAX_IMAGE_PIXELS).
MESSAGE_BYTES = 64 << 20


def rss_mib(pid: int) -> float:
    """Resident memory of the process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def huge_image(megapixels: float, image_format: str) -> bytes:
    """A 4:3 image of about `megapixels`, encoded small: a gradient with a little noise."""
    width = int(math.sqrt(megapixels * 1e6 * 4 / 3))
    height = width * 3 // 4
    ramp = np.linspace(0, 255, width, dtype=np.float32)
    row = np.stack([ramp, ramp[::-1], np.full(width, 128, np.float32)], axis=-1)
    pixels = np.broadcast_to(row.astype(np.uint8), (height, width, 3)).copy()
    # Noise in a few rows only: real pixels to decode, and the file stays small.
    noise = np.random.default_rng(0).integers(0, 255, (16, width, 3), dtype=np.uint8)
    pixels[: len(noise)] = noise
    image = Image.fromarray(pixels)
    if image_format == "GIF":
        image = image.convert("P")
    buffer = io.BytesIO()
    options: dict[str, Any] = {"TIFF": {"compression": "tiff_deflate"}, "WEBP": {"quality": 80}}
    image.save(buffer, image_format, **options.get(image_format, {}))
    return buffer.getvalue()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_service(
    service: str, env: dict[str, str] | None = None, log: Path | None = None
) -> Iterator[tuple[int, str]]:
    """(pid, address) of `python -m services.SERVICE` on free loopback ports, until SIGTERM;
    its stdout and stderr go to `log` (as `loupe up` does), else nowhere."""
    port, metrics_port = free_port(), free_port()
    prefix = f"LOUPE_{service.upper()}"
    child_env = {
        **os.environ,
        f"{prefix}_PORT": str(port),
        f"{prefix}_METRICS_PORT": str(metrics_port),
        **(env or {}),
    }
    assert service in DEFAULT_PORTS
    with open(log or os.devnull, "ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", f"services.{service}"],
            cwd=ROOT,
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    address = f"127.0.0.1:{port}"
    try:
        with open_blocking_channel(address) as channel:
            deadline = time.monotonic() + 300
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{service} exited with {process.returncode}")
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=2
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{service} not SERVING after 300 s")
                time.sleep(0.5)
        yield process.pid, address
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def send(service: str, address: str, image: bytes) -> str:
    """The status code name of one Detect or Embed of the image."""
    options = [("grpc.max_send_message_length", MESSAGE_BYTES)]
    with open_blocking_channel(address, options=options) as channel:
        try:
            if service == "detection":
                detection_pb2_grpc.DetectionServiceStub(channel).Detect(
                    detection_pb2.DetectRequest(image=image), timeout=300
                )
            else:
                embedding_pb2_grpc.EmbeddingServiceStub(channel).Embed(
                    embedding_pb2.EmbedRequest(image=image, whole_image=True), timeout=300
                )
        except grpc.RpcError as error:
            return str(error.code().name)
    return "OK"


def measure(
    service: str, megapixels: float, formats: list[str], repeat: int
) -> Iterator[dict[str, Any]]:
    """One record per request, then a summary: baseline and worst growth in MiB."""
    images = {f: huge_image(megapixels, f) for f in formats}
    small = huge_image(0.3, "JPEG")
    env = {"LOUPE_MAX_MESSAGE_BYTES": str(MESSAGE_BYTES)}
    with running_service(service, env) as (pid, address):
        for _ in range(3):
            send(service, address, small)
        baseline = rss_mib(pid)
        worst = 0.0
        for _ in range(repeat):
            for image_format, data in images.items():
                before = rss_mib(pid)
                code = send(service, address, data)
                # What the process keeps, not what a request in flight holds.
                time.sleep(0.5)
                after = rss_mib(pid)
                worst = max(worst, after - baseline)
                yield {
                    "service": service,
                    "format": image_format,
                    "megapixels": megapixels,
                    "bytes": len(data),
                    "code": code,
                    "rss_before_mib": round(before, 1),
                    "rss_after_mib": round(after, 1),
                }
        yield {
            "service": service,
            "baseline_mib": round(baseline, 1),
            "growth_mib": round(worst, 1),
        }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--service", choices=("detection", "embedding"), default="detection")
    parser.add_argument("--megapixels", type=float, default=49.0)
    parser.add_argument("--formats", default="PNG,JPEG,WEBP,TIFF,GIF")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    formats = [f.strip().upper() for f in args.formats.split(",") if f.strip()]
    for record in measure(args.service, args.megapixels, formats, args.repeat):
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
