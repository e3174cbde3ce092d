"""Embedder input preparation, driven by the `loupe.*` parameters of the model's config.pbtxt."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from services.common.config import ConfigError
from services.common.images import EncodedImage, InvalidImage, PixelBox, clip_box
from services.common.inference import ModelSpec


class RegionError(InvalidImage):
    """A requested region is unusable; the message names it."""


def _floats(spec: ModelSpec, key: str, count: int) -> np.ndarray:
    raw = spec.parameter(key)
    try:
        values = np.array([float(v) for v in raw.split(",")], np.float32)
    except ValueError:
        raise ConfigError(f"model {spec.name}: {key}={raw!r} is not numbers") from None
    if len(values) != count:
        raise ConfigError(f"model {spec.name}: {key}={raw!r} needs {count} values")
    return values


@dataclass(frozen=True)
class StretchPreprocessing:
    input_height: int
    input_width: int
    bgr: bool
    scale: float
    mean: np.ndarray  # [3], in the model's channel order
    std: np.ndarray  # [3]

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> StretchPreprocessing:
        if spec.parameter("loupe.resize") != "stretch":
            raise ConfigError(f"model {spec.name}: loupe.resize must be 'stretch'")
        color_order = spec.parameter("loupe.color_order")
        if color_order not in ("RGB", "BGR"):
            raise ConfigError(f"model {spec.name}: loupe.color_order {color_order!r}")
        height, width = spec.inputs[0].dims[-2:]
        return cls(
            input_height=height,
            input_width=width,
            bgr=color_order == "BGR",
            scale=float(spec.parameter("loupe.scale")),
            mean=_floats(spec, "loupe.mean", 3),
            std=_floats(spec, "loupe.std", 3),
        )

    def describe(self) -> str:
        """In words, for catalogue records: two models prepared differently produce
        incomparable vectors even with the same network."""
        order = "BGR" if self.bgr else "RGB"

        def listed(values: np.ndarray) -> str:
            return ",".join(f"{v:g}" for v in values.tolist())

        return (
            f"{order} {self.input_width}x{self.input_height} stretch, scale {self.scale:g}, "
            f"mean {listed(self.mean)}, std {listed(self.std)}"
        )

    def __call__(self, image: Image.Image) -> np.ndarray:
        """An RGB image -> [3, H, W] float32."""
        resized = image.resize((self.input_width, self.input_height), Image.Resampling.BILINEAR)
        pixels = np.asarray(resized, np.float32)
        if self.bgr:
            pixels = pixels[:, :, ::-1]
        normalised = (pixels * np.float32(self.scale) - self.mean) / self.std
        return np.ascontiguousarray(normalised.transpose(2, 0, 1), dtype=np.float32)


def crop(image: Image.Image, box: PixelBox) -> Image.Image:
    """The pixels a (clipped) box touches, from the original image, before any resize."""
    return image.crop(
        (math.floor(box.x0), math.floor(box.y0), math.ceil(box.x1), math.ceil(box.y1))
    )


def prepare_batch(
    data: bytes,
    *,
    whole_image: bool,
    regions: Sequence[PixelBox],
    preprocess: StretchPreprocessing,
    max_pixels: int,
) -> tuple[tuple[int, int], np.ndarray]:
    """Return the image size and [N, 3, H, W]: the whole image (if asked) first, then each
    region in order. Raises InvalidImage, or RegionError naming the region.

    The decoder may shrink the image, but never so far that a view has fewer pixels than the
    model's input on either side. The whole image is always prepared from the decode it alone
    would get, so its vector does not depend on which regions come with it (indexing objects
    must not change whole-image results); regions that need more pixels get a second decode.
    """
    encoded = EncodedImage(data, max_pixels)
    width, height = encoded.size
    boxes = []
    for index, region in enumerate(regions):
        try:
            boxes.append(clip_box(region, width, height))
        except InvalidImage as error:
            raise RegionError(f"regions[{index}]: {error}") from None

    def scale_for(sides: list[tuple[float, float]]) -> float:
        return min(
            1.0,
            max(max(preprocess.input_width / w, preprocess.input_height / h) for w, h in sides),
        )

    def decoded(scale: float) -> Image.Image:
        return encoded.decode(at_least=(math.ceil(width * scale), math.ceil(height * scale)))

    views = []
    whole_scale = scale_for([(float(width), float(height))])
    whole = decoded(whole_scale) if whole_image else None
    if whole is not None:
        views.append(whole)
    if boxes:
        region_scale = scale_for([(box.width, box.height) for box in boxes])
        image = (
            whole if whole is not None and region_scale <= whole_scale else decoded(region_scale)
        )
        # Per axis: the decoder rounds each side up on its own.
        sx, sy = image.width / width, image.height / height
        views += [crop(image, PixelBox(b.x0 * sx, b.y0 * sy, b.x1 * sx, b.y1 * sy)) for b in boxes]
    return (width, height), np.stack([preprocess(view) for view in views])
