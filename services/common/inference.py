"""One small interface over inference backends, and the model repository they share.

The model repository has Triton's layout: `<repo>/<name>/config.pbtxt` and
`<repo>/<name>/<version>/model.onnx`. The in-process backend reads the same files Triton
would serve, so switching backends changes where the model runs, never which model.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from services.common.config import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: str
    path: Path
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # `loupe.*` parameters of config.pbtxt: how callers must prepare inputs.
    parameters: dict[str, str] = field(default_factory=dict)

    def parameter(self, key: str) -> str:
        try:
            return self.parameters[key]
        except KeyError:
            raise ConfigError(f"model {self.name}: config.pbtxt has no parameter {key!r}") from None


def load_model_spec(repository: Path, name: str, version: str = "") -> ModelSpec:
    """Read `<repository>/<name>`: its config and the requested (or newest) version's file."""
    model_dir = repository / name
    config_path = model_dir / "config.pbtxt"
    if not config_path.is_file():
        raise ConfigError(f"model {name!r}: no {config_path} (is LOUPE_MODEL_REPOSITORY right?)")
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(config_path.read_text(), config)
    except text_format.ParseError as error:
        raise ConfigError(f"{config_path}: {error}") from None
    versions = sorted(
        (p.name for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=int
    )
    if version and version not in versions:
        raise ConfigError(f"model {name!r}: version {version} not in {model_dir} (have {versions})")
    chosen = version or (versions[-1] if versions else "")
    onnx_path = model_dir / chosen / "model.onnx"
    if not chosen or not onnx_path.is_file():
        raise ConfigError(
            f"model {name!r}: no {model_dir}/<version>/model.onnx; build the models with "
            "`python models/build_models.py`"
        )
    return ModelSpec(
        name=config.name or name,
        version=chosen,
        path=onnx_path,
        max_batch_size=config.max_batch_size,
        inputs=tuple(TensorSpec(t.name, tuple(t.dims)) for t in config.input),
        outputs=tuple(TensorSpec(t.name, tuple(t.dims)) for t in config.output),
        parameters={
            k: v.string_value for k, v in config.parameters.items() if k.startswith("loupe.")
        },
    )


class InferenceBackend(Protocol):
    """Runs one model. Inputs and outputs are named float32 arrays, batch axis first."""

    spec: ModelSpec

    async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
    async def close(self) -> None: ...


class OnnxRuntimeBackend:
    """ONNX Runtime in process. Inference runs in a worker thread so the event loop keeps
    answering health checks and accepting calls while a batch computes."""

    def __init__(self, spec: ModelSpec, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = [
            p
            for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
            if p in ort.get_available_providers()
        ]
        self.spec = spec
        self._session = ort.InferenceSession(str(spec.path), options, providers=providers)
        self._output_names = [o.name for o in self._session.get_outputs()]

    async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = await asyncio.to_thread(self._session.run, self._output_names, inputs)
        return dict(zip(self._output_names, outputs, strict=True))

    async def close(self) -> None:
        del self._session


class LoadedModel:
    """A model of the repository and, once `load` has run, the backend that runs it: the
    lifecycle both model services share."""

    def __init__(self, spec: ModelSpec, backend_kind: str, threads: int) -> None:
        self.spec = spec
        self._backend_kind = backend_kind
        self._threads = threads
        self._backend: InferenceBackend | None = None

    async def load(self) -> None:
        # Creating a session takes a while; keep the event loop answering health meanwhile.
        self._backend = await asyncio.to_thread(
            create_backend, self._backend_kind, self.spec, self._threads
        )
        log.info("model loaded", extra={"model": self.spec.name, "version": self.spec.version})

    @property
    def backend(self) -> InferenceBackend | None:
        """None until loaded (and after close)."""
        return self._backend

    async def close(self) -> None:
        backend, self._backend = self._backend, None
        if backend is not None:
            await backend.close()


BACKENDS = ("onnxruntime",)


def create_backend(kind: str, spec: ModelSpec, threads: int = 0) -> InferenceBackend:
    if kind == "onnxruntime":
        return OnnxRuntimeBackend(spec, threads)
    raise ConfigError(f"LOUPE_INFERENCE_BACKEND={kind!r}: expected one of {', '.join(BACKENDS)}")


# The checkout's models/ folder, where models/build_models.py writes.
REPOSITORY_IN_CHECKOUT = Path(__file__).resolve().parents[2] / "models"


def model_repository_from_env() -> Path:
    raw = os.environ.get("LOUPE_MODEL_REPOSITORY", "").strip()
    path = Path(raw) if raw else REPOSITORY_IN_CHECKOUT
    if not path.is_dir():
        raise ConfigError(f"LOUPE_MODEL_REPOSITORY={str(path)!r}: not a directory")
    return path
