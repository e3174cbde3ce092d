"""Preparing large photos for the models: full decode (baseline) against decoder shrinking.

    python tools/bench_decode.py [--megapixels 12] [--repeat 15]

Makes a camera-size JPEG from a Corel image (or a generated one when ../shared is absent),
then times, in the same run, each model's input preparation both ways and prints medians and
the ratio. Only the preparation is timed: model inference is the same either way.
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from services.common.images import EncodedImage, PixelBox, decode_image
from services.common.inference import REPOSITORY_IN_CHECKOUT, load_model_spec
from services.detection.preprocess import LetterboxPreprocessing
from services.embedding.preprocess import StretchPreprocessing, prepare_batch

SAMPLE = REPOSITORY_IN_CHECKOUT.parent.parent / "shared" / "data" / "corel1k" / "images" / "450.jpg"


def camera_jpeg(megapixels: float) -> bytes:
    width = int(math.sqrt(megapixels * 1e6 * 4 / 3))
    height = width * 3 // 4
    if SAMPLE.is_file():
        base = decode_image(SAMPLE.read_bytes()).resize((width, height), Image.Resampling.BICUBIC)
    else:
        gradient = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
        base = Image.fromarray(np.broadcast_to(gradient, (height, width, 3)).astype(np.uint8))
    # Sensor-like noise, so the JPEG has the size and entropy of a real photo.
    noisy = np.asarray(base, np.int16) + np.random.default_rng(0).integers(
        -10, 10, (height, width, 3)
    )
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def median_ms(work: Callable[[], object], repeat: int) -> float:
    work()  # warm-up
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--megapixels", type=float, default=12.0)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()

    data = camera_jpeg(args.megapixels)
    embedder = StretchPreprocessing.from_spec(load_model_spec(REPOSITORY_IN_CHECKOUT, "embedder"))
    detector = LetterboxPreprocessing.from_spec(load_model_spec(REPOSITORY_IN_CHECKOUT, "detector"))
    width, height = EncodedImage(data).size
    region = PixelBox(width * 0.3, height * 0.3, width * 0.7, height * 0.7)
    print(
        f"{width}x{height} JPEG, {len(data) / 1e6:.1f} MB; median of {args.repeat} runs",
        file=sys.stderr,
    )

    def embed_full() -> None:
        image = decode_image(data)
        crop = image.crop((int(region.x0), int(region.y0), int(region.x1), int(region.y1)))
        np.stack([embedder(image), embedder(crop)])

    def embed_reduced() -> None:
        prepare_batch(
            data, whole_image=True, regions=[region], preprocess=embedder, max_pixels=10**9
        )

    def detect_full() -> None:
        detector(decode_image(data))

    def detect_reduced() -> None:
        ratio = min(detector.input_height / height, detector.input_width / width)
        encoded = EncodedImage(data)
        detector(encoded.decode(at_least=(math.ceil(width * ratio), math.ceil(height * ratio))))

    print(f"{'preparation':<34}{'full decode':>14}{'shrinking':>12}{'speed-up':>10}")
    for name, full, reduced in (
        ("embedding (whole + one region)", embed_full, embed_reduced),
        ("detection (letterbox 416)", detect_full, detect_reduced),
    ):
        a, b = median_ms(full, args.repeat), median_ms(reduced, args.repeat)
        print(f"{name:<34}{a:>11.1f} ms{b:>9.1f} ms{a / b:>9.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
