"""The embedding service: one image, its whole view and any regions, to unit vectors."""

from __future__ import annotations

import asyncio
import logging

import grpc
import numpy as np

from loupe.v1 import common_pb2, embedding_pb2, embedding_pb2_grpc
from services.common.images import InvalidImage, PixelBox, release_memory_after
from services.common.inference import (
    LoadedModel,
    ServesModel,
    infer_or_abort,
    load_model_spec,
)
from services.embedding.preprocess import RegionError, StretchPreprocessing, prepare_batch
from services.embedding.settings import EmbeddingSettings

log = logging.getLogger(__name__)


class EmbeddingService(ServesModel, embedding_pb2_grpc.EmbeddingServiceServicer):
    name = "embedding"
    grpc_services = [embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name]

    def __init__(self, settings: EmbeddingSettings) -> None:
        """Reads and checks the model's config, so that a bad one fails at start-up as a
        configuration error; the model itself loads in `start`."""
        self.settings = settings
        self.spec = load_model_spec(
            settings.model_repository, settings.model_name, settings.model_version
        )
        self.preprocess = StretchPreprocessing.from_spec(self.spec)
        # max_batch_size 0 means the model takes exactly one image, batch axis included.
        self.batch_size = max(1, self.spec.max_batch_size)
        self.model = LoadedModel(self.spec, settings.inference)

    def register(self, server: grpc.aio.Server) -> None:
        embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server(self, server)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return []

    async def Describe(
        self, request: common_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelInfo:
        return common_pb2.ModelInfo(
            model_name=self.spec.name,
            model_version=self.spec.version,
            dimension=self.spec.outputs[0].dims[-1],
        )

    async def Embed(
        self, request: embedding_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> embedding_pb2.EmbedResponse:
        backend = self.model.backend
        if backend is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"{self.name}: {self.model.not_loaded_reason()}"
            )
        assert backend is not None
        if not request.whole_image and not request.regions:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "nothing to embed: set whole_image, or give at least one region",
            )
        if len(request.regions) > self.settings.max_regions:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(request.regions)} regions: at most {self.settings.max_regions} per request",
            )

        try:
            size, tensors = await asyncio.to_thread(self._prepare, request)
        except RegionError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except InvalidImage as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"image: {error}")

        input_name, output_name = self.spec.inputs[0].name, self.spec.outputs[0].name
        vectors = []
        for start in range(0, len(tensors), self.batch_size):
            batch = tensors[start : start + self.batch_size]
            outputs = await infer_or_abort(context, backend, {input_name: batch}, self.name)
            vectors.append(outputs[output_name])
        embeddings = _l2_normalise(np.concatenate(vectors))

        response = embedding_pb2.EmbedResponse(
            image_width=size[0],
            image_height=size[1],
            model_name=self.spec.name,
            model_version=self.spec.version,
        )
        if request.whole_image:
            response.whole_image.values.extend(embeddings[0].tolist())
            embeddings = embeddings[1:]
        response.regions.extend(common_pb2.Vector(values=v.tolist()) for v in embeddings)
        return response

    def _prepare(self, request: embedding_pb2.EmbedRequest) -> tuple[tuple[int, int], np.ndarray]:
        prepared = prepare_batch(
            request.image,
            whole_image=request.whole_image,
            regions=[PixelBox(r.x0, r.y0, r.x1, r.y1) for r in request.regions],
            preprocess=self.preprocess,
            max_pixels=self.settings.max_image_pixels,
        )
        # The decoded pixels were freed when prepare_batch returned.
        release_memory_after(prepared[0])
        return prepared


def _l2_normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    # Post-ReLU6 pooled features are never all zero in practice; the floor only avoids NaN.
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def build() -> EmbeddingService:
    return EmbeddingService(EmbeddingSettings.from_env())
