"""Embedding service settings, from environment variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.config import env_int, env_str
from services.common.images import DEFAULT_MAX_PIXELS
from services.common.inference import InferenceSettings, model_repository_from_env


@dataclass(frozen=True)
class EmbeddingSettings:
    model_repository: Path
    inference: InferenceSettings
    model_name: str
    model_version: str
    max_regions: int
    max_image_pixels: int

    @classmethod
    def from_env(cls) -> EmbeddingSettings:
        return cls(
            model_repository=model_repository_from_env(),
            inference=InferenceSettings.from_env(),
            model_name=env_str("LOUPE_EMBEDDING_MODEL", "embedder"),
            model_version=env_str("LOUPE_EMBEDDING_MODEL_VERSION", ""),
            max_regions=env_int("LOUPE_EMBEDDING_MAX_REGIONS", 64, minimum=1, maximum=4096),
            max_image_pixels=env_int("LOUPE_MAX_IMAGE_PIXELS", DEFAULT_MAX_PIXELS, minimum=1),
        )
