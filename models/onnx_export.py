"""Shared by the model tool's extra builds: export an image embedder to ONNX with a dynamic batch
axis, check it against torch, and write it with its config.pbtxt into the model repository.

Every model written here has the embedder's interface: input `images` [N, 3, S, S] float32,
output `embeddings` [N, D] float32, and `loupe.*` parameters telling the embedding service how
to prepare pixels (services/embedding/preprocess.py). Only the model tool imports this module.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from build_models import write_atomically
from torch import nn

INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
VERSION = "1"
OPSET = 17
MAX_BATCH_SIZE = 64

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ExportError(RuntimeError):
    """A build step failed; the message says what to change."""


@dataclass(frozen=True)
class Preprocessing:
    """What the embedding service must do to pixels before the model (config.pbtxt `loupe.*`).

    The service resizes by stretching to the input size (the only `loupe.resize` it supports),
    then computes (pixels * scale - mean) / std in RGB order."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    color_order: str = "RGB"
    resize: str = "stretch"
    scale: str = "0.00392156862745098"

    def parameters(self) -> dict[str, str]:
        return {
            "loupe.color_order": self.color_order,
            "loupe.resize": self.resize,
            "loupe.scale": self.scale,
            "loupe.mean": ",".join(repr(float(v)) for v in self.mean),
            "loupe.std": ",".join(repr(float(v)) for v in self.std),
        }


def config_text(
    name: str,
    *,
    comment: str,
    input_size: int,
    output_dim: int,
    parameters: Mapping[str, str],
    max_batch_size: int = MAX_BATCH_SIZE,
    target: str | None = None,
) -> str:
    """config.pbtxt for an embedder: Triton serves it as is; Loupe's in-process backend reads
    the same file. `loupe.*` parameters are written in the order given. `target`: the
    hardware of build_models.py --target, whose instance_group / dynamic_batching the
    default models get (models/model_configs.py); None: dynamic batching alone."""
    serving = ["dynamic_batching {", "  max_queue_delay_microseconds: 2000", "}"]
    if target is not None:
        from model_configs import Tensor, serving_lines

        shape = (3, input_size, input_size)
        serving = serving_lines(target, max_batch_size, Tensor(INPUT_NAME, shape))
    lines = [f"# {line}".rstrip() for line in comment.strip().splitlines()]
    lines += [
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        "  {",
        f'    name: "{INPUT_NAME}"',
        "    data_type: TYPE_FP32",
        f"    dims: [ 3, {input_size}, {input_size} ]",
        "  }",
        "]",
        "output [",
        "  {",
        f'    name: "{OUTPUT_NAME}"',
        "    data_type: TYPE_FP32",
        f"    dims: [ {output_dim} ]",
        "  }",
        "]",
        *serving,
        "# How callers must prepare pixels, and what this model is (Triton ignores parameters it",
        "# does not know).",
    ]
    for key, value in parameters.items():
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'parameters {{ key: "{key}" value {{ string_value: "{escaped}" }} }}')
    return "\n".join(lines) + "\n"


def write_model(repository: Path, name: str, onnx_bytes: bytes, config: str) -> Path:
    """`<repository>/<name>/1/model.onnx` and `<repository>/<name>/config.pbtxt`; returns the
    model file's path."""
    model_path = repository / name / VERSION / "model.onnx"
    write_atomically(model_path, onnx_bytes)
    write_atomically(repository / name / "config.pbtxt", config.encode())
    return model_path


def export_onnx(model: nn.Module, input_size: int) -> bytes:
    """TorchScript exporter, dynamic batch axis, weights inside the one file."""
    model.eval()
    example = torch.zeros(1, 3, input_size, input_size)
    with tempfile.TemporaryDirectory() as scratch, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        exported_path = Path(scratch) / "model.onnx"
        torch.onnx.export(
            model,
            (example,),
            exported_path,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
            external_data=False,
        )
        return exported_path.read_bytes()


def compare_with_torch(
    model: nn.Module, onnx_bytes: bytes, input_size: int, batches: tuple[int, ...] = (1, 3)
) -> tuple[float, int]:
    """Max abs difference between ONNX Runtime and torch over random batches of the given sizes
    (sizes other than the export example's 1 prove the batch axis is dynamic), relative to the
    largest torch output magnitude; and the output dimension."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    worst, dim = 0.0, -1
    for size in batches:
        batch = torch.randn(size, 3, input_size, input_size, generator=generator)
        with torch.no_grad():
            expected = model(batch).numpy()
        (actual,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})
        if actual.shape != expected.shape:
            raise ExportError(f"ONNX output shape {actual.shape}, torch {expected.shape}")
        scale = max(1.0, float(np.abs(expected).max()))
        worst = max(worst, float(np.abs(actual - expected).max()) / scale)
        dim = int(actual.shape[1])
    return worst, dim


def export_and_check(model: nn.Module, input_size: int, tolerance: float) -> tuple[bytes, int]:
    """Export, then check against torch at batch 1 and 3; returns the file and output dim."""
    onnx_bytes = export_onnx(model, input_size)
    diff, dim = compare_with_torch(model, onnx_bytes, input_size)
    print(f"[build_models] onnxruntime vs torch at batch 1 and 3: max rel diff {diff:.3g}")
    if not diff <= tolerance:
        raise ExportError(
            f"exported model disagrees with torch: max diff {diff:.3g} (tolerance {tolerance})"
        )
    return onnx_bytes, dim
