"""A real tritonserver with gRPC over mutual TLS (the chart's flags: --grpc-use-ssl,
--grpc-use-ssl-mutual, --grpc-server-cert, --grpc-server-key, --grpc-root-cert), and the model
services' Triton client presenting the service's certificate, with a throwaway CA made here.

Like test_triton_serving.py, it needs the tritonserver of .cache/triton-env (tools/setup.sh)
and the built models.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from services.common import certs
from services.common.channels import TLSSettings
from services.common.inference import (
    REPOSITORY_IN_CHECKOUT,
    InferenceUnavailable,
    ModelSpec,
    load_model_spec,
)
from services.common.triton_backend import TritonBackend
from tools.triton_repository import TritonServer, running_triton

MODEL = "embedder"

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("LOUPE_SKIP_TRITON_TESTS", "").strip() == "1",
        reason="LOUPE_SKIP_TRITON_TESTS=1",
    ),
    pytest.mark.skipif(
        not (REPOSITORY_IN_CHECKOUT / MODEL / "1" / "model.onnx").is_file(),
        reason="models not built: run `python models/build_models.py`",
    ),
]


def _write(folder: Path, name: str, issued: certs.Issued) -> tuple[str, str]:
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    certs.write_issued(issued, cert, key)
    return str(cert), str(key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TLSSettings]:
    folder = tmp_path_factory.mktemp("triton-pki")
    authority, other = certs.make_authority("test CA"), certs.make_authority("another CA")
    ca = folder / "ca.crt"
    ca.write_bytes(authority.pem)
    server = _write(folder, "triton", certs.issue(authority, "loupe-triton"))
    return {
        "server": TLSSettings(True, *server, ca=str(ca)),
        "service": TLSSettings(
            True, *_write(folder, "embedding", certs.issue(authority, "e")), str(ca)
        ),
        "no certificate": TLSSettings(True, ca=str(ca)),
        "another CA's certificate": TLSSettings(
            True, *_write(folder, "stranger", certs.issue(other, "stranger")), str(ca)
        ),
        "plaintext": TLSSettings(),
    }


@pytest.fixture(scope="module")
def triton(
    pki: dict[str, TLSSettings], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    server, client = pki["server"], pki["service"]
    with running_triton(
        tmp_path_factory.mktemp("triton-tls"),
        models=[MODEL],
        tls=(server.cert, server.key, server.ca),
        client_tls=(client.cert, client.key, client.ca),
        timeout=300,
    ) as running:
        yield running


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return load_model_spec(REPOSITORY_IN_CHECKOUT, MODEL)


def test_the_model_service_calls_triton_with_its_certificate(
    triton: TritonServer, pki: dict[str, TLSSettings], spec: ModelSpec
) -> None:
    async def run() -> dict[str, np.ndarray]:
        backend = TritonBackend(spec, triton.url, 60.0, pki["service"])
        try:
            await backend.check_ready()
            (tensor,) = spec.inputs
            return await backend.infer({tensor.name: np.zeros((1, *tensor.dims), np.float32)})
        finally:
            await backend.close()

    outputs = asyncio.run(run())
    (output,) = spec.outputs
    assert outputs[output.name].shape == (1, *output.dims)


@pytest.mark.parametrize("caller", ["no certificate", "another CA's certificate", "plaintext"])
def test_triton_refuses_a_caller_without_a_certificate_from_its_ca(
    triton: TritonServer, pki: dict[str, TLSSettings], spec: ModelSpec, caller: str
) -> None:
    async def run() -> None:
        backend = TritonBackend(spec, triton.url, 10.0, pki[caller])
        try:
            await backend.check_ready()
        finally:
            await backend.close()

    with pytest.raises(InferenceUnavailable, match="is unavailable"):
        asyncio.run(run())
