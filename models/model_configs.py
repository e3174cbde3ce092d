"""config.pbtxt of the repository's two default models, for the hardware Triton runs them on.

    python models/build_models.py [--target gpu|gpu-tensorrt|cpu]

`gpu` (the default, and what is committed): one instance per GPU, dynamic batching.
`gpu-tensorrt`: the same, with ONNX Runtime's TensorRT execution provider (engines built at
load, cached; FP32 so vectors match the other paths). `cpu`: CPU instances for Triton on
nodes without a GPU. Every target keeps the model contract (inputs, outputs, max_batch_size)
and the `loupe.*` parameters the services read, so the in-process backend reads any of them
unchanged. Written as text (not via protobuf) to keep the comments; a unit test parses every
target with Triton's own schema (tritonclient's model_config_pb2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TARGETS = ("gpu", "gpu-tensorrt", "cpu")
DEFAULT_TARGET = "gpu"
# Where ONNX Runtime keeps TensorRT engines between loads (mount a volume there to keep them
# across pod restarts: building the engines takes minutes).
TRT_CACHE_PATH = "/tmp/loupe-trt-engines"


@dataclass(frozen=True)
class Tensor:
    name: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class DefaultModel:
    name: str
    comment: str
    max_batch_size: int
    input: Tensor
    output: Tensor
    parameters: tuple[tuple[str, str], ...]


EMBEDDER = DefaultModel(
    name="embedder",
    comment="""\
MobileNetV2 (ImageNet weights) image embedder: global-average-pooled 1280-d features.
Built by models/build_models.py into embedder/1/model.onnx. Triton serves this file as is;
Loupe's in-process ONNX Runtime backend reads the same file and the same parameters.""",
    max_batch_size=64,
    input=Tensor("images", (3, 224, 224)),
    output=Tensor("embeddings", (1280,)),
    parameters=(
        ("loupe.color_order", "RGB"),
        ("loupe.resize", "stretch"),
        ("loupe.scale", "0.00392156862745098"),
        ("loupe.mean", "0.485,0.456,0.406"),
        ("loupe.std", "0.229,0.224,0.225"),
    ),
)

DETECTOR = DefaultModel(
    name="detector",
    comment="""\
YOLOX-nano (Megvii, Apache-2.0), 80 COCO classes. Put in place by models/build_models.py as
detector/1/model.onnx. The published file's batch axis is fixed at 1, so this model is
unbatched (max_batch_size 0, no dynamic batching): detection runs once per image; batching
it would need a re-export with a dynamic axis. Triton runs one request at a time per
instance; raise the instance count to overlap requests.""",
    max_batch_size=0,
    input=Tensor("images", (1, 3, 416, 416)),
    output=Tensor("output", (1, 3549, 85)),
    parameters=(
        ("loupe.color_order", "BGR"),
        ("loupe.resize", "letterbox"),
        ("loupe.pad_value", "114"),
        ("loupe.strides", "8,16,32"),
        ("loupe.labels", "coco80"),
    ),
)

DEFAULT_MODELS = (EMBEDDER, DETECTOR)


def _dims(dims: tuple[int, ...]) -> str:
    return ", ".join(str(d) for d in dims)


def serving_lines(target: str, max_batch_size: int, input: Tensor) -> list[str]:
    """instance_group, dynamic_batching, optimization and warm-up for `target`."""
    if target not in TARGETS:
        raise ValueError(f"target {target!r}: expected one of {', '.join(TARGETS)}")
    gpu = target.startswith("gpu")
    lines = [
        "# Where it runs: one instance per GPU (all of the node's GPUs)."
        if gpu
        else "# Where it runs: CPU; ONNX Runtime's intra-op threads use the cores.",
        "instance_group [",
        "  {",
        f"    kind: {'KIND_GPU' if gpu else 'KIND_CPU'}",
        "    count: 1",
        "  }",
        "]",
    ]
    if max_batch_size > 0:
        # A GPU gains from large batches; a CPU does not (past 4 images a batch costs more
        # per image: tools/bench_inference.py, docs/serving.md), so wait less for one there.
        preferred = [s for s in ((16, 32, 64) if gpu else (4, 8)) if s <= max_batch_size]
        delay = 2000 if gpu else 1000
        lines += [
            "# Concurrent requests are batched by Triton (the services send one request each).",
            "dynamic_batching {",
            f"  preferred_batch_size: [ {', '.join(str(s) for s in preferred)} ]",
            f"  max_queue_delay_microseconds: {delay}",
            "}",
        ]
    if target == "gpu-tensorrt":
        warm_batch = max(1, max_batch_size)
        lines += [
            "# TensorRT through ONNX Runtime; FP32 keeps vectors equal to the other paths",
            '# ("FP16" is faster: make it a new model version, its vectors differ slightly).',
            "optimization {",
            "  execution_accelerators {",
            "    gpu_execution_accelerator: [",
            "      {",
            '        name: "tensorrt"',
            '        parameters { key: "precision_mode" value: "FP32" }',
            '        parameters { key: "max_workspace_size_bytes" value: "1073741824" }',
            '        parameters { key: "trt_engine_cache_enable" value: "1" }',
            f'        parameters {{ key: "trt_engine_cache_path" value: "{TRT_CACHE_PATH}" }}',
            "      }",
            "    ]",
            "  }",
            "}",
            "# Build the engine for the largest batch at load, not on the first big request.",
            "model_warmup [",
            "  {",
            f'    name: "zeros_batch_{warm_batch}"',
            f"    batch_size: {warm_batch}",
            "    inputs {",
            f'      key: "{input.name}"',
            "      value {",
            "        data_type: TYPE_FP32",
            f"        dims: [ {_dims(input.dims)} ]",
            "        zero_data: true",
            "      }",
            "    }",
            "  }",
            "]",
        ]
    return lines


def config_text(model: DefaultModel, target: str = DEFAULT_TARGET) -> str:
    lines = [f"# {line}".rstrip() for line in model.comment.splitlines()]
    lines += [
        f"# Target: {target} (models/build_models.py --target {'|'.join(TARGETS)}).",
        f'name: "{model.name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {model.max_batch_size}",
        "input [",
        "  {",
        f'    name: "{model.input.name}"',
        "    data_type: TYPE_FP32",
        f"    dims: [ {_dims(model.input.dims)} ]",
        "  }",
        "]",
        "output [",
        "  {",
        f'    name: "{model.output.name}"',
        "    data_type: TYPE_FP32",
        f"    dims: [ {_dims(model.output.dims)} ]",
        "  }",
        "]",
        *serving_lines(target, model.max_batch_size, model.input),
        "# How callers must prepare pixels (Triton ignores parameters it does not know).",
    ]
    lines += [
        f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}'
        for key, value in model.parameters
    ]
    return "\n".join(lines) + "\n"


def write_configs(models_dir: Path, target: str = DEFAULT_TARGET) -> list[Path]:
    """Write `<models_dir>/<name>/config.pbtxt` of the default models; the paths written."""
    written = []
    for model in DEFAULT_MODELS:
        path = models_dir / model.name / "config.pbtxt"
        text = config_text(model, target)
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".pbtxt.tmp")
            tmp.write_text(text)
            tmp.replace(path)  # a reader (Triton polling the repository) never sees half
        written.append(path)
    return written
