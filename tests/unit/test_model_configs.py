"""Every config.pbtxt the model tool writes, read with Triton's own schema."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from services.common.inference import REPOSITORY_IN_CHECKOUT, load_model_spec
from tools import triton_repository


def _load_model_configs() -> ModuleType:
    """models/ is a folder of scripts, not a package: load the one module by path."""
    path = REPOSITORY_IN_CHECKOUT / "model_configs.py"
    spec = importlib.util.spec_from_file_location("model_configs", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("model_configs", module)
    spec.loader.exec_module(module)
    return module


model_configs = _load_model_configs()

ModelConfig = model_config_pb2.ModelConfig
KIND_GPU = model_config_pb2.ModelInstanceGroup.KIND_GPU
KIND_CPU = model_config_pb2.ModelInstanceGroup.KIND_CPU


def parse(text: str) -> model_config_pb2.ModelConfig:
    config = ModelConfig()
    # Parse (not Merge): an unknown field or a repeated scalar set twice is an error.
    text_format.Parse(text, config)
    return config


@pytest.mark.parametrize("target", model_configs.TARGETS)
@pytest.mark.parametrize("model", model_configs.DEFAULT_MODELS, ids=lambda m: m.name)
def test_every_target_parses_as_a_triton_model_config(
    model: model_configs.DefaultModel, target: str
) -> None:
    config = parse(model_configs.config_text(model, target))

    assert config.name == model.name
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == model.max_batch_size
    assert [(t.name, tuple(t.dims), t.data_type) for t in config.input] == [
        (model.input.name, model.input.dims, model_config_pb2.TYPE_FP32)
    ]
    assert [(t.name, tuple(t.dims)) for t in config.output] == [
        (model.output.name, model.output.dims)
    ]
    (group,) = config.instance_group
    assert group.kind == (KIND_GPU if target.startswith("gpu") else KIND_CPU)
    assert group.count >= 1
    # The services' preprocessing parameters survive every target.
    assert {k: v.string_value for k, v in config.parameters.items()} == dict(model.parameters)

    if model.max_batch_size > 0:
        assert config.HasField("dynamic_batching")
        preferred = list(config.dynamic_batching.preferred_batch_size)
        assert preferred and all(0 < s <= model.max_batch_size for s in preferred)
        assert config.dynamic_batching.max_queue_delay_microseconds > 0
    else:
        # No batch axis: Triton refuses dynamic batching for such a model.
        assert not config.HasField("dynamic_batching")

    accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
    if target == "gpu-tensorrt":
        (trt,) = accelerators
        assert trt.name == "tensorrt"
        assert trt.parameters["precision_mode"] == "FP32"
        (warmup,) = config.model_warmup
        assert warmup.batch_size == max(1, model.max_batch_size)
        assert tuple(warmup.inputs[model.input.name].dims) == model.input.dims
    else:
        assert not accelerators
        assert not config.model_warmup


def test_the_committed_configs_are_what_the_tool_writes_by_default() -> None:
    for model in model_configs.DEFAULT_MODELS:
        committed = (REPOSITORY_IN_CHECKOUT / model.name / "config.pbtxt").read_text()
        assert committed == model_configs.config_text(model, model_configs.DEFAULT_TARGET)


@pytest.mark.parametrize("target", model_configs.TARGETS)
def test_the_services_read_every_target(tmp_path: Path, target: str) -> None:
    for model in model_configs.DEFAULT_MODELS:
        (tmp_path / model.name / "1").mkdir(parents=True)
        (tmp_path / model.name / "1" / "model.onnx").write_bytes(b"")
    model_configs.write_configs(tmp_path, target)
    spec = load_model_spec(tmp_path, "embedder")
    assert spec.max_batch_size == 64
    assert spec.parameter("loupe.mean") == "0.485,0.456,0.406"
    assert load_model_spec(tmp_path, "detector").parameter("loupe.labels") == "coco80"


def test_the_python_backend_twin_keeps_the_contract(tmp_path: Path) -> None:
    source = tmp_path / "models"
    model_configs.write_configs(source, "gpu-tensorrt")
    for model in model_configs.DEFAULT_MODELS:
        (source / model.name / "1").mkdir()
        (source / model.name / "1" / "model.onnx").write_bytes(b"onnx")
    names = triton_repository.generate(source, tmp_path / "twin")
    assert sorted(names) == ["detector", "embedder"]
    for model in model_configs.DEFAULT_MODELS:
        original = parse((source / model.name / "config.pbtxt").read_text())
        twin_dir = tmp_path / "twin" / model.name
        twin = parse((twin_dir / "config.pbtxt").read_text())
        assert twin.backend == "python" and not twin.platform
        assert (twin.max_batch_size, twin.input, twin.output) == (
            original.max_batch_size,
            original.input,
            original.output,
        )
        assert twin.dynamic_batching == original.dynamic_batching
        assert [g.kind for g in twin.instance_group] == [KIND_CPU]
        assert not twin.HasField("optimization") and not twin.model_warmup
        assert (twin_dir / "1" / "model.onnx").resolve() == (
            source / model.name / "1" / "model.onnx"
        ).resolve()
        compile((twin_dir / "1" / "model.py").read_text(), "model.py", "exec")
