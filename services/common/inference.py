"""One small interface over inference backends, and the model repository they share.

The model repository has Triton's layout: `<repo>/<name>/config.pbtxt` and
`<repo>/<name>/<version>/model.onnx`. The in-process backend reads the same files Triton
would serve, so switching backends changes where the model runs, never which model.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import grpc
import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from services.common.channels import TLSSettings
from services.common.config import ConfigError, env_address, env_float, env_int, env_str
from services.common.cpu import available_cores

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


class InferenceUnavailable(Exception):
    """The model cannot run now (its server is down, or the model is not loaded there); the
    message names the server. Services answer UNAVAILABLE with it: the caller may retry."""


class InferenceTimeout(Exception):
    """The model's server did not answer within the call's deadline (DEADLINE_EXCEEDED)."""


class InferenceBackend(Protocol):
    """Runs one model. Inputs and outputs are named float32 arrays, batch axis first."""

    spec: ModelSpec

    async def infer(
        self, inputs: dict[str, np.ndarray], *, timeout: float | None = None
    ) -> dict[str, np.ndarray]:
        """`timeout`: seconds the caller can still wait (its gRPC deadline), or None."""
        ...

    async def check_ready(self) -> None:
        """Raise InferenceUnavailable unless the model can serve now."""
        ...

    async def close(self) -> None: ...


class OnnxRuntimeBackend:
    """ONNX Runtime in process. Inference runs in a worker thread so the event loop keeps
    answering health checks and accepting calls while a batch computes."""

    def __init__(self, spec: ModelSpec, threads: int = 0, spinning: bool = True) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # ONNX Runtime's own default is the machine's physical cores, not a container's CPU
        # limit; one inter-op thread, since these graphs are a single chain of operators.
        options.intra_op_num_threads = threads or available_cores()
        options.inter_op_num_threads = 1
        if not spinning:
            # ONNX Runtime's idle intra-op threads spin-wait for the next operator by
            # default: it shaves microseconds off small runs, but on a busy machine (image
            # decoding in the same process, other pods on the node) the spinning burns the
            # cores the work needs. Measured on 2 shared cores: half the CPU per image.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = [
            p
            for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
            if p in ort.get_available_providers()
        ]
        self.spec = spec
        self._session = ort.InferenceSession(str(spec.path), options, providers=providers)
        self._output_names = [o.name for o in self._session.get_outputs()]

    async def infer(
        self, inputs: dict[str, np.ndarray], *, timeout: float | None = None
    ) -> dict[str, np.ndarray]:
        # A computation in a thread cannot be interrupted: `timeout` is left to the caller,
        # whose gRPC deadline cancels its wait.
        outputs = await asyncio.to_thread(self._session.run, self._output_names, inputs)
        return dict(zip(self._output_names, outputs, strict=True))

    async def check_ready(self) -> None:
        return None

    async def close(self) -> None:
        del self._session


BACKENDS = ("onnxruntime", "triton")
# Defaults chosen by measurement (tools/bench_inference.py, docs/serving.md). On CPU a run
# costs about the same per image at any batch size, least up to 4 (larger batches spill the
# caches: +15-20% CPU per image at 8-32), so waiting for a batch only adds latency; calls
# that arrive while a batch runs form the next one anyway. With onnxruntime-gpu, larger
# batches pay: LOUPE_BATCH_MAX_SIZE=32 and a 1-2 ms delay.
DEFAULT_BATCH_MAX_SIZE = 4
DEFAULT_BATCH_MAX_DELAY_MS = 0.0


@dataclass(frozen=True)
class InferenceSettings:
    """How the model services run their model; the same variables for both services."""

    backend: str = "onnxruntime"
    # ONNX Runtime: intra-op threads (0: the cores the process may use, cgroup limit included).
    threads: int = 0
    # ONNX Runtime: in-process micro-batching (a max size of 1 turns it off; None: the
    # default, capped at what the model takes).
    batch_max_size: int | None = None
    batch_max_delay_ms: float = DEFAULT_BATCH_MAX_DELAY_MS
    # Triton: its gRPC endpoint and the longest a call may take.
    triton_url: str = "localhost:8001"
    triton_timeout_seconds: float = 10.0
    # Triton: TLS to its gRPC endpoint (LOUPE_TLS_*; the service's certificate is the client
    # certificate Triton sees with --grpc-use-ssl-mutual).
    triton_tls: TLSSettings = field(default_factory=TLSSettings)

    @classmethod
    def from_env(cls) -> InferenceSettings:
        return cls(
            backend=env_str("LOUPE_INFERENCE_BACKEND", "onnxruntime", choices=BACKENDS),
            threads=env_int("LOUPE_INFERENCE_THREADS", 0, minimum=0),
            batch_max_size=(
                env_int("LOUPE_BATCH_MAX_SIZE", DEFAULT_BATCH_MAX_SIZE, minimum=1, maximum=4096)
                if os.environ.get("LOUPE_BATCH_MAX_SIZE", "").strip()
                else None
            ),
            batch_max_delay_ms=env_float(
                "LOUPE_BATCH_MAX_DELAY_MS", DEFAULT_BATCH_MAX_DELAY_MS, minimum=0.0, maximum=1000.0
            ),
            triton_url=env_address("LOUPE_TRITON_URL", "localhost:8001"),
            triton_timeout_seconds=env_float(
                "LOUPE_TRITON_TIMEOUT_SECONDS", 10.0, minimum=0.001, maximum=3600.0
            ),
            # A Triton of one's own may serve plaintext while the services use TLS.
            triton_tls=(
                TLSSettings()
                if env_str("LOUPE_TRITON_TLS", "auto", choices=("auto", "off")) == "off"
                else TLSSettings.from_env()
            ),
        )

    def check(self, spec: ModelSpec) -> None:
        """Settings that only make sense against the model; a ConfigError at start-up."""
        if (
            self.backend == "onnxruntime"
            and spec.max_batch_size > 0
            and self.batch_max_size is not None
            and self.batch_max_size > spec.max_batch_size
        ):
            raise ConfigError(
                f"LOUPE_BATCH_MAX_SIZE={self.batch_max_size}: model {spec.name} takes at most "
                f"{spec.max_batch_size} images per batch (max_batch_size in its config.pbtxt)"
            )

    def batch_size(self, spec: ModelSpec) -> int:
        """Most images per coalesced run for this model."""
        if self.batch_max_size is not None:
            return self.batch_max_size
        return min(DEFAULT_BATCH_MAX_SIZE, max(1, spec.max_batch_size))

    def batches(self, spec: ModelSpec) -> bool:
        """Whether calls are coalesced in process: ONNX Runtime only (with Triton, batching
        is its dynamic batcher's job), and never a model without a batch axis."""
        return (
            self.backend == "onnxruntime" and spec.max_batch_size > 0 and self.batch_size(spec) > 1
        )


def create_backend(settings: InferenceSettings, spec: ModelSpec) -> InferenceBackend:
    """The backend `settings` name, wrapped with metrics and, where it applies, the in-process
    micro-batcher. A Triton backend must be created inside the event loop that will use it."""
    # Imported here: these modules build on the interface above.
    from services.common.batching import MicroBatcher
    from services.common.inference_metrics import ObservedBackend

    backend: InferenceBackend
    if settings.backend == "onnxruntime":
        # No spin-waiting: the services decode images in the same process, and spinning
        # threads take the cores that work needs (docs/serving.md, "Profile").
        backend = ObservedBackend(OnnxRuntimeBackend(spec, settings.threads, spinning=False))
        if settings.batches(spec):
            backend = MicroBatcher(
                backend, settings.batch_size(spec), settings.batch_max_delay_ms / 1000.0
            )
        return backend
    if settings.backend == "triton":
        from services.common.triton_backend import TritonBackend

        return ObservedBackend(
            TritonBackend(
                spec, settings.triton_url, settings.triton_timeout_seconds, settings.triton_tls
            )
        )
    raise ConfigError(
        f"LOUPE_INFERENCE_BACKEND={settings.backend!r}: expected one of {', '.join(BACKENDS)}"
    )


# While a remote model is not ready: first retry after this long, doubling up to the cap.
RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 5.0
# How often a remote model's readiness is checked while serving.
WATCH_SECONDS = 2.0


class LoadedModel:
    """A model of the repository and, once `load` has run, the backend that runs it: the
    lifecycle both model services share."""

    def __init__(self, spec: ModelSpec, settings: InferenceSettings) -> None:
        settings.check(spec)
        self.spec = spec
        self.settings = settings
        self._backend: InferenceBackend | None = None
        # Why the model is not loaded yet, while waiting for its server; for error messages.
        self._waiting_for = ""

    @property
    def remote(self) -> bool:
        return self.settings.backend == "triton"

    async def load(self) -> None:
        """Create the backend; with a remote server, wait until it serves this model.

        Triton may start after the service (a rollout, a restart): the service then stays
        NOT_SERVING and keeps trying, which is what a Kubernetes readiness probe wants,
        rather than exiting into a crash loop."""
        if self.remote:
            backend = create_backend(self.settings, self.spec)
            delay = RETRY_FIRST_SECONDS
            while True:
                try:
                    await backend.check_ready()
                    break
                except InferenceUnavailable as error:
                    self._waiting_for = str(error)
                    log.warning(
                        "model not ready on the inference server; retrying",
                        extra={"model": self.spec.name, "error": str(error), "retry_s": delay},
                    )
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, RETRY_MAX_SECONDS)
                except BaseException:
                    await backend.close()
                    raise
        else:
            # Creating a session takes a while; keep the event loop answering health meanwhile.
            backend = await asyncio.to_thread(create_backend, self.settings, self.spec)
        self._backend = backend
        log.info("model loaded", extra={"model": self.spec.name, "version": self.spec.version})

    async def watch_readiness(self, report: Callable[[bool], Awaitable[None]]) -> None:
        """After `load`: report whether the model can serve each time that changes, until
        cancelled. Only a remote model can stop being ready; an in-process one returns."""
        if not self.remote:
            return
        ready = True
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            backend = self._backend
            if backend is None:
                return
            try:
                await backend.check_ready()
                now_ready = True
            except InferenceUnavailable as error:
                now_ready = False
                if ready:
                    log.warning(
                        "model no longer ready",
                        extra={"model": self.spec.name, "error": str(error)},
                    )
            if now_ready != ready:
                ready = now_ready
                if ready:
                    log.info("model ready again", extra={"model": self.spec.name})
                await report(ready)

    @property
    def backend(self) -> InferenceBackend | None:
        """None until loaded (and after close)."""
        return self._backend

    def not_loaded_reason(self) -> str:
        if self._waiting_for:
            return f"model {self.spec.name} not loaded yet: {self._waiting_for}"
        return f"model {self.spec.name} not loaded yet"

    async def close(self) -> None:
        backend, self._backend = self._backend, None
        if backend is not None:
            await backend.close()


async def infer_or_abort(
    context: grpc.aio.ServicerContext,
    backend: InferenceBackend,
    inputs: dict[str, np.ndarray],
    service: str,
) -> dict[str, np.ndarray]:
    """`backend.infer` within the caller's deadline; backend failures become the gRPC status
    the caller can act on (UNAVAILABLE: retry later; DEADLINE_EXCEEDED), naming the server."""
    try:
        return await backend.infer(inputs, timeout=context.time_remaining())
    except InferenceUnavailable as error:
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"{service}: {error}")
    except InferenceTimeout as error:
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"{service}: {error}")
    raise AssertionError("unreachable: abort raises")


class ServesModel:
    """The lifecycle server.py drives (`start`, `watch_readiness`, `close`) for a service
    that serves one LoadedModel: detection and embedding."""

    model: LoadedModel

    async def start(self) -> None:
        await self.model.load()

    async def watch_readiness(self, report: Callable[[bool], Awaitable[None]]) -> None:
        """Health follows the model's server (Triton) while serving; see server.py."""
        await self.model.watch_readiness(report)

    async def close(self) -> None:
        await self.model.close()


# The checkout's models/ folder, where models/build_models.py writes.
REPOSITORY_IN_CHECKOUT = Path(__file__).resolve().parents[2] / "models"


def model_repository_from_env() -> Path:
    raw = os.environ.get("LOUPE_MODEL_REPOSITORY", "").strip()
    path = Path(raw) if raw else REPOSITORY_IN_CHECKOUT
    if not path.is_dir():
        raise ConfigError(f"LOUPE_MODEL_REPOSITORY={str(path)!r}: not a directory")
    return path
