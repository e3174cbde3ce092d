"""The detection service: image bytes in, YOLOX boxes in original pixels out."""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, replace

import grpc
import numpy as np

from loupe.v1 import common_pb2, detection_pb2, detection_pb2_grpc
from services.common.config import ConfigError
from services.common.images import (
    EncodedImage,
    InvalidImage,
    PixelBox,
    clip_box,
    release_memory_after,
)
from services.common.inference import (
    LoadedModel,
    ServesModel,
    infer_or_abort,
    load_model_spec,
)
from services.detection.labels import LABEL_SETS
from services.detection.preprocess import Letterboxed, LetterboxPreprocessing
from services.detection.settings import MAX_DETECTIONS_LIMIT, DetectionSettings
from services.detection.yolox import Detections, YoloxDecoder

log = logging.getLogger(__name__)


class RegionError(InvalidImage):
    """The requested region is unusable; the message says why."""


@dataclass(frozen=True)
class View:
    """What the model saw: its origin in original pixels, its size in decoded pixels, and
    original pixels per decoded pixel on each axis."""

    x0: float
    y0: float
    width: int
    height: int
    scale: tuple[float, float]


class DetectionService(ServesModel, detection_pb2_grpc.DetectionServiceServicer):
    name = "detection"
    grpc_services = [detection_pb2.DESCRIPTOR.services_by_name["DetectionService"].full_name]

    def __init__(self, settings: DetectionSettings) -> None:
        """Reads and checks the model's config, so that a bad one fails at start-up as a
        configuration error; the model itself loads in `start`."""
        self.settings = settings
        self.spec = spec = load_model_spec(
            settings.model_repository, settings.model_name, settings.model_version
        )
        self.preprocess = LetterboxPreprocessing.from_spec(spec)
        strides = [int(s) for s in spec.parameter("loupe.strides").split(",")]
        self.decoder = YoloxDecoder(
            self.preprocess.input_height, self.preprocess.input_width, strides
        )
        label_set = spec.parameter("loupe.labels")
        if label_set not in LABEL_SETS:
            raise ConfigError(f"model {spec.name}: unknown loupe.labels {label_set!r}")
        self.labels = LABEL_SETS[label_set]
        output_dims = spec.outputs[0].dims
        if output_dims[-2:] != (self.decoder.num_anchors, 5 + len(self.labels)):
            raise ConfigError(
                f"model {spec.name}: output dims {list(output_dims)} do not match "
                f"{self.decoder.num_anchors} anchors and {len(self.labels)} classes"
            )
        self.model = LoadedModel(spec, settings.inference)

    def register(self, server: grpc.aio.Server) -> None:
        detection_pb2_grpc.add_DetectionServiceServicer_to_server(self, server)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return []

    async def Describe(
        self, request: common_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelInfo:
        return common_pb2.ModelInfo(model_name=self.spec.name, model_version=self.spec.version)

    async def Detect(
        self, request: detection_pb2.DetectRequest, context: grpc.aio.ServicerContext
    ) -> detection_pb2.DetectResponse:
        backend = self.model.backend
        if backend is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"{self.name}: {self.model.not_loaded_reason()}"
            )
        assert backend is not None
        score_threshold = request.score_threshold or self.settings.score_threshold
        if not 0.0 < score_threshold <= 1.0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"score_threshold={request.score_threshold}: must be in (0, 1], or 0 for the "
                f"default {self.settings.score_threshold}",
            )
        max_detections = request.max_detections or self.settings.max_detections
        if not 1 <= max_detections <= MAX_DETECTIONS_LIMIT:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"max_detections={request.max_detections}: must be 1..{MAX_DETECTIONS_LIMIT}, "
                f"or 0 for the default {self.settings.max_detections}",
            )

        region = (
            PixelBox(request.region.x0, request.region.y0, request.region.x1, request.region.y1)
            if request.HasField("region")
            else None
        )
        try:
            size, view, letterboxed = await asyncio.to_thread(self._prepare, request.image, region)
        except RegionError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"region: {error}")
        except InvalidImage as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"image: {error}")
        outputs = await infer_or_abort(
            context, backend, {self.spec.inputs[0].name: letterboxed.tensor}, self.name
        )
        detections = await asyncio.to_thread(
            self.decoder,
            outputs[self.spec.outputs[0].name],
            ratio=letterboxed.ratio,
            image_width=view.width,
            image_height=view.height,
            score_threshold=score_threshold,
            iou_threshold=self.settings.nms_iou,
            max_detections=max_detections,
        )
        # Boxes of a decoder-shrunk image (or of a region of it), back to original pixels
        # (per axis: see images.py).
        sx, sy = view.scale
        boxes = detections.boxes * np.array([sx, sy, sx, sy], dtype=detections.boxes.dtype)
        boxes += np.array([view.x0, view.y0, view.x0, view.y0], dtype=boxes.dtype)
        detections = replace(detections, boxes=boxes)
        return detection_pb2.DetectResponse(
            detections=self._to_proto(detections),
            image_width=size[0],
            image_height=size[1],
            model_name=self.spec.name,
            model_version=self.spec.version,
        )

    def _prepare(
        self, data: bytes, region: PixelBox | None = None
    ) -> tuple[tuple[int, int], View, Letterboxed]:
        prepared = self._letterbox(data, region)
        # The decoded pixels were freed when _letterbox returned.
        release_memory_after(prepared[0])
        return prepared

    def _letterbox(
        self, data: bytes, region: PixelBox | None = None
    ) -> tuple[tuple[int, int], View, Letterboxed]:
        """(original size, what the model saw, model input). The decoder may shrink a large
        JPEG down to (not below) the letterbox size of the image or region: the model sees no
        fewer pixels."""
        encoded = EncodedImage(data, self.settings.max_image_pixels)
        width, height = encoded.size
        box = PixelBox(0.0, 0.0, float(width), float(height))
        if region is not None:
            try:
                box = clip_box(region, width, height)
            except InvalidImage as error:
                raise RegionError(str(error)) from None
        ratio = min(
            self.preprocess.input_height / box.height, self.preprocess.input_width / box.width
        )
        image = encoded.decode(
            at_least=(min(width, math.ceil(width * ratio)), min(height, math.ceil(height * ratio)))
        )
        sx, sy = width / image.width, height / image.height
        if region is not None:
            pixels = (
                math.floor(box.x0 / sx),
                math.floor(box.y0 / sy),
                math.ceil(box.x1 / sx),
                math.ceil(box.y1 / sy),
            )
            image = image.crop(pixels)
            view = View(pixels[0] * sx, pixels[1] * sy, image.width, image.height, (sx, sy))
        else:
            view = View(0.0, 0.0, image.width, image.height, (sx, sy))
        return encoded.size, view, self.preprocess(image)

    def _to_proto(self, detections: Detections) -> list[common_pb2.Detection]:
        return [
            common_pb2.Detection(
                box=common_pb2.Box(x0=x0, y0=y0, x1=x1, y1=y1),
                label=self.labels[class_id],
                class_id=class_id,
                score=score,
            )
            for (x0, y0, x1, y1), score, class_id in zip(
                detections.boxes.tolist(),
                detections.scores.tolist(),
                detections.class_ids.tolist(),
                strict=True,
            )
        ]


def build() -> DetectionService:
    return DetectionService(DetectionSettings.from_env())
