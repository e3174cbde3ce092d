"""INT8 embedder: ONNX Runtime static quantization, calibrated on the user's own images.

    python models/build_models.py --int8-calibration DIR [--calibration-images 300]

reads an fp32 embedder of the repository (default `embedder`), runs the calibration images
through the embedding service's own preprocessing (services/embedding/preprocess.py, driven by
that model's config.pbtxt), and writes `<source>_int8/{config.pbtxt,1/model.onnx}`: the same
interface and preprocessing, a distinct model name (so cached vectors of the two never mix).
Users switch with LOUPE_EMBEDDING_MODEL=embedder_int8; the vectors stay comparable enough to
search an fp32 catalogue, but re-indexing with the model that answers queries is the rule.

Only the model tool imports this module (onnxruntime.quantization needs onnx).
"""

from __future__ import annotations

import random
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from onnx_export import ExportError, config_text, write_model
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

if TYPE_CHECKING:
    from services.common.inference import ModelSpec
    from services.embedding.preprocess import StretchPreprocessing

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_CALIBRATION_IMAGES = 300
CALIBRATION_BATCH = 8
FORMAT_TYPES = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class QuantOptions:
    quant_format: str = "qdq"
    per_channel: bool = True
    reduce_range: bool = False
    method: str = "minmax"
    pre_process: bool = True
    # Node names left in float (e.g. the first conv); empty: quantize everything ORT can.
    exclude: tuple[str, ...] = ()

    def describe(self) -> str:
        parts = [self.quant_format.upper(), "per-channel" if self.per_channel else "per-tensor"]
        parts += ["s8 weights", "u8 activations", self.method]
        if self.reduce_range:
            parts.append("reduce_range")
        if self.exclude:
            parts.append(f"{len(self.exclude)} nodes in float")
        return ", ".join(parts)


def find_images(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise ExportError(f"--int8-calibration {directory}: not a directory")
    return sorted(
        p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def choose(paths: Sequence[Path], count: int, seed: int = 0) -> list[Path]:
    """`count` of the paths, spread over the whole set (seeded, so builds repeat)."""
    if len(paths) <= count:
        return list(paths)
    return sorted(random.Random(seed).sample(list(paths), count))


def service_preprocessing(repository: Path, model: str) -> tuple[ModelSpec, StretchPreprocessing]:
    """The embedding service's ModelSpec and preprocessing for `model`."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from services.common.inference import load_model_spec
    from services.embedding.preprocess import StretchPreprocessing

    spec = load_model_spec(repository, model)
    return spec, StretchPreprocessing.from_spec(spec)


def preprocessed(paths: Sequence[Path], preprocess: StretchPreprocessing) -> Iterator[np.ndarray]:
    """[3, H, W] per readable image, exactly as the embedding service prepares a whole image;
    unreadable files are reported and skipped."""
    from services.common.images import DEFAULT_MAX_PIXELS, InvalidImage
    from services.embedding.preprocess import prepare_batch

    for path in paths:
        try:
            _, tensors = prepare_batch(
                path.read_bytes(),
                whole_image=True,
                regions=[],
                preprocess=preprocess,
                max_pixels=DEFAULT_MAX_PIXELS,
            )
        except (InvalidImage, OSError) as error:
            print(f"[build_models] int8: skipping {path}: {error}", file=sys.stderr)
            continue
        yield tensors[0]


class ImageReader(CalibrationDataReader):  # type: ignore[misc]
    """Feeds preprocessed images to the calibrator, `batch` at a time."""

    def __init__(self, input_name: str, images: Iterator[np.ndarray], batch: int) -> None:
        self.input_name = input_name
        self.images = images
        self.batch = batch
        self.count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        chunk = [image for _, image in zip(range(self.batch), self.images, strict=False)]
        if not chunk:
            return None
        self.count += len(chunk)
        return {self.input_name: np.stack(chunk)}


def quantize_file(
    source: Path,
    target: Path,
    input_name: str,
    images: Iterator[np.ndarray],
    options: QuantOptions,
) -> int:
    """Quantize `source` into `target`; returns how many calibration images were used."""
    # ORT's histogram calibrators stack every batch of a tensor: they need equal batch sizes.
    batch = CALIBRATION_BATCH if options.method == "minmax" else 1
    reader = ImageReader(input_name, images, batch)
    with tempfile.TemporaryDirectory() as scratch:
        model_in = source
        if options.pre_process:
            # Symbolic shape inference and ORT's basic graph fusions (Conv+BN etc.) first, as
            # ONNX Runtime's quantization guide recommends.
            model_in = Path(scratch) / "preprocessed.onnx"
            quant_pre_process(str(source), str(model_in), skip_symbolic_shape=False)
        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[options.method]
        quantize_static(
            str(model_in),
            str(target),
            reader,
            quant_format=FORMAT_TYPES[options.quant_format],
            per_channel=options.per_channel,
            reduce_range=options.reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=method,
            nodes_to_exclude=list(options.exclude),
            extra_options={"CalibTensorRangeSymmetric": False},
        )
    used = reader.count
    if used == 0:
        raise ExportError("no calibration image could be read")
    return used


def build_int8(
    repository: Path,
    calibration_dir: Path,
    *,
    source: str = "embedder",
    name: str | None = None,
    count: int = DEFAULT_CALIBRATION_IMAGES,
    options: QuantOptions | None = None,
    target: str | None = None,
) -> Path:
    """Write `<name or source_int8>` into the repository; returns its model file."""
    options = options or QuantOptions()
    name = name or f"{source}_int8"
    spec, preprocess = service_preprocessing(repository, source)
    paths = choose(find_images(calibration_dir), count)
    if not paths:
        raise ExportError(f"--int8-calibration {calibration_dir}: no images found")
    print(
        f"[build_models] int8: calibrating {source} on {len(paths)} images from {calibration_dir} "
        f"({options.describe()})",
        flush=True,
    )
    input_name = spec.inputs[0].name
    with tempfile.TemporaryDirectory() as scratch:
        quantized_path = Path(scratch) / "model.onnx"
        used = quantize_file(
            spec.path,
            quantized_path,
            input_name,
            preprocessed(paths, preprocess),
            options,
        )
        quantized = quantized_path.read_bytes()
    # The source's parameters, preprocessing first in the usual order (protobuf maps have none).
    first = ("loupe.color_order", "loupe.resize", "loupe.scale", "loupe.mean", "loupe.std")
    parameters = {k: spec.parameters[k] for k in first if k in spec.parameters}
    parameters |= {k: v for k, v in sorted(spec.parameters.items()) if k not in parameters}
    parameters["loupe.quantization"] = f"int8 static ({options.describe()}; {used} images)"
    parameters["loupe.source"] = f"{spec.name}/{spec.version}"
    config = config_text(
        name,
        comment=(
            f"INT8 (ONNX Runtime static quantization) of the {source} model, calibrated on\n"
            f"{used} user images. Built by models/build_models.py --int8-calibration DIR."
        ),
        input_size=spec.inputs[0].dims[-1],
        output_dim=spec.outputs[0].dims[-1],
        parameters=parameters,
        max_batch_size=spec.max_batch_size,
        target=target,
    )
    return write_model(repository, name, quantized, config)
