"""Detection service settings, from environment variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.config import ConfigError, env_float, env_int, env_str
from services.common.images import DEFAULT_MAX_PIXELS
from services.common.inference import InferenceSettings, model_repository_from_env

MAX_DETECTIONS_LIMIT = 1000


@dataclass(frozen=True)
class DetectionSettings:
    model_repository: Path
    inference: InferenceSettings
    model_name: str
    model_version: str
    score_threshold: float
    nms_iou: float
    max_detections: int
    max_image_pixels: int

    @classmethod
    def from_env(cls) -> DetectionSettings:
        settings = cls(
            model_repository=model_repository_from_env(),
            inference=InferenceSettings.from_env(),
            model_name=env_str("LOUPE_DETECTION_MODEL", "detector"),
            model_version=env_str("LOUPE_DETECTION_MODEL_VERSION", ""),
            score_threshold=env_float(
                "LOUPE_DETECTION_SCORE_THRESHOLD", 0.3, minimum=0.0, maximum=1.0
            ),
            nms_iou=env_float("LOUPE_DETECTION_NMS_IOU", 0.45, minimum=0.0, maximum=1.0),
            max_detections=env_int(
                "LOUPE_DETECTION_MAX_DETECTIONS", 20, minimum=1, maximum=MAX_DETECTIONS_LIMIT
            ),
            max_image_pixels=env_int("LOUPE_MAX_IMAGE_PIXELS", DEFAULT_MAX_PIXELS, minimum=1),
        )
        # A zero threshold would send every anchor of every class to NMS.
        if settings.score_threshold <= 0.0:
            raise ConfigError("LOUPE_DETECTION_SCORE_THRESHOLD=0: must be greater than 0")
        if settings.nms_iou <= 0.0:
            raise ConfigError("LOUPE_DETECTION_NMS_IOU=0: must be greater than 0")
        return settings
