"""The Triton path against a real tritonserver: the one inside the `nvidia-pytriton` wheel,
serving the repository's own ONNX files through Python-backend twins
(tools/triton_repository.py).

In file order: the services on Triton give the in-process results; Triton's dynamic batcher
groups concurrent calls; the whole stack (`loupe up` with LOUPE_INFERENCE_BACKEND=triton)
indexes and searches; then Triton is killed (UNAVAILABLE naming Triton, health NOT_SERVING)
and restarted (the same processes recover).

CI installs the server (tools/setup.sh), so a missing one is a failure here, not a skip;
LOUPE_SKIP_TRITON_TESTS=1 opts out explicitly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loupe.v1 import (
    common_pb2,
    detection_pb2,
    detection_pb2_grpc,
    embedding_pb2,
    embedding_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
)
from services.cli import local_tls
from services.cli.client import with_key
from services.cli.stack import StackState, local_api_key
from services.common.channels import TLSSettings, open_blocking_channel
from services.common.inference import REPOSITORY_IN_CHECKOUT
from services.detection.service import DetectionService
from services.detection.settings import DetectionSettings
from services.embedding.service import EmbeddingService
from services.embedding.settings import EmbeddingSettings
from tests.support import free_ports, serving
from tools.triton_repository import TritonServer, running_triton

ROOT = REPOSITORY_IN_CHECKOUT.parent
SHARED = Path(os.environ.get("LOUPE_SHARED_DIR", ROOT.parent / "shared"))
COREL = SHARED / "data" / "corel1k" / "images"
COCO = SHARED / "data" / "coco128-val" / "images"
LOUPE = str(Path(sys.executable).parent / "loupe")
SERVICES = ("gateway", "detection", "embedding", "retrieval", "ranking")
# Three Corel classes (beach, buses, dinosaurs), eight images each, for the stack.
STACK_ITEMS = [c * 100 + i for c in (1, 3, 4) for i in range(8)]
MODELS = ["embedder", "detector"]
# A second embedder served beside the first (model lifecycle: both during a migration);
# tools/setup.sh builds it.
SECOND = "embedder_gem3"
SERVED = (
    [*MODELS, SECOND]
    if (REPOSITORY_IN_CHECKOUT / SECOND / "1" / "model.onnx").is_file()
    else MODELS
)
S = TypeVar("S", EmbeddingSettings, DetectionSettings)

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("LOUPE_SKIP_TRITON_TESTS", "").strip() == "1",
        reason="LOUPE_SKIP_TRITON_TESTS=1",
    ),
    pytest.mark.skipif(
        not all((REPOSITORY_IN_CHECKOUT / m / "1" / "model.onnx").is_file() for m in MODELS),
        reason="models not built: run `python models/build_models.py`",
    ),
    pytest.mark.skipif(not COREL.is_dir() or not COCO.is_dir(), reason=f"no data at {SHARED}"),
]


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    # Installs the server's environment when it is missing: if that fails, the tests fail.
    with running_triton(tmp_path_factory.mktemp("triton"), models=SERVED) as server:
        yield server


def on_triton(settings: S, url: str) -> S:
    inference = dataclasses.replace(settings.inference, backend="triton", triton_url=url)
    return dataclasses.replace(settings, inference=inference)


def vector(message: common_pb2.Vector) -> np.ndarray:
    return np.array(message.values, np.float32)


def triton_stats(server: TritonServer, model: str) -> tuple[int, int]:
    """(inference requests, model executions) Triton counted for `model`."""
    client = triton_grpc.InferenceServerClient(server.url)
    try:
        (stats,) = client.get_inference_statistics(model).model_stats
    finally:
        client.close()
    return stats.inference_count, stats.execution_count


# --- the model services on Triton against in process ---------------------------------------------


def test_embeddings_through_triton_equal_the_in_process_ones(triton: TritonServer) -> None:
    local_settings = EmbeddingSettings.from_env()
    requests = [
        embedding_pb2.EmbedRequest(
            image=(COREL / f"{i}.jpg").read_bytes(),
            whole_image=True,
            regions=[common_pb2.Box(x0=10, y0=20, x1=200, y1=180)],
        )
        for i in (0, 150, 420, 777)
    ]
    with (
        serving(EmbeddingService(local_settings)) as local_channel,
        serving(EmbeddingService(on_triton(local_settings, triton.url))) as triton_channel,
    ):
        local = embedding_pb2_grpc.EmbeddingServiceStub(local_channel)
        remote = embedding_pb2_grpc.EmbeddingServiceStub(triton_channel)
        inferences_before, _ = triton_stats(triton, "embedder")
        for request in requests:
            a, b = local.Embed(request, timeout=60), remote.Embed(request, timeout=60)
            assert (b.model_name, b.model_version) == (a.model_name, a.model_version)
            pairs = [(a.whole_image, b.whole_image), *zip(a.regions, b.regions, strict=True)]
            for x, y in pairs:
                assert float(np.abs(vector(x) - vector(y)).max()) < 1e-4
        # And the vectors really came from Triton.
        assert triton_stats(triton, "embedder")[0] >= inferences_before + len(requests)


@pytest.mark.skipif(SECOND not in SERVED, reason=f"no models/{SECOND}: tools/setup.sh builds it")
def test_two_embedders_side_by_side_on_triton(
    triton: TritonServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One embedding service, two models on Triton by name and version per request: each
    gives what the same model gives in process."""
    monkeypatch.setenv("LOUPE_EMBEDDING_EXTRA_MODELS", f"{SECOND}:1")
    local_settings = EmbeddingSettings.from_env()
    request = embedding_pb2.EmbedRequest(
        image=(COREL / "150.jpg").read_bytes(), whole_image=True, model=f"{SECOND}/1"
    )
    with (
        serving(EmbeddingService(local_settings)) as local_channel,
        serving(EmbeddingService(on_triton(local_settings, triton.url))) as triton_channel,
    ):
        local = embedding_pb2_grpc.EmbeddingServiceStub(local_channel)
        remote = embedding_pb2_grpc.EmbeddingServiceStub(triton_channel)
        before, _ = triton_stats(triton, SECOND)
        a, b = local.Embed(request, timeout=60), remote.Embed(request, timeout=60)
        assert (a.model_name, b.model_name) == (SECOND, SECOND)
        assert float(np.abs(vector(a.whole_image) - vector(b.whole_image)).max()) < 1e-4
        assert triton_stats(triton, SECOND)[0] == before + 1
        default = remote.Embed(
            embedding_pb2.EmbedRequest(image=request.image, whole_image=True), timeout=60
        )
        assert default.model_name == "embedder"
        assert list(default.whole_image.values) != list(b.whole_image.values)


def test_detections_through_triton_equal_the_in_process_ones(triton: TritonServer) -> None:
    local_settings = DetectionSettings.from_env()
    images = sorted(COCO.glob("*.jpg"))[:5]
    with (
        serving(DetectionService(local_settings)) as local_channel,
        serving(DetectionService(on_triton(local_settings, triton.url))) as triton_channel,
    ):
        local = detection_pb2_grpc.DetectionServiceStub(local_channel)
        remote = detection_pb2_grpc.DetectionServiceStub(triton_channel)
        found = 0
        for image in images:
            request = detection_pb2.DetectRequest(image=image.read_bytes())
            a, b = local.Detect(request, timeout=60), remote.Detect(request, timeout=60)
            assert [(d.label, d.class_id) for d in b.detections] == [
                (d.label, d.class_id) for d in a.detections
            ]
            for x, y in zip(a.detections, b.detections, strict=True):
                boxes = [(d.box.x0, d.box.y0, d.box.x1, d.box.y1) for d in (x, y)]
                np.testing.assert_allclose(boxes[1], boxes[0], atol=1e-3, rtol=0)
                assert y.score == pytest.approx(x.score, abs=1e-5)
            found += len(a.detections)
        assert found > 0


def test_triton_batches_concurrent_embedding_calls(triton: TritonServer) -> None:
    settings = on_triton(EmbeddingSettings.from_env(), triton.url)
    images = [(COREL / f"{i}.jpg").read_bytes() for i in range(500, 532)]
    with serving(EmbeddingService(settings)) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        before = triton_stats(triton, "embedder")
        with ThreadPoolExecutor(16) as pool:
            replies = list(
                pool.map(
                    lambda data: stub.Embed(
                        embedding_pb2.EmbedRequest(image=data, whole_image=True), timeout=60
                    ),
                    images,
                )
            )
        after = triton_stats(triton, "embedder")
    assert all(len(r.whole_image.values) == 1280 for r in replies)
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == len(images)
    # The service sends one request per call; Triton's dynamic batcher ran fewer batches.
    assert executions < inferences


# --- the whole stack on the Triton path ---------------------------------------------------------


@dataclass
class Stack:
    data_dir: Path
    env: dict[str, str]
    ports: dict[str, int]

    def loupe(self, *args: str, timeout: float = 300) -> str:
        result = subprocess.run(
            [LOUPE, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise AssertionError(
                f"loupe {' '.join(args[:2])} exited {result.returncode}\n"
                f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}"
            )
        return result.stdout

    def channel(self, service: str) -> grpc.Channel:
        state = StackState.load(self.data_dir)
        channel = open_blocking_channel(
            f"127.0.0.1:{self.ports[service]}",
            state.client_tls() if state is not None else TLSSettings(),
        )
        # The gateway takes calls with the stack's own key; the backends, the stack's client
        # certificate.
        return with_key(channel, self.env["LOUPE_API_KEY"]) if service == "gateway" else channel

    def health(self, service: str) -> int:
        with self.channel(service) as channel:
            return (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(), timeout=5)
                .status
            )


@pytest.fixture(scope="module")
def stack(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`loupe up` with both model services on Triton; the rest as usual."""
    data_dir = tmp_path_factory.mktemp("loupe-triton-stack")
    ports = free_ports(2 * len(SERVICES) + 1)
    env = dict(os.environ)
    grpc_ports = dict(zip(SERVICES, ports[: len(SERVICES)], strict=True))
    for i, name in enumerate(SERVICES):
        env[f"LOUPE_{name.upper()}_PORT"] = str(grpc_ports[name])
        env[f"LOUPE_{name.upper()}_METRICS_PORT"] = str(ports[len(SERVICES) + i])
    env["LOUPE_REDIS_PORT"] = str(ports[-1])
    env["LOUPE_GATEWAY"] = f"127.0.0.1:{grpc_ports['gateway']}"
    env["LOUPE_INFERENCE_BACKEND"] = "triton"
    env["LOUPE_TRITON_URL"] = triton.url
    # The test's Triton serves plaintext; the stack's own hops are mutual TLS as usual.
    env["LOUPE_TRITON_TLS"] = "off"
    running = Stack(data_dir, env, grpc_ports)
    running.loupe("up", "--data-dir", str(data_dir), timeout=300)
    env["LOUPE_API_KEY"] = local_api_key(data_dir)
    env["LOUPE_TLS_CA"] = str(local_tls.ca_path(data_dir))
    try:
        yield running
    finally:
        subprocess.run(
            [LOUPE, "down", "--data-dir", str(data_dir)], env=env, capture_output=True, timeout=60
        )


def test_gateway_indexes_and_searches_on_the_triton_path(
    stack: Stack, triton: TritonServer, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in STACK_ITEMS:
        (photos / f"{i}.jpg").symlink_to(COREL / f"{i}.jpg")
    embedded_before, _ = triton_stats(triton, "embedder")
    detected_before, _ = triton_stats(triton, "detector")

    lines = stack.loupe("index", str(photos), "--detect", "--json", "--quiet").splitlines()
    indexed = [json.loads(line) for line in lines]
    assert sum(1 for entry in indexed if entry.get("indexed")) == len(STACK_ITEMS)

    queries = [str(COREL / f"{i}.jpg") for i in (104, 305, 406)]  # not indexed themselves
    answers = [json.loads(line) for line in stack.loupe("search", *queries, "--json").splitlines()]
    for query, answer in zip(queries, answers, strict=True):
        top = [int(Path(r["item_id"]).stem) // 100 for r in answer["results"][:5]]
        assert top.count(int(Path(query).stem) // 100) >= 4, answer

    # Both models ran on Triton, for indexing and for the searches.
    assert triton_stats(triton, "embedder")[0] >= embedded_before + len(STACK_ITEMS) + 3
    assert triton_stats(triton, "detector")[0] >= detected_before + len(STACK_ITEMS)


def poll(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.25)
    return condition()


def test_triton_down_is_unavailable_naming_triton_and_the_stack_recovers(
    stack: Stack, triton: TritonServer
) -> None:
    image = (COREL / "321.jpg").read_bytes()  # never sent before: no cache can answer
    serving_status = health_pb2.HealthCheckResponse.SERVING
    triton.stop(kill=True)
    try:
        with stack.channel("embedding") as channel, pytest.raises(grpc.RpcError) as raised:
            embedding_pb2_grpc.EmbeddingServiceStub(channel).Embed(
                embedding_pb2.EmbedRequest(image=image, whole_image=True), timeout=30
            )
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Triton at" in raised.value.details()

        with stack.channel("detection") as channel, pytest.raises(grpc.RpcError) as raised:
            detection_pb2_grpc.DetectionServiceStub(channel).Detect(
                detection_pb2.DetectRequest(image=image), timeout=30
            )
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Triton at" in raised.value.details()

        with stack.channel("gateway") as channel, pytest.raises(grpc.RpcError) as raised:
            gateway_pb2_grpc.GatewayStub(channel).Search(
                gateway_pb2.SearchRequest(image=image, top_k=3), timeout=30
            )
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Triton" in raised.value.details()

        # Readiness follows Triton: load balancers stop sending work that cannot be done.
        assert poll(lambda: stack.health("embedding") != serving_status, 20)
        assert poll(lambda: stack.health("detection") != serving_status, 20)
    finally:
        triton.start()
    triton.wait_ready(MODELS)

    # The same service processes recover, without a restart.
    assert poll(lambda: stack.health("embedding") == serving_status, 30)
    assert poll(lambda: stack.health("detection") == serving_status, 30)
    with stack.channel("gateway") as channel:
        reply = gateway_pb2_grpc.GatewayStub(channel).Search(
            gateway_pb2.SearchRequest(image=image, top_k=3), timeout=60
        )
    assert reply.results and int(Path(reply.results[0].item_id).stem) // 100 == 3
