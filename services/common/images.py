"""Decoding untrusted image bytes, and boxes in their pixel space.

Both model services decode with this module so that a box means the same pixels to the
detector, the embedder and the caller: the original image after EXIF orientation.
"""

from __future__ import annotations

import ctypes
import io
import struct
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

# Only formats with well-exercised decoders; Pillow can open many more (EPS would run Ghostscript).
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
DEFAULT_MAX_PIXELS = 50_000_000
# After preparing an image at least this large, freed memory is handed back to the system
# (release_memory_after): about 8 MiB of RGB pixels, more than a phone photo's JPEG decode
# (which shrinks while decoding) but less than any full-size decode worth keeping.
RELEASE_PIXELS = 2_000_000


class InvalidImage(ValueError):
    """The bytes are not an image Loupe can use; the message tells the caller why."""


# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPS_AXES = {5, 6, 7, 8}
_ORIENTATION = 0x0112


class EncodedImage:
    """Untrusted image bytes, opened and checked but not decoded yet.

    `size` is the original size after EXIF orientation: the pixel space of every box. `decode`
    may return a smaller image: a JPEG decoder can shrink by 2, 4 or 8 while it decodes (DCT
    scaling), which skips most of the work on camera-size photos (a 12 MP JPEG: about 35 ms
    instead of 80 to decode, and a far cheaper resize after).
    """

    def __init__(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if not data:
            raise InvalidImage("image is empty")
        with _decoding_errors(max_pixels):
            self._image: Image.Image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = self._image.size
            if width < 1 or height < 1:
                raise InvalidImage(f"image has no pixels ({width}x{height})")
            if width * height > max_pixels:
                raise InvalidImage(
                    f"image is {width}x{height} = {width * height} pixels; "
                    f"the limit is {max_pixels}"
                )
            self._swaps_axes = self._image.getexif().get(_ORIENTATION, 1) in _SWAPS_AXES
        self.size = (height, width) if self._swaps_axes else (width, height)
        self._max_pixels = max_pixels

    def decode(self, at_least: tuple[int, int] | None = None) -> Image.Image:
        """RGB pixels, EXIF-oriented; at least `at_least` (width, height) when given, else the
        full size. Only JPEG can come out smaller; other formats always decode in full."""
        with _decoding_errors(self._max_pixels):
            if at_least is not None:
                wanted = at_least[::-1] if self._swaps_axes else at_least
                self._image.draft(None, (max(1, wanted[0]), max(1, wanted[1])))
            self._image.load()
            image = ImageOps.exif_transpose(self._image) or self._image
            return _to_rgb(image)


def _malloc_trim() -> Callable[[int], int] | None:
    # glibc's; other C libraries (musl, macOS) have none and return memory differently.
    return getattr(ctypes.CDLL(None), "malloc_trim", None)


_MALLOC_TRIM = _malloc_trim()


def release_memory_after(size: tuple[int, int]) -> bool:
    """Hand memory freed since a large image was prepared back to the system; call it once
    the image's pixels are no longer referenced. Whether it trimmed.

    glibc keeps freed memory for reuse, in the heap of the thread that freed it: after one
    49 MP PNG, WebP or TIFF the detection process stayed about 230 MiB larger for good
    (tools/rss_huge_images.py). malloc_trim returns every arena's free pages.
    """
    if _MALLOC_TRIM is None or size[0] * size[1] < RELEASE_PIXELS:
        return False
    _MALLOC_TRIM(0)
    return True


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode to a full-size RGB image with EXIF orientation applied; raise InvalidImage
    otherwise."""
    return EncodedImage(data, max_pixels).decode()


@contextmanager
def _decoding_errors(max_pixels: int) -> Iterator[None]:
    """Pillow's many failure types, as one InvalidImage with a message a caller can act on."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except InvalidImage:
        raise
    except UnidentifiedImageError:
        raise InvalidImage(
            f"not a supported image (expected one of {', '.join(ALLOWED_FORMATS)})"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InvalidImage(f"image too large (the limit is {max_pixels} pixels): {error}") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as error:
        raise InvalidImage(f"image is corrupt or truncated: {error}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels become white, as a viewer would show them, not black.
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


@dataclass(frozen=True)
class PixelBox:
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0


def clip_box(box: PixelBox, width: int, height: int, *, min_size: float = 2.0) -> PixelBox:
    """Clip a caller's box to the image; raise InvalidImage when nothing usable is left."""
    values = (box.x0, box.y0, box.x1, box.y1)
    if any(v != v or v in (float("inf"), float("-inf")) for v in values):
        raise InvalidImage(f"box {values} has a coordinate that is not a finite number")
    if box.x1 <= box.x0 or box.y1 <= box.y0:
        raise InvalidImage(f"box {values} is empty: need x1 > x0 and y1 > y0")
    clipped = PixelBox(
        max(0.0, box.x0), max(0.0, box.y0), min(float(width), box.x1), min(float(height), box.y1)
    )
    if clipped.width < min_size or clipped.height < min_size:
        raise InvalidImage(
            f"box {values} leaves less than {min_size:g}x{min_size:g} pixels inside the "
            f"{width}x{height} image"
        )
    return clipped
