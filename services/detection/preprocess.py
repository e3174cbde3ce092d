"""YOLOX input preparation: letterbox to the model's input size, as YOLOX's reference does."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from services.common.config import ConfigError
from services.common.inference import ModelSpec


@dataclass(frozen=True)
class Letterboxed:
    tensor: np.ndarray  # [1, 3, H, W] float32
    # Input pixels per original pixel: divide model boxes by it to get original pixels.
    ratio: float


@dataclass(frozen=True)
class LetterboxPreprocessing:
    input_height: int
    input_width: int
    pad_value: float
    bgr: bool

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> LetterboxPreprocessing:
        if spec.parameter("loupe.resize") != "letterbox":
            raise ConfigError(f"model {spec.name}: loupe.resize must be 'letterbox' for YOLOX")
        color_order = spec.parameter("loupe.color_order")
        if color_order not in ("RGB", "BGR"):
            raise ConfigError(f"model {spec.name}: loupe.color_order {color_order!r}")
        height, width = spec.inputs[0].dims[-2:]
        return cls(height, width, float(spec.parameter("loupe.pad_value")), color_order == "BGR")

    def __call__(self, image: Image.Image) -> Letterboxed:
        width, height = image.size
        ratio = min(self.input_height / height, self.input_width / width)
        # At least one pixel, so that a 1x5000 strip does not become an empty image.
        resized_size = (max(1, int(width * ratio)), max(1, int(height * ratio)))
        resized = np.asarray(image.resize(resized_size, Image.Resampling.BILINEAR), np.float32)
        canvas = np.full((self.input_height, self.input_width, 3), self.pad_value, np.float32)
        canvas[: resized.shape[0], : resized.shape[1]] = resized
        if self.bgr:
            canvas = canvas[:, :, ::-1]
        tensor = np.ascontiguousarray(canvas.transpose(2, 0, 1)[np.newaxis])
        return Letterboxed(tensor, ratio)
