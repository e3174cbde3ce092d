"""Embedding service settings, from environment variables."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from services.common.config import ConfigError, env_int, env_str
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
    # More models served beside the default, as (name, version; "" = newest): during a
    # migration both the catalogue's old and new embedders must be served.
    extra_models: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_env(cls) -> EmbeddingSettings:
        return cls(
            model_repository=model_repository_from_env(),
            inference=InferenceSettings.from_env(),
            model_name=env_str("LOUPE_EMBEDDING_MODEL", "embedder"),
            model_version=env_str("LOUPE_EMBEDDING_MODEL_VERSION", ""),
            max_regions=env_int("LOUPE_EMBEDDING_MAX_REGIONS", 64, minimum=1, maximum=4096),
            max_image_pixels=env_int("LOUPE_MAX_IMAGE_PIXELS", DEFAULT_MAX_PIXELS, minimum=1),
            extra_models=parse_models(env_str("LOUPE_EMBEDDING_EXTRA_MODELS", "")),
        )


MODEL_PATTERN = re.compile(r"([A-Za-z0-9_.-]+)(?::([0-9]+))?")


def parse_models(text: str) -> tuple[tuple[str, str], ...]:
    """'name[:version],...' -> ((name, version), ...); a bad entry is a ConfigError."""
    models = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        match = MODEL_PATTERN.fullmatch(entry)
        if match is None:
            raise ConfigError(
                f"LOUPE_EMBEDDING_EXTRA_MODELS: {entry!r}: expected NAME or NAME:VERSION "
                "(a folder of the model repository and one of its version folders), e.g. "
                "embedder_gem3:1"
            )
        models.append((match.group(1), match.group(2) or ""))
    return tuple(models)
