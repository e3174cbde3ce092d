"""Triton Inference Server as an inference backend, over gRPC (tritonclient's asyncio client).

The service keeps its preprocessing (decode, resize, normalise) and sends Triton the model's
float32 input tensor; Triton runs the model, batching concurrent requests with its dynamic
batcher (see docs/serving.md for why preprocessing stays in the service). The model name and
version are the ones the service read from its own copy of the repository, so what it
reports (and what the embedding cache keys carry) is what Triton ran; at start-up the model
config Triton serves is checked against that copy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from tritonclient.grpc import (
    MAX_GRPC_MESSAGE_SIZE,
    InferInput,
    InferRequestedOutput,
    model_config_pb2,
)
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException

from services.common import balancing
from services.common.channels import TLSSettings
from services.common.config import ConfigError
from services.common.inference import (
    InferenceTimeout,
    InferenceUnavailable,
    ModelSpec,
    TensorSpec,
)

log = logging.getLogger(__name__)

# Every Triton pod behind LOUPE_TRITON_URL gets calls (round_robin: dns:/// a headless
# Service's name, as the chart dials it), and a call that finds a pod gone is retried on
# another: inference, readiness and metadata are all idempotent. The reconnect backoff is
# capped (balancing.RECONNECT_OPTIONS): gRPC's default grows to two minutes, and the service
# would keep failing fast long after Triton is back.
CHANNEL_ARGS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
    *balancing.channel_options(
        balancing.service_config(
            "round_robin", [("inference.GRPCInferenceService", None)], balancing.RetryPolicy()
        )
    ),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]
# Readiness checks are small; they should not wait as long as an inference may.
READY_TIMEOUT_SECONDS = 5.0
# gRPC codes (as tritonclient reports them) that mean "not now": down, restarting, loading.
UNAVAILABLE_CODES = {"StatusCode.UNAVAILABLE", "StatusCode.CANCELLED", "StatusCode.NOT_FOUND"}


def triton_client(url: str, tls: TLSSettings) -> triton_aio.InferenceServerClient:
    """tritonclient's asyncio client, over TLS (with the service's certificate as the client
    certificate) when `tls` is on: the credentials every other channel of Loupe uses."""
    if not tls.enabled:
        return triton_aio.InferenceServerClient(url, channel_args=CHANNEL_ARGS)
    return triton_aio.InferenceServerClient(
        url,
        creds=tls.channel_credentials(),
        channel_args=[*CHANNEL_ARGS, *tls.channel_options()],
    )


class TritonBackend:
    def __init__(
        self, spec: ModelSpec, url: str, timeout_seconds: float, tls: TLSSettings | None = None
    ) -> None:
        self.spec = spec
        self.url = url
        self.timeout_seconds = timeout_seconds
        # Binds to the running event loop: create it inside the loop that will use it.
        self._client = triton_client(url, tls or TLSSettings())
        self._outputs = [InferRequestedOutput(o.name) for o in spec.outputs]
        self._config_checked = False

    async def infer(
        self, inputs: dict[str, np.ndarray], *, timeout: float | None = None
    ) -> dict[str, np.ndarray]:
        # Every call has a deadline: ours, or the caller's when that is sooner.
        deadline = self.timeout_seconds if timeout is None else min(self.timeout_seconds, timeout)
        if deadline <= 0:
            raise InferenceTimeout(f"no time left to call Triton at {self.url}")
        tensors = []
        for name, array in inputs.items():
            tensor = InferInput(name, list(array.shape), "FP32")
            tensor.set_data_from_numpy(np.ascontiguousarray(array, dtype=np.float32))
            tensors.append(tensor)
        try:
            result = await self._client.infer(
                self.spec.name,
                tensors,
                model_version=self.spec.version,
                outputs=self._outputs,
                client_timeout=deadline,
            )
        except InferenceServerException as error:
            raise self._translate(error, deadline) from None
        outputs = {}
        for spec in self.spec.outputs:
            value = result.as_numpy(spec.name)
            if value is None:
                raise RuntimeError(f"Triton at {self.url}: no output {spec.name!r}")
            outputs[spec.name] = value
        return outputs

    async def check_ready(self) -> None:
        """The model is loaded and ready on Triton (and, the first time, Triton's config of
        it matches ours: a mismatch is a ConfigError, which stops the service)."""
        name, version = self.spec.name, self.spec.version
        try:
            ready = await self._client.is_model_ready(
                name, version, client_timeout=READY_TIMEOUT_SECONDS
            )
            if ready and not self._config_checked:
                response = await self._client.get_model_config(
                    name, version, client_timeout=READY_TIMEOUT_SECONDS
                )
                check_config(self.spec, response.config, self.url)
                self._config_checked = True
        except InferenceServerException as error:
            raise InferenceUnavailable(
                f"Triton at {self.url} is unavailable ({_describe(error)})"
            ) from None
        if not ready:
            raise InferenceUnavailable(
                f"Triton at {self.url} has no ready model {name} version {version}"
            )

    async def close(self) -> None:
        await self._client.close()

    def _translate(self, error: InferenceServerException, deadline: float) -> Exception:
        status = error.status() or ""
        if status == "StatusCode.DEADLINE_EXCEEDED":
            return InferenceTimeout(
                f"Triton at {self.url} did not answer within {deadline:.3g}s "
                f"(model {self.spec.name} version {self.spec.version})"
            )
        if status in UNAVAILABLE_CODES:
            return InferenceUnavailable(f"Triton at {self.url} is unavailable ({_describe(error)})")
        # Anything else (a refused input, a model that failed) is a fault, not an outage.
        return RuntimeError(
            f"Triton at {self.url}: model {self.spec.name} version {self.spec.version}: "
            f"{_describe(error)}"
        )


def _describe(error: InferenceServerException) -> str:
    status = (error.status() or "").removeprefix("StatusCode.")
    message = error.message() or ""
    return f"{status}: {message}" if status else message


def check_config(spec: ModelSpec, config: model_config_pb2.ModelConfig, url: str) -> None:
    """Triton must run the model our repository describes: same batch size and tensors."""

    def tensors(items: Iterable[Any]) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(t.name, tuple(t.dims)) for t in items)

    served = (config.max_batch_size, tensors(config.input), tensors(config.output))
    ours = (spec.max_batch_size, spec.inputs, spec.outputs)
    if served != ours:
        raise ConfigError(
            f"model {spec.name} version {spec.version}: Triton at {url} serves max_batch_size "
            f"{served[0]}, inputs {_show(served[1])}, outputs {_show(served[2])}; the local "
            f"repository ({spec.path.parent.parent}) says {ours[0]}, {_show(ours[1])}, "
            f"{_show(ours[2])}: point LOUPE_MODEL_REPOSITORY at the repository Triton serves"
        )
    for tensor in (*config.input, *config.output):
        if tensor.data_type != model_config_pb2.TYPE_FP32:
            raise ConfigError(
                f"model {spec.name}: Triton at {url} serves {tensor.name} as "
                f"{model_config_pb2.DataType.Name(tensor.data_type)}; Loupe sends FP32"
            )


def _show(tensors: tuple[TensorSpec, ...]) -> str:
    return ", ".join(f"{t.name}{list(t.dims)}" for t in tensors)
