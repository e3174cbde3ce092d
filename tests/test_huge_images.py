"""A huge image leaves a model service no larger: each service runs as its own process (as
`loupe up` starts it) and its resident memory is read from /proc before and after.

Before the fix, one 49 MP image of each format left detection about 440 MiB larger and
embedding about 180 MiB larger for good (glibc kept the freed pixels).
"""

from __future__ import annotations

import sys

import pytest

from services.common.images import RELEASE_PIXELS, release_memory_after
from services.common.inference import REPOSITORY_IN_CHECKOUT
from tools.rss_huge_images import measure

# What a service may keep after the images (the request buffers gRPC keeps, allocator slack);
# without the fix three of them kept over 200 MiB.
MAX_GROWTH_MIB = 80

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc"),
    pytest.mark.skipif(
        not (REPOSITORY_IN_CHECKOUT / "detector" / "1" / "model.onnx").is_file()
        or not (REPOSITORY_IN_CHECKOUT / "embedder" / "1" / "model.onnx").is_file(),
        reason="models not built: run `python models/build_models.py`",
    ),
]


@pytest.mark.parametrize("service", ["detection", "embedding"])
def test_memory_goes_back_after_huge_images(service: str) -> None:
    # The formats decoded at full size (a JPEG shrinks while it decodes).
    *requests, summary = measure(service, 49.0, ["PNG", "WEBP", "TIFF"], repeat=1)
    print(requests, summary)
    assert [r["code"] for r in requests] == ["OK"] * 3
    assert summary["growth_mib"] < MAX_GROWTH_MIB


def test_only_large_images_trim() -> None:
    side = int(RELEASE_PIXELS**0.5)
    assert not release_memory_after((side - 1, side - 1))
    assert release_memory_after((side + 1, side + 1))
