"""Model lifecycle through the gateway, with the real embedding service serving two models
(embedder and embedder_gem3), real retrieval (milvus-lite) and ranking, over real gRPC.

The gateway embeds and searches with a catalogue's live embedder, writes every bound model
during a migration (dual writes), writes re-index items into the new collection only while
the live item is unchanged, and follows a switch at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health as health_aio
from grpc_health.v1 import health_pb2_grpc
from prometheus_client import REGISTRY

from loupe.v1 import (
    common_pb2,
    detection_pb2_grpc,
    embedding_pb2,
    embedding_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    ranking_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
)
from services.common.inference import REPOSITORY_IN_CHECKOUT
from services.embedding.service import EmbeddingService
from services.embedding.settings import EmbeddingSettings
from services.ranking.service import RankingService
from services.ranking.settings import RankingSettings
from services.retrieval.service import RetrievalService
from tests.support import free_ports, serving
from tests.test_gateway_faults import Backend, Detection, Gateway, gateway_settings
from tests.test_model_services import COREL, corel
from tests.test_retrieval_service import settings_for

OLD, NEW = "embedder/1", "embedder_gem3/1"
Action = retrieval_pb2.MigrateCatalogRequest.Action

pytestmark = pytest.mark.skipif(
    not (REPOSITORY_IN_CHECKOUT / "embedder_gem3" / "1" / "model.onnx").is_file()
    or not (REPOSITORY_IN_CHECKOUT / "embedder" / "1" / "model.onnx").is_file()
    or not COREL.is_dir(),
    reason="needs models/embedder and models/embedder_gem3 (tools/setup.sh builds both) and "
    "the Corel images",
)


class Healthy:
    """A real service as server.py runs it, with the health service the gateway waits for."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.name = service.name
        self.grpc_services: list[str] = []

    def register(self, server: grpc.aio.Server) -> None:
        self.service.register(server)
        health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return []

    async def start(self) -> None:
        await self.service.start()

    async def close(self) -> None:
        await self.service.close()


@dataclasses.dataclass
class Stack:
    gateway: gateway_pb2_grpc.GatewayStub
    embedding: embedding_pb2_grpc.EmbeddingServiceStub
    retrieval: retrieval_pb2_grpc.RetrievalServiceStub


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data = tmp_path_factory.mktemp("lifecycle-gateway")
    with pytest.MonkeyPatch.context() as patch, ExitStack() as running:
        patch.setenv("LOUPE_EMBEDDING_EXTRA_MODELS", "embedder_gem3")
        patch.setenv("LOUPE_INFERENCE_THREADS", "1")
        ports = dict(
            zip(("detection", "embedding", "retrieval", "ranking"), free_ports(4), strict=True)
        )
        retrieval_settings = dataclasses.replace(settings_for(Path(data)), dim=1280)
        services: dict[str, Any] = {
            "detection": Backend(
                "detection", Detection(), detection_pb2_grpc.add_DetectionServiceServicer_to_server
            ),
            "embedding": Healthy(EmbeddingService(EmbeddingSettings.from_env())),
            "retrieval": Healthy(RetrievalService(retrieval_settings)),
            "ranking": Backend(
                "ranking",
                RankingService(RankingSettings.from_env()),
                ranking_pb2_grpc.add_RankingServiceServicer_to_server,
            ),
        }
        channels = {
            name: running.enter_context(serving(service, ports[name]))
            for name, service in services.items()
        }
        settings = gateway_settings(
            patch,
            **{f"{name}_address": f"127.0.0.1:{port}" for name, port in ports.items()},
            retrieval_writer_address=f"127.0.0.1:{ports['retrieval']}",
        )
        gateway = running.enter_context(serving(Gateway(settings)))
        yield Stack(
            gateway_pb2_grpc.GatewayStub(gateway),
            embedding_pb2_grpc.EmbeddingServiceStub(channels["embedding"]),
            retrieval_pb2_grpc.RetrievalServiceStub(channels["retrieval"]),
        )


def test_the_embedding_service_serves_two_models(stack: Stack) -> None:
    info = stack.embedding.Describe(common_pb2.DescribeRequest())
    assert (info.model_name, info.model_version) == ("embedder", "1")
    served = [(m.model_name, m.model_version, m.dimension) for m in info.served]
    assert served == [("embedder", "1", 1280), ("embedder_gem3", "1", 1280)]
    assert info.preprocessing.startswith("RGB 224x224 stretch")
    image = corel(0)
    default = stack.embedding.Embed(embedding_pb2.EmbedRequest(image=image, whole_image=True))
    gem = stack.embedding.Embed(
        embedding_pb2.EmbedRequest(image=image, whole_image=True, model="embedder_gem3/1")
    )
    assert (default.model_name, gem.model_name) == ("embedder", "embedder_gem3")
    assert list(default.whole_image.values) != list(gem.whole_image.values)
    with pytest.raises(grpc.RpcError) as error:
        stack.embedding.Embed(
            embedding_pb2.EmbedRequest(image=image, whole_image=True, model="nope")
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "embedder/1, embedder_gem3/1" in str(error.value.details())
    for embedder, default_model in ((OLD, "true"), (NEW, "false")):
        labels = {"embedder": embedder, "default": default_model}
        assert REGISTRY.get_sample_value("loupe_embedding_model_info", labels) == 1


def index(stack: Stack, item_id: str, image: int, **fields: Any) -> gateway_pb2.IndexResponse:
    return stack.gateway.Index(
        gateway_pb2.IndexRequest(
            item_id=item_id,
            image=corel(image),
            catalog="shop",
            source_uri=f"/c/{image}.jpg",
            **fields,
        )
    )


def listed(stack: Stack, model: str) -> dict[str, str]:
    items = stack.gateway.ListItems(retrieval_pb2.ListItemsRequest(catalog="shop", model=model))
    return {item.item_id: item.model_version for item in items.items}


def test_a_migration_through_the_gateway(stack: Stack) -> None:
    for k, image in enumerate((100, 101, 300)):
        assert index(stack, f"item-{k}", image).model_version == OLD
    (shop,) = [
        c
        for c in stack.gateway.ListCatalogs(gateway_pb2.ListCatalogsRequest()).catalogs
        if c.name == "shop"
    ]
    assert (shop.embedder, shop.next_embedder) == (OLD, "")
    assert shop.preprocessing.startswith("RGB 224x224")
    query = gateway_pb2.SearchRequest(image=corel(102), catalog="shop", top_k=3)
    before = stack.gateway.Search(query)
    assert before.model_version == OLD

    record = stack.gateway.MigrateCatalog(
        retrieval_pb2.MigrateCatalogRequest(
            catalog="shop",
            action=Action.BEGIN,
            binding=retrieval_pb2.ModelBinding(embedder=NEW, dimension=1280),
        )
    )
    assert record.next.embedder == NEW
    # Written meanwhile: both models, each into its own collection.
    during = index(stack, "during", 102)
    assert during.indexed and during.model_version == OLD
    assert listed(stack, NEW) == {"during": NEW}
    assert listed(stack, OLD)["during"] == OLD
    # Re-index writes: the new model only, and only while the live item is unchanged.
    live_hash = {
        i.item_id: i.content_hash
        for i in stack.gateway.ListItems(retrieval_pb2.ListItemsRequest(catalog="shop")).items
    }
    for k, image in enumerate((100, 101, 300)):
        again = index(
            stack,
            f"item-{k}",
            image,
            model="embedder_gem3",
            if_live_content_hash=live_hash[f"item-{k}"],
        )
        assert again.indexed and again.model_version == NEW
    stale = index(stack, "item-0", 100, model="embedder_gem3", if_live_content_hash="0" * 64)
    assert (stale.indexed, stale.skipped) == (False, "changed")
    assert set(listed(stack, NEW)) == set(listed(stack, OLD))
    assert stack.gateway.Search(query).model_version == OLD  # live until the switch
    other = gateway_pb2.SearchRequest(image=corel(105), catalog="shop", top_k=4)
    pre_switch = stack.gateway.Search(other)

    stack.gateway.MigrateCatalog(
        retrieval_pb2.MigrateCatalogRequest(catalog="shop", action=Action.SWITCH)
    )
    after = stack.gateway.Search(query)
    assert after.model_version == NEW
    assert after.results[0].item_id == "during"  # the same photo, found by the new model
    (shop,) = [
        c
        for c in stack.gateway.ListCatalogs(gateway_pb2.ListCatalogsRequest()).catalogs
        if c.name == "shop"
    ]
    assert (shop.embedder, shop.previous_embedder) == (NEW, OLD)

    stack.gateway.MigrateCatalog(
        retrieval_pb2.MigrateCatalogRequest(catalog="shop", action=Action.ROLLBACK)
    )
    rolled_back = stack.gateway.Search(other)
    assert rolled_back.model_version == OLD
    # The old answers, as they were just before the switch.
    assert [(h.item_id, round(h.score, 4)) for h in rolled_back.results] == [
        (h.item_id, round(h.score, 4)) for h in pre_switch.results
    ]
    assert len(rolled_back.results) == 4


def test_a_catalogue_bound_to_a_model_not_served_is_refused(stack: Stack) -> None:
    item = retrieval_pb2.StoredItem(item_id="x", content_hash="h", model_version="vit/7")
    item.objects.add(object_index=0, vector=common_pb2.Vector(values=[1.0] * 1280))
    stack.retrieval.Upsert(retrieval_pb2.UpsertRequest(item=item, catalog="elsewhere"))
    with pytest.raises(grpc.RpcError) as error:
        stack.gateway.Search(gateway_pb2.SearchRequest(image=corel(1), catalog="elsewhere"))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    message = str(error.value.details())
    assert "vit/7" in message and OLD in message and NEW in message
    with pytest.raises(grpc.RpcError) as error:
        index_elsewhere = gateway_pb2.IndexRequest(item_id="y", image=corel(1), catalog="elsewhere")
        stack.gateway.Index(index_elsewhere)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "vit/7" in str(error.value.details())
