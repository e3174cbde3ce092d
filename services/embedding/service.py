"""The embedding service: one image, its whole view and any regions, to unit vectors.

It serves a default model (LOUPE_EMBEDDING_MODEL) and any others named in
LOUPE_EMBEDDING_EXTRA_MODELS, all loaded at start (ONNX Runtime in process, or Triton by
name and version per request): during a migration a catalogue's old and new embedders are
both needed. EmbedRequest.model picks one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import numpy as np
from prometheus_client import Gauge

from loupe.v1 import common_pb2, embedding_pb2, embedding_pb2_grpc
from services.common.config import ConfigError
from services.common.images import InvalidImage, PixelBox, release_memory_after
from services.common.inference import (
    LoadedModel,
    ModelSpec,
    infer_or_abort,
    load_model_spec,
)
from services.embedding.preprocess import RegionError, StretchPreprocessing, prepare_batch
from services.embedding.settings import EmbeddingSettings

log = logging.getLogger(__name__)

MODEL_INFO = Gauge(
    "loupe_embedding_model_info",
    "1 per embedder this service serves ('name/version'); default=\"true\" for the one used "
    "when a request names none.",
    ["embedder", "default"],
)


@dataclass
class ServedModel:
    spec: ModelSpec
    preprocess: StretchPreprocessing
    # max_batch_size 0 means the model takes exactly one image, batch axis included.
    batch_size: int
    model: LoadedModel

    @property
    def identity(self) -> str:
        return f"{self.spec.name}/{self.spec.version}"

    def info(self) -> common_pb2.ModelInfo:
        return common_pb2.ModelInfo(
            model_name=self.spec.name,
            model_version=self.spec.version,
            dimension=self.spec.outputs[0].dims[-1],
            preprocessing=self.preprocess.describe(),
        )


class EmbeddingService(embedding_pb2_grpc.EmbeddingServiceServicer):
    name = "embedding"
    grpc_services = [embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name]

    def __init__(self, settings: EmbeddingSettings) -> None:
        """Reads and checks every model's config, so that a bad one fails at start-up as a
        configuration error; the models themselves load in `start`."""
        self.settings = settings
        self.served: list[ServedModel] = []
        for name, version in (
            (settings.model_name, settings.model_version),
            *settings.extra_models,
        ):
            spec = load_model_spec(settings.model_repository, name, version)
            served = ServedModel(
                spec,
                StretchPreprocessing.from_spec(spec),
                max(1, spec.max_batch_size),
                LoadedModel(spec, settings.inference),
            )
            if any(s.identity == served.identity for s in self.served):
                raise ConfigError(
                    f"LOUPE_EMBEDDING_EXTRA_MODELS: {served.identity} is served already"
                )
            self.served.append(served)
        self.default = self.served[0]
        # The default model's, as before several were served.
        self.spec = self.default.spec
        self.preprocess = self.default.preprocess
        self.model = self.default.model

    async def start(self) -> None:
        await asyncio.gather(*(s.model.load() for s in self.served))
        for served in self.served:
            MODEL_INFO.labels(served.identity, str(served is self.default).lower()).set(1)

    async def watch_readiness(self, report: Callable[[bool], Awaitable[None]]) -> None:
        """Ready while every served model is (Triton may stop serving one)."""
        ready = {s.identity: True for s in self.served}

        def reporter(identity: str) -> Callable[[bool], Awaitable[None]]:
            async def changed(now: bool) -> None:
                before = all(ready.values())
                ready[identity] = now
                if all(ready.values()) != before:
                    await report(all(ready.values()))

            return changed

        await asyncio.gather(*(s.model.watch_readiness(reporter(s.identity)) for s in self.served))

    async def close(self) -> None:
        await asyncio.gather(*(s.model.close() for s in self.served))

    def pick(self, model: str) -> ServedModel:
        """The served model a request names: '' (the default), 'name' or 'name/version'."""
        if not model:
            return self.default
        name, _, version = model.partition("/")
        found = [
            s
            for s in self.served
            if s.spec.name == name and (not version or s.spec.version == version)
        ]
        if not found:
            served = ", ".join(s.identity for s in self.served)
            raise LookupError(f"model {model!r} is not served here; this service serves {served}")
        return found[0]

    def register(self, server: grpc.aio.Server) -> None:
        embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server(self, server)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return []

    async def Describe(
        self, request: common_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelInfo:
        info = self.default.info()
        info.served.extend(s.info() for s in self.served)
        return info

    async def Embed(
        self, request: embedding_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> embedding_pb2.EmbedResponse:
        try:
            served = self.pick(request.model)
        except LookupError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        backend = served.model.backend
        if backend is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"{self.name}: {served.model.not_loaded_reason()}"
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
            size, tensors = await asyncio.to_thread(self._prepare, request, served)
        except RegionError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except InvalidImage as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"image: {error}")

        input_name, output_name = served.spec.inputs[0].name, served.spec.outputs[0].name
        vectors = []
        for start in range(0, len(tensors), served.batch_size):
            batch = tensors[start : start + served.batch_size]
            outputs = await infer_or_abort(context, backend, {input_name: batch}, self.name)
            vectors.append(outputs[output_name])
        embeddings = _l2_normalise(np.concatenate(vectors))

        response = embedding_pb2.EmbedResponse(
            image_width=size[0],
            image_height=size[1],
            model_name=served.spec.name,
            model_version=served.spec.version,
        )
        if request.whole_image:
            response.whole_image.values.extend(embeddings[0].tolist())
            embeddings = embeddings[1:]
        response.regions.extend(common_pb2.Vector(values=v.tolist()) for v in embeddings)
        return response

    def _prepare(
        self, request: embedding_pb2.EmbedRequest, served: ServedModel
    ) -> tuple[tuple[int, int], np.ndarray]:
        prepared = prepare_batch(
            request.image,
            whole_image=request.whole_image,
            regions=[PixelBox(r.x0, r.y0, r.x1, r.y1) for r in request.regions],
            preprocess=served.preprocess,
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
