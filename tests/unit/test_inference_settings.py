"""LOUPE_INFERENCE_BACKEND, LOUPE_TRITON_*, LOUPE_BATCH_*: validated at start-up."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from services.common.config import ConfigError
from services.common.inference import InferenceSettings, LoadedModel, ModelSpec, TensorSpec

EMBEDDER = ModelSpec(
    name="embedder",
    version="1",
    path=Path("/nonexistent/embedder/1/model.onnx"),
    max_batch_size=64,
    inputs=(TensorSpec("images", (3, 224, 224)),),
    outputs=(TensorSpec("embeddings", (1280,)),),
)


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "LOUPE_INFERENCE_BACKEND",
        "LOUPE_TRITON_URL",
        "LOUPE_TRITON_TIMEOUT_SECONDS",
        "LOUPE_BATCH_MAX_SIZE",
        "LOUPE_BATCH_MAX_DELAY_MS",
    ):
        monkeypatch.delenv(name, raising=False)
    settings = InferenceSettings.from_env()
    assert settings == InferenceSettings()
    assert (settings.backend, settings.triton_url) == ("onnxruntime", "localhost:8001")
    assert settings.batches(EMBEDDER)
    assert settings.batch_size(EMBEDDER) == 4
    # The default never exceeds what a model takes; an explicit value must not either.
    assert settings.batch_size(dataclasses.replace(EMBEDDER, max_batch_size=2)) == 2


def test_triton_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOUPE_INFERENCE_BACKEND", "triton")
    monkeypatch.setenv("LOUPE_TRITON_URL", "triton.models.svc:8001")
    monkeypatch.setenv("LOUPE_TRITON_TIMEOUT_SECONDS", "2.5")
    settings = InferenceSettings.from_env()
    assert (settings.backend, settings.triton_url, settings.triton_timeout_seconds) == (
        "triton",
        "triton.models.svc:8001",
        2.5,
    )
    # Triton's dynamic batcher batches; the service does not batch again.
    assert not settings.batches(EMBEDDER)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("LOUPE_INFERENCE_BACKEND", "tensorrt", "expected one of onnxruntime, triton"),
        ("LOUPE_TRITON_URL", "http://triton", "expected HOST:PORT"),
        ("LOUPE_TRITON_URL", "triton:99999", "expected HOST:PORT"),
        ("LOUPE_TRITON_TIMEOUT_SECONDS", "0", "must be at least"),
        ("LOUPE_BATCH_MAX_SIZE", "0", "must be at least 1"),
        ("LOUPE_BATCH_MAX_SIZE", "many", "expected an integer"),
        ("LOUPE_BATCH_MAX_DELAY_MS", "-1", "must be at least 0"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message) as raised:
        InferenceSettings.from_env()
    assert name in str(raised.value)


def test_a_batch_larger_than_the_model_takes_is_refused() -> None:
    with pytest.raises(ConfigError, match="LOUPE_BATCH_MAX_SIZE=128: model embedder takes"):
        LoadedModel(EMBEDDER, InferenceSettings(batch_max_size=128))
    # With Triton the in-process batch size does not apply.
    LoadedModel(EMBEDDER, InferenceSettings(backend="triton", batch_max_size=128))
