"""Preprocessing of both model services, driven by the real config.pbtxt parameters."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.common.images import InvalidImage, PixelBox, decode_image
from services.common.inference import REPOSITORY_IN_CHECKOUT, ModelSpec, load_model_spec
from services.detection.preprocess import LetterboxPreprocessing
from services.embedding.preprocess import RegionError, StretchPreprocessing, prepare_batch

EXIF_ORIENTATION = 0x0112
ROTATE_90_CLOCKWISE = 6


def spec_from_config(name: str, tmp_path: Path) -> ModelSpec:
    """The checked-in config, with a placeholder model file: preprocessing needs no weights."""
    model_dir = tmp_path / name
    (model_dir / "1").mkdir(parents=True)
    shutil.copy(REPOSITORY_IN_CHECKOUT / name / "config.pbtxt", model_dir / "config.pbtxt")
    (model_dir / "1" / "model.onnx").write_bytes(b"")
    return load_model_spec(tmp_path, name)


@pytest.fixture
def letterbox(tmp_path: Path) -> LetterboxPreprocessing:
    return LetterboxPreprocessing.from_spec(spec_from_config("detector", tmp_path))


@pytest.fixture
def stretch(tmp_path: Path) -> StretchPreprocessing:
    return StretchPreprocessing.from_spec(spec_from_config("embedder", tmp_path))


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize(
    ("width", "height", "resized_width", "resized_height"),
    [(200, 100, 416, 208), (100, 300, 138, 416), (832, 832, 416, 416)],
)
def test_letterbox_scales_to_fit_and_pads_bottom_right_with_114(
    letterbox: LetterboxPreprocessing,
    width: int,
    height: int,
    resized_width: int,
    resized_height: int,
) -> None:
    result = letterbox(Image.new("RGB", (width, height), (10, 20, 30)))

    assert result.tensor.shape == (1, 3, 416, 416)
    assert result.tensor.dtype == np.float32
    assert result.ratio == pytest.approx(min(416 / width, 416 / height))
    content = result.tensor[0, :, :resized_height, :resized_width]
    # BGR, raw 0..255: no normalisation.
    np.testing.assert_array_equal(content[:, 0, 0], [30, 20, 10])
    np.testing.assert_array_equal(content, np.broadcast_to([[[30]], [[20]], [[10]]], content.shape))
    assert (result.tensor[0, :, resized_height:, :] == 114).all()
    assert (result.tensor[0, :, :, resized_width:] == 114).all()


def test_letterbox_puts_blue_first(letterbox: LetterboxPreprocessing) -> None:
    tensor = letterbox(Image.new("RGB", (416, 416), (255, 0, 0))).tensor
    assert tensor[0, 0].max() == 0  # blue
    assert tensor[0, 2].min() == 255  # red


def test_embedder_normalises_with_imagenet_mean_and_std(stretch: StretchPreprocessing) -> None:
    tensor = stretch(Image.new("RGB", (300, 100), (255, 128, 0)))

    assert tensor.shape == (3, 224, 224)
    assert tensor.dtype == np.float32
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = (np.array([255, 128, 0]) / 255 - mean) / std
    np.testing.assert_allclose(tensor[:, 0, 0], expected, rtol=1e-5)
    np.testing.assert_allclose(tensor, np.broadcast_to(expected[:, None, None], tensor.shape), 1e-5)


def test_regions_are_cropped_from_the_original_pixels(stretch: StretchPreprocessing) -> None:
    image = noise_image(600, 400)
    regions = [PixelBox(10, 20, 110, 170), PixelBox(-50, -50, 100, 80), PixelBox(0.4, 0, 9.6, 9)]

    size, batch = prepare_batch(
        encode(image), whole_image=True, regions=regions, preprocess=stretch, max_pixels=10**8
    )

    assert size == (600, 400)
    assert batch.shape == (4, 3, 224, 224)
    np.testing.assert_array_equal(batch[0], stretch(image))
    # Out-of-image parts are clipped off; fractional edges take every pixel they touch.
    for tensor, pixels in zip(
        batch[1:], [(10, 20, 110, 170), (0, 0, 100, 80), (0, 0, 10, 9)], strict=True
    ):
        np.testing.assert_array_equal(tensor, stretch(image.crop(pixels)))


def test_only_regions_when_whole_image_is_not_asked(stretch: StretchPreprocessing) -> None:
    image = noise_image(64, 64)
    _, batch = prepare_batch(
        encode(image),
        whole_image=False,
        regions=[PixelBox(0, 0, 32, 32)],
        preprocess=stretch,
        max_pixels=10**8,
    )
    np.testing.assert_array_equal(batch, stretch(image.crop((0, 0, 32, 32)))[np.newaxis])


def test_an_unusable_region_is_named(stretch: StretchPreprocessing) -> None:
    with pytest.raises(RegionError, match=r"regions\[1\]"):
        prepare_batch(
            encode(noise_image(64, 64)),
            whole_image=False,
            regions=[PixelBox(0, 0, 10, 10), PixelBox(100, 100, 200, 200)],
            preprocess=stretch,
            max_pixels=10**8,
        )


def test_exif_orientation_is_applied_before_boxes_and_resizing(
    stretch: StretchPreprocessing, letterbox: LetterboxPreprocessing
) -> None:
    # Stored 80x40, left half red and right half blue; displayed rotated 90 degrees clockwise,
    # so the caller sees a 40x80 image, red on top.
    stored = Image.new("RGB", (80, 40), (255, 0, 0))
    stored.paste((0, 0, 255), (40, 0, 80, 40))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_90_CLOCKWISE
    data = encode(stored, "JPEG", exif=exif, quality=95)

    assert decode_image(data).size == (40, 80)
    size, batch = prepare_batch(
        data,
        whole_image=False,
        regions=[PixelBox(0, 0, 40, 36), PixelBox(0, 44, 40, 80)],
        preprocess=stretch,
        max_pixels=10**8,
    )
    assert size == (40, 80)
    top, bottom = batch[:, :, 16:-16, 16:-16].mean(axis=(2, 3))
    assert top[0] > top[2]  # red over blue
    assert bottom[2] > bottom[0]

    letterboxed = letterbox(decode_image(data))
    assert letterboxed.ratio == pytest.approx(416 / 80)
    assert (letterboxed.tensor[0, :, :, 208:] == 114).all()  # padded on the right, not below
    assert (letterboxed.tensor[0, :, 400:, :200] != 114).any()


def test_corrupt_bytes_are_invalid_images(stretch: StretchPreprocessing) -> None:
    truncated = encode(noise_image(64, 64), "JPEG")[:300]
    for data in (truncated, b"definitely not an image"):
        with pytest.raises(InvalidImage):
            prepare_batch(data, whole_image=True, regions=[], preprocess=stretch, max_pixels=10**8)


def test_the_whole_image_does_not_depend_on_the_regions_beside_it(
    stretch: StretchPreprocessing,
) -> None:
    """A small region makes the decoder keep more pixels; the whole image must still be
    prepared from the decode it would get alone (indexing objects must not change it)."""
    data = encode(noise_image(2400, 1600, seed=5).resize((2400, 1600)), "JPEG", quality=90)
    _, alone = prepare_batch(
        data, whole_image=True, regions=[], preprocess=stretch, max_pixels=10**8
    )
    _, with_region = prepare_batch(
        data,
        whole_image=True,
        regions=[PixelBox(100, 100, 400, 400)],
        preprocess=stretch,
        max_pixels=10**8,
    )
    assert with_region.shape[0] == 2
    assert np.array_equal(alone[0], with_region[0])
