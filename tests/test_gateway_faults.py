"""The client layer under faults, against real gRPC servers on loopback: the gateway's
retries of idempotent calls only (counted on the server), its circuit breaker per backend,
round_robin over two replica processes of ranking (each one's /metrics counts its share, and
one is killed mid-traffic), degraded searches with detection or ranking stopped; and the model
services' Triton client balancing and retrying over two stand-in Tritons.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from PIL import Image
from prometheus_client import REGISTRY
from tritonclient.grpc import service_pb2, service_pb2_grpc

from loupe.v1 import (
    common_pb2,
    detection_pb2,
    detection_pb2_grpc,
    embedding_pb2,
    embedding_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    ranking_pb2,
    ranking_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
)
from services.common import vectors
from services.common.channels import TLSSettings, open_blocking_channel
from services.common.server import MetricsInterceptor
from services.common.triton_backend import triton_client
from services.gateway.backends import Backends, RequestError
from services.gateway.resilience import (
    CLOSED,
    HALF_OPEN,
    IDEMPOTENT_METHODS,
    OPEN,
    BreakerOpen,
    CircuitBreaker,
    service_config,
)
from services.gateway.settings import GatewaySettings
from services.ranking.service import RankingService
from services.ranking.settings import RankingSettings
from tests.integration.stacks import metric_value
from tests.support import free_ports, running_redis, serving

ROOT = Path(__file__).resolve().parents[1]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
READS = ("Search", "Lookup", "Stats", "ListCatalogs")
WRITES = ("Upsert", "UpsertItems", "Delete", "DropCatalog", "UpdateItem", "Augment")


def gateway_settings(monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> GatewaySettings:
    """The gateway's defaults (no keys, plaintext, no cache) with these fields."""
    monkeypatch.setenv("LOUPE_AUTH", "open")
    monkeypatch.setenv("LOUPE_TLS", "off")
    defaults = GatewaySettings.from_env()
    overrides.setdefault("redis_url", "")
    overrides.setdefault("retry_initial_backoff_seconds", 0.01)
    overrides.setdefault("retry_max_backoff_seconds", 0.05)
    return dataclasses.replace(defaults, **overrides)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@asynccontextmanager
async def grpc_server(
    add: Callable[[grpc.aio.Server], None], name: str, port: int = 0
) -> AsyncIterator[int]:
    """A gRPC server on loopback in the running loop, counted by the services' own
    MetricsInterceptor under `name`; its port."""
    server = grpc.aio.server(interceptors=[MetricsInterceptor(name)])
    add(server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield bound
    finally:
        await server.stop(None)


# ---- what is retried ---------------------------------------------------------------------


def test_only_idempotent_methods_have_a_retry_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    config = service_config(gateway_settings(monkeypatch))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method_config,) = config["methodConfig"]
    named = {(n["service"], n["method"]) for n in method_config["name"]}
    assert ("loupe.v1.RetrievalService", "Lookup") in named
    assert not {m for s, m in named if s == "loupe.v1.RetrievalService"} & set(WRITES)
    assert named == {(s, m) for s, methods in IDEMPOTENT_METHODS.items() for m in methods}
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert method_config["retryPolicy"]["maxAttempts"] == 3
    assert "methodConfig" not in service_config(gateway_settings(monkeypatch, retry_attempts=1))


class Retrieval(retrieval_pb2_grpc.RetrievalServiceServicer):
    """Fails every call with `code`, except that Lookup answers once `lookups_failing` calls
    have failed; counts calls by method."""

    def __init__(self, code: grpc.StatusCode, lookups_failing: int = 1_000_000) -> None:
        self.code = code
        self.lookups_failing = lookups_failing
        self.calls: Counter[str] = Counter()


def _failing(name: str) -> Callable[..., Any]:
    async def method(self: Retrieval, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.calls[name] += 1
        if name == "Lookup" and self.calls[name] > self.lookups_failing:
            return retrieval_pb2.LookupResponse()
        await context.abort(self.code, f"{name} failed on purpose")

    return method


for _name in (*READS, *WRITES):
    setattr(Retrieval, _name, _failing(_name))

REQUESTS: dict[str, Any] = {
    "Search": retrieval_pb2.RetrievalSearchRequest(limit=1),
    "Lookup": retrieval_pb2.LookupRequest(item_id="a"),
    "Stats": retrieval_pb2.StatsRequest(),
    "ListCatalogs": retrieval_pb2.RetrievalListCatalogsRequest(),
    "Upsert": retrieval_pb2.UpsertRequest(),
    "UpsertItems": retrieval_pb2.UpsertItemsRequest(),
    "Delete": retrieval_pb2.DeleteItemRequest(item_id="a"),
    "DropCatalog": retrieval_pb2.RetrievalDropCatalogRequest(catalog="x"),
    "UpdateItem": retrieval_pb2.UpdateItemRequest(item_id="a"),
    "Augment": retrieval_pb2.AugmentRequest(),
}


def call_every_method(
    monkeypatch: pytest.MonkeyPatch, fake: Retrieval, name: str
) -> dict[str, grpc.StatusCode | None]:
    """Each method once through the gateway's client; the code each ended with."""

    async def scenario() -> dict[str, grpc.StatusCode | None]:
        add = lambda server: retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(  # noqa: E731
            fake, server
        )
        async with grpc_server(add, name) as port:
            address = f"127.0.0.1:{port}"
            backends = Backends(
                gateway_settings(
                    monkeypatch,
                    retrieval_address=address,
                    retrieval_writer_address=address,
                    breaker_failures=0,
                )
            )
            codes: dict[str, grpc.StatusCode | None] = {}
            try:
                for method, request in REQUESTS.items():
                    reader = method in READS
                    stub = backends.retrieval if reader else backends.retrieval_writer
                    try:
                        await backends.call(
                            "retrieval" if reader else "retrieval writer",
                            getattr(stub, method),
                            request,
                            None,
                        )
                        codes[method] = None
                    except RequestError as error:
                        codes[method] = error.code
            finally:
                await backends.close()
            return codes

    return asyncio.run(scenario())


def test_reads_are_retried_on_unavailable_and_writes_never(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = Retrieval(UNAVAILABLE, lookups_failing=2)
    codes = call_every_method(monkeypatch, fake, "retrieval-retries")
    # The third attempt of Lookup answers: the caller never sees the two failures.
    assert codes.pop("Lookup") is None and fake.calls["Lookup"] == 3
    assert set(codes.values()) == {UNAVAILABLE}
    assert {m: fake.calls[m] for m in READS if m != "Lookup"} == {
        "Search": 3,
        "Stats": 3,
        "ListCatalogs": 3,
    }
    assert {m: fake.calls[m] for m in WRITES} == dict.fromkeys(WRITES, 1)
    # The server tells retried attempts apart by gRPC's grpc-previous-rpc-attempts header.
    retried = {
        m: sample("loupe_grpc_retried_requests_total", service="retrieval-retries", method=m)
        for m in (*READS, *WRITES)
    }
    assert retried == {**dict.fromkeys(READS, 2.0), **dict.fromkeys(WRITES, 0.0)}


def test_resource_exhausted_and_caller_errors_are_not_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT):
        fake = Retrieval(code)
        codes = call_every_method(monkeypatch, fake, f"retrieval-{code.name.lower()}")
        assert set(codes.values()) == {code}
        assert set(fake.calls.values()) == {1}


# ---- the breaker -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def state_of(backend: str) -> float:
    return sample("loupe_gateway_backend_breaker_state", backend=backend)


def test_the_breaker_opens_after_failures_in_a_row_and_half_opens_after_the_cool_down() -> None:
    clock = Clock()
    breaker = CircuitBreaker("unit", failures=3, open_seconds=10, half_open_calls=1, clock=clock)
    for _ in range(2):
        assert breaker.admit() is False
        breaker.failed(False, "UNAVAILABLE: down")
    breaker.succeeded(breaker.admit())  # a success in between starts the count again
    for _ in range(3):
        breaker.failed(breaker.admit(), "UNAVAILABLE: down")
    assert breaker.state == OPEN and state_of("unit") == 2
    with pytest.raises(BreakerOpen, match="after 3 failed calls in a row.*10.0 s more"):
        breaker.admit()
    rejected = sample("loupe_gateway_backend_breaker_rejections_total", backend="unit")
    assert rejected == 1

    clock.now += 10
    trial = breaker.admit()
    assert trial is True and breaker.state == HALF_OPEN and state_of("unit") == 1
    with pytest.raises(BreakerOpen, match="half-open"):
        breaker.admit()  # one trial at a time
    breaker.failed(trial, "UNAVAILABLE: still down")
    assert breaker.state == OPEN  # the trial failed: another cool-down
    with pytest.raises(BreakerOpen, match="still down"):
        breaker.admit()

    clock.now += 10
    breaker.succeeded(breaker.admit())
    assert breaker.state == CLOSED and state_of("unit") == 0
    assert sample(
        "loupe_gateway_backend_breaker_transitions_total", backend="unit", state="open"
    ) == (2)


def test_a_breaker_with_no_threshold_never_opens() -> None:
    breaker = CircuitBreaker("never", failures=0, open_seconds=1)
    for _ in range(100):
        breaker.failed(breaker.admit(), "UNAVAILABLE")
    assert breaker.state == CLOSED


class Ranking(RankingService):
    """The real ranking, which fails (UNAVAILABLE) when told to, and can hold its calls."""

    def __init__(self) -> None:
        super().__init__(RankingSettings.from_env())
        self.calls = 0
        self.failing = False
        self.gate: asyncio.Event | None = None

    async def Describe(
        self, request: common_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> ranking_pb2.RankingInfo:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.failing:
            await context.abort(UNAVAILABLE, "ranking is down on purpose")
        return await super().Describe(request, context)


def test_the_breaker_fails_calls_fast_and_lets_one_trial_through_after_the_cool_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ranking = Ranking()

    async def scenario() -> None:
        add = lambda server: ranking_pb2_grpc.add_RankingServiceServicer_to_server(  # noqa: E731
            ranking, server
        )
        async with grpc_server(add, "ranking-breaker") as port:
            backends = Backends(
                gateway_settings(
                    monkeypatch,
                    ranking_address=f"127.0.0.1:{port}",
                    retry_attempts=2,
                    breaker_failures=3,
                    breaker_open_seconds=0.5,
                )
            )

            async def describe() -> ranking_pb2.RankingInfo:
                return await backends.call(
                    "ranking", backends.ranking.Describe, common_pb2.DescribeRequest(), None
                )

            try:
                await describe()
                ranking.failing = True
                for _ in range(3):
                    with pytest.raises(RequestError, match="ranking is down on purpose"):
                        await describe()
                assert ranking.calls == 1 + 3 * 2  # each failed call was tried twice
                assert state_of("ranking") == 2
                with pytest.raises(RequestError) as error:
                    await describe()
                assert error.value.code == UNAVAILABLE and error.value.backend == "ranking"
                assert f"ranking service at 127.0.0.1:{port}: circuit breaker open" in (
                    error.value.message
                )
                assert ranking.calls == 7  # failed at once: the server saw nothing

                await asyncio.sleep(0.6)
                ranking.failing = False
                ranking.gate = asyncio.Event()
                calls = [asyncio.create_task(describe()) for _ in range(3)]
                await asyncio.sleep(0.2)
                assert ranking.calls == 8  # one trial reached ranking
                assert state_of("ranking") == 1
                ranking.gate.set()
                outcomes = await asyncio.gather(*calls, return_exceptions=True)
                assert isinstance(outcomes[0], ranking_pb2.RankingInfo)
                assert all("half-open" in str(o) for o in outcomes[1:])
                assert state_of("ranking") == 0
                ranking.gate = None
                await describe()
            finally:
                await backends.close()

    asyncio.run(scenario())


# ---- replicas: round_robin, and one killed mid-traffic -----------------------------------


@contextmanager
def ranking_replica(port: int, metrics_port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m services.ranking` on loopback, as a replica of a deployment runs it."""
    env = {
        **os.environ,
        "LOUPE_TLS": "off",
        "LOUPE_RANKING_PORT": str(port),
        "LOUPE_RANKING_METRICS_PORT": str(metrics_port),
        "LOUPE_LOG_LEVEL": "WARNING",
    }
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.ranking"],
            env=env,
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        with open_blocking_channel(f"127.0.0.1:{port}", TLSSettings()) as channel:
            while True:
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=2
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "ranking replica did not start"
                time.sleep(0.2)
        yield process
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
            process.kill()
        process.wait()


def ranked_calls(metrics_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        "ok": metric_value(text, "loupe_grpc_requests_total", method="Rank", code="OK"),
        "retried": metric_value(text, "loupe_grpc_retried_requests_total", method="Rank"),
    }


def rank_request() -> ranking_pb2.RankRequest:
    rng = np.random.default_rng(7)
    matrix = vectors.unit_rows(rng.normal(size=(20, 16)).astype(np.float32))
    return ranking_pb2.RankRequest(
        query=vectors.to_vector(matrix[0]),
        candidates=[retrieval_pb2.Candidate(item_id=f"item-{i}", ann_score=0.5) for i in range(20)],
        vectors=vectors.pack(matrix),
        top_k=5,
    )


async def rank(backends: Backends) -> ranking_pb2.RankResponse:
    return await backends.call("ranking", backends.ranking.Rank, rank_request(), None)


async def warm_up(backends: Backends) -> None:
    """Until ranking answers, and a moment for every replica to connect (round_robin connects
    to every address at once)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            await rank(backends)
            break
        except RequestError:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)


def test_calls_are_spread_over_every_replica_and_survive_one_killed_mid_traffic(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ports = free_ports(4)
    replicas, metrics = ports[:2], ports[2:]
    with ExitStack() as stack:
        first, _ = (
            stack.enter_context(ranking_replica(p, m, tmp_path / f"ranking-{p}.log"))
            for p, m in zip(replicas, metrics, strict=True)
        )
        # One name for both, as DNS gives a headless Service's pods.
        target = f"ipv4:127.0.0.1:{replicas[0]},127.0.0.1:{replicas[1]}"
        calls = 200
        counts: dict[str, Any] = {}

        async def share(lb_policy: str) -> list[float]:
            """Calls each replica answered of `calls` sent one after another."""
            backends = Backends(
                gateway_settings(monkeypatch, ranking_address=target, lb_policy=lb_policy)
            )
            try:
                await warm_up(backends)
                before = [ranked_calls(m)["ok"] for m in metrics]
                for _ in range(calls):
                    assert len((await rank(backends)).hits) == 5
                return [ranked_calls(m)["ok"] - b for m, b in zip(metrics, before, strict=True)]
            finally:
                await backends.close()

        async def scenario() -> None:
            counts["pinned"] = await share("pick_first")
            counts["shares"] = await share("round_robin")
            backends = Backends(gateway_settings(monkeypatch, ranking_address=target))
            try:
                await warm_up(backends)

                # The first replica stops answering with calls in flight on it, then dies:
                # those calls are retried on the second, and no caller sees a failure.
                os.kill(first.pid, signal.SIGSTOP)
                retried_before = ranked_calls(metrics[1])["retried"]
                in_flight = [asyncio.create_task(rank(backends)) for _ in range(40)]
                await asyncio.sleep(1.0)
                assert sum(task.done() for task in in_flight) <= 25  # half wait on the first
                os.kill(first.pid, signal.SIGKILL)
                replies = await asyncio.gather(*in_flight, return_exceptions=True)
                counts["failed_after_kill"] = [r for r in replies if isinstance(r, Exception)]
                counts["retried"] = ranked_calls(metrics[1])["retried"] - retried_before
                for _ in range(20):
                    await rank(backends)
            finally:
                await backends.close()

        asyncio.run(scenario())

    shares, pinned = counts["shares"], counts["pinned"]
    print(
        f"\n{calls} calls over 2 ranking replicas: round_robin {shares}, pick_first {pinned}; "
        f"one replica stopped then killed under 40 calls in flight: "
        f"{len(counts['failed_after_kill'])} failed, {counts['retried']:.0f} retried on the other"
    )
    assert sum(shares) == calls and min(shares) >= 0.4 * calls, shares
    assert sorted(pinned) == [0, calls]  # one pinned connection: the other replica idles
    assert counts["failed_after_kill"] == []
    assert counts["retried"] >= 10, counts


# ---- degraded searches -------------------------------------------------------------------

DIM = 8


def _vector(seed: int) -> np.ndarray:
    return vectors.unit_rows(np.random.default_rng(seed).normal(size=(1, DIM)))[0].astype(
        np.float32
    )


class Detection(detection_pb2_grpc.DetectionServiceServicer):
    async def Describe(
        self, request: common_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelInfo:
        return common_pb2.ModelInfo(model_name="detector", model_version="1")

    async def Detect(
        self, request: detection_pb2.DetectRequest, context: grpc.aio.ServicerContext
    ) -> detection_pb2.DetectResponse:
        box = common_pb2.Box(x0=0, y0=0, x1=48, y1=48)
        return detection_pb2.DetectResponse(
            detections=[common_pb2.Detection(box=box, label="thing", score=0.9)]
        )


class Embedding(embedding_pb2_grpc.EmbeddingServiceServicer):
    async def Describe(
        self, request: common_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelInfo:
        return common_pb2.ModelInfo(model_name="embedder", model_version="1", dimension=DIM)

    async def Embed(
        self, request: embedding_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> embedding_pb2.EmbedResponse:
        seed = len(request.image)
        return embedding_pb2.EmbedResponse(
            whole_image=vectors.to_vector(_vector(seed)),
            regions=[vectors.to_vector(_vector(seed + 1)) for _ in request.regions],
            image_width=64,
            image_height=64,
        )


class Catalogue(retrieval_pb2_grpc.RetrievalServiceServicer):
    """Twenty stored items; candidates by cosine, as retrieval returns them."""

    def __init__(self) -> None:
        self.ids = [f"item-{i:02d}" for i in range(20)]
        self.matrix = np.stack([_vector(100 + i) for i in range(20)])

    async def Search(
        self, request: retrieval_pb2.RetrievalSearchRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.RetrievalSearchResponse:
        similarity = self.matrix @ vectors.as_array(request.query)
        order = np.argsort(-similarity, kind="stable")[: request.limit]
        return retrieval_pb2.RetrievalSearchResponse(
            candidates=[
                retrieval_pb2.Candidate(item_id=self.ids[i], ann_score=float(similarity[i]))
                for i in order
            ],
            vectors=vectors.pack(self.matrix[order]),
        )

    async def Lookup(
        self, request: retrieval_pb2.LookupRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.LookupResponse:
        return retrieval_pb2.LookupResponse()

    async def MigrateCatalog(
        self, request: retrieval_pb2.MigrateCatalogRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.CatalogRecord:
        # Bound to the stand-in embedder, so searches embed with it.
        return retrieval_pb2.CatalogRecord(
            catalog=request.catalog,
            live=retrieval_pb2.ModelBinding(embedder="embedder/1", dimension=DIM),
        )


@dataclasses.dataclass
class Backend:
    """A stand-in backend, served by tests.support.serving with health SERVING."""

    name: str
    servicer: Any
    add: Callable[[Any, grpc.aio.Server], None]
    grpc_services: list[str] = dataclasses.field(default_factory=list)

    def register(self, server: grpc.aio.Server) -> None:
        self.add(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return []

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


class Gateway:
    """GatewayService, built in the loop that serves it (its clients bind to that loop)."""

    name = "gateway"
    grpc_services: list[str] = []

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.service: Any = None

    def register(self, server: grpc.aio.Server) -> None:
        from services.gateway.service import GatewayService

        self.service = GatewayService(self.settings)
        self.service.register(server)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return []

    async def start(self) -> None:
        await self.service.start()

    async def close(self) -> None:
        await self.service.close()


def image(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (shade, 80, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_searches_are_degraded_not_failed_while_detection_or_ranking_is_down(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ports = dict(
        zip(("detection", "embedding", "retrieval", "ranking"), free_ports(4), strict=True)
    )
    backends = {
        "detection": Backend(
            "detection", Detection(), detection_pb2_grpc.add_DetectionServiceServicer_to_server
        ),
        "embedding": Backend(
            "embedding", Embedding(), embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server
        ),
        "retrieval": Backend(
            "retrieval", Catalogue(), retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server
        ),
        "ranking": Backend(
            "ranking",
            RankingService(RankingSettings.from_env()),
            ranking_pb2_grpc.add_RankingServiceServicer_to_server,
        ),
    }
    degraded_before = {
        reason: sample("loupe_gateway_degraded_responses_total", reason=reason)
        for reason in ("detection", "ranking")
    }
    with ExitStack() as running:
        redis_port = running.enter_context(running_redis(tmp_path))
        up = {
            name: running.enter_context(ExitStack()) for name in ports
        }  # each backend's own stack, closed to stop it
        for name, backend in backends.items():
            up[name].enter_context(serving(backend, ports[name]))
        settings = gateway_settings(
            monkeypatch,
            redis_url=f"redis://127.0.0.1:{redis_port}/0",
            breaker_failures=2,
            breaker_open_seconds=60,
            **{f"{name}_address": f"127.0.0.1:{port}" for name, port in ports.items()},
            retrieval_writer_address=f"127.0.0.1:{ports['retrieval']}",
        )
        channel = running.enter_context(serving(Gateway(settings)))
        gateway = gateway_pb2_grpc.GatewayStub(channel)

        def search(shade: int) -> gateway_pb2.SearchResponse:
            request = gateway_pb2.SearchRequest(image=image(shade), objects=True, top_k=5)
            return gateway.Search(request, timeout=30)

        full = search(1)
        assert not full.degraded and len(full.results) == 5 and len(full.objects) == 1
        assert search(1).cached

        up["detection"].close()  # detection stops
        for _ in range(4):  # the last two find its breaker open
            answer = search(2)
            assert answer.degraded and list(answer.degraded_reasons) == ["detection"]
            assert len(answer.results) == 5 and not answer.objects and not answer.cached
        # The whole-image results are those of a search without objects.
        plain = gateway.Search(gateway_pb2.SearchRequest(image=image(2), top_k=5), timeout=30)
        assert not plain.degraded
        assert [h.item_id for h in answer.results] == [h.item_id for h in plain.results]
        # A crop search loses only the label detection would give it, and says so.
        crop = gateway.Search(
            gateway_pb2.SearchRequest(
                image=image(2), crop=common_pb2.Box(x0=0, y0=0, x1=40, y1=40), top_k=5
            ),
            timeout=30,
        )
        assert crop.degraded and list(crop.degraded_reasons) == ["detection"]
        assert len(crop.results) == 5 and not crop.cached
        assert all(h.parts.label == 0 for h in crop.results)
        # A cached full answer is still a full answer.
        assert search(1).cached and not search(1).degraded

        up["ranking"].close()  # ranking stops too
        answer = gateway.Search(gateway_pb2.SearchRequest(image=image(3), top_k=5), timeout=30)
        assert answer.degraded and list(answer.degraded_reasons) == ["ranking"]
        # Retrieval's order, each scored by its cosine with the query.
        catalogue = backends["retrieval"].servicer
        similarity = catalogue.matrix @ _vector(len(image(3)))
        order = np.argsort(-similarity, kind="stable")[:5]
        assert [hit.item_id for hit in answer.results] == [catalogue.ids[i] for i in order]
        assert [hit.score for hit in answer.results] == pytest.approx(
            similarity[order].tolist(), abs=2e-3
        )  # the vectors travel as float16
        # Detection and ranking down: both said.
        both = search(4)
        assert list(both.degraded_reasons) == ["detection", "ranking"]

        # An outage of retrieval or embedding is no degraded answer: there is none.
        up["embedding"].close()
        with pytest.raises(grpc.RpcError) as error:
            search(5)
        assert error.value.code() == UNAVAILABLE and "embedding service at" in (
            error.value.details() or ""
        )

    degraded = {
        reason: sample("loupe_gateway_degraded_responses_total", reason=reason) - before
        for reason, before in degraded_before.items()
    }
    assert degraded == {"detection": 6, "ranking": 2}


def test_the_cli_says_an_answer_is_degraded() -> None:
    from services.cli.output import search_json, search_text

    response = gateway_pb2.SearchResponse(degraded=True, degraded_reasons=["detection"])
    response.results.add(item_id="a", score=0.5)
    text = search_text("q.jpg", response, objects=True)
    assert "degraded: detection unavailable: no objects searched" in text.splitlines()[0]
    assert "no objects detected" not in text
    assert json.loads(json.dumps(search_json("q.jpg", response, True)))["degraded"] == ["detection"]
    assert "degraded" not in search_json("q.jpg", gateway_pb2.SearchResponse(), False)


# ---- the model services' Triton client -------------------------------------------------


class Triton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Stands in for one Triton pod: counts liveness calls, and fails the first `failing`."""

    def __init__(self, failing: int = 0) -> None:
        self.calls = 0
        self.failing = failing

    async def ServerLive(
        self, request: service_pb2.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ServerLiveResponse:
        self.calls += 1
        if self.calls <= self.failing:
            await context.abort(UNAVAILABLE, "restarting")
        return service_pb2.ServerLiveResponse(live=True)


def test_the_triton_client_balances_over_every_triton_and_retries_unavailable() -> None:
    tritons = [Triton(failing=1), Triton(failing=1)]

    async def scenario() -> list[bool]:
        async with (
            grpc_server(lambda s: service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
                tritons[0], s), "triton-0") as first,
            grpc_server(lambda s: service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
                tritons[1], s), "triton-1") as second,
        ):  # fmt: skip
            client = triton_client(f"ipv4:127.0.0.1:{first},127.0.0.1:{second}", TLSSettings())
            try:
                return [await client.is_server_live(client_timeout=10) for _ in range(40)]
            finally:
                await client.close()

    answers = asyncio.run(scenario())
    assert all(answers)  # each Triton's first call failed, and was retried
    calls = [t.calls for t in tritons]
    assert sum(calls) == 40 + 2 and min(calls) >= 15, calls  # both got their share
