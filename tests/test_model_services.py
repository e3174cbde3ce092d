"""The detection and embedding services with the built models, through real gRPC."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from loupe.v1 import (
    common_pb2,
    detection_pb2,
    detection_pb2_grpc,
    embedding_pb2,
    embedding_pb2_grpc,
)
from services.common.images import decode_image
from services.common.inference import REPOSITORY_IN_CHECKOUT
from services.detection.service import DetectionService
from services.detection.settings import DetectionSettings
from services.embedding.service import EmbeddingService
from services.embedding.settings import EmbeddingSettings
from tests.support import serving

SHARED_DIR = Path(
    os.environ.get("LOUPE_SHARED_DIR", REPOSITORY_IN_CHECKOUT.parent.parent / "shared")
)
COREL = SHARED_DIR / "data" / "corel1k" / "images"
COCO = SHARED_DIR / "data" / "coco128-val"
# A skier: one person, labelled class 0 in labels/000000000785.txt.
PERSON_IMAGE = "000000000785"

pytestmark = [
    pytest.mark.skipif(
        not (REPOSITORY_IN_CHECKOUT / "embedder" / "1" / "model.onnx").is_file()
        or not (REPOSITORY_IN_CHECKOUT / "detector" / "1" / "model.onnx").is_file(),
        reason="models not built: run `python models/build_models.py`",
    ),
    pytest.mark.skipif(
        not COREL.is_dir() or not COCO.is_dir(),
        reason=f"shared data not found at {SHARED_DIR} (set LOUPE_SHARED_DIR)",
    ),
]


@pytest.fixture(scope="module")
def embedding(
    monkeypatch_module: pytest.MonkeyPatch,
) -> Iterator[embedding_pb2_grpc.EmbeddingServiceStub]:
    monkeypatch_module.setenv("LOUPE_EMBEDDING_MAX_REGIONS", "4")
    with serving(EmbeddingService(EmbeddingSettings.from_env())) as channel:
        yield embedding_pb2_grpc.EmbeddingServiceStub(channel)


@pytest.fixture(scope="module")
def detection() -> Iterator[detection_pb2_grpc.DetectionServiceStub]:
    with serving(DetectionService(DetectionSettings.from_env())) as channel:
        yield detection_pb2_grpc.DetectionServiceStub(channel)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def corel(image_id: int) -> bytes:
    return (COREL / f"{image_id}.jpg").read_bytes()


def vector(message: common_pb2.Vector) -> np.ndarray:
    return np.array(message.values, np.float32)


def embed_whole(stub: embedding_pb2_grpc.EmbeddingServiceStub, data: bytes) -> np.ndarray:
    return vector(stub.Embed(embedding_pb2.EmbedRequest(image=data, whole_image=True)).whole_image)


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    overlap_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    overlap_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = overlap_w * overlap_h
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    return intersection / (area - intersection)


def assert_invalid_argument(call: object, request: object, message_part: str) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        call(request)  # type: ignore[operator]
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message_part in raised.value.details()


# --- embedding --------------------------------------------------------------------------------


def test_embeddings_are_unit_1280_vectors_with_the_model_named(
    embedding: embedding_pb2_grpc.EmbeddingServiceStub,
) -> None:
    for image_id in (0, 250, 999):
        response = embedding.Embed(
            embedding_pb2.EmbedRequest(image=corel(image_id), whole_image=True)
        )
        values = vector(response.whole_image)
        assert values.shape == (1280,)
        assert np.linalg.norm(values) == pytest.approx(1.0, abs=1e-5)
        assert (response.model_name, response.model_version) == ("embedder", "1")
        assert (response.image_width, response.image_height) == decode_image(corel(image_id)).size
        assert not response.regions


def test_a_region_embeds_like_the_cropped_image(
    embedding: embedding_pb2_grpc.EmbeddingServiceStub,
) -> None:
    box = (40, 30, 250, 200)
    response = embedding.Embed(
        embedding_pb2.EmbedRequest(
            image=corel(512), regions=[common_pb2.Box(x0=box[0], y0=box[1], x1=box[2], y1=box[3])]
        )
    )
    assert not response.HasField("whole_image")
    (region,) = response.regions

    cropped = io.BytesIO()
    decode_image(corel(512)).crop(box).save(cropped, "PNG")
    np.testing.assert_allclose(
        vector(region), embed_whole(embedding, cropped.getvalue()), atol=1e-5
    )


def test_whole_image_and_regions_come_back_in_request_order(
    embedding: embedding_pb2_grpc.EmbeddingServiceStub,
) -> None:
    boxes = [
        common_pb2.Box(x0=0, y0=0, x1=100, y1=100),
        common_pb2.Box(x0=200, y0=100, x1=380, y1=250),
    ]
    response = embedding.Embed(
        embedding_pb2.EmbedRequest(image=corel(3), whole_image=True, regions=boxes)
    )
    assert len(response.regions) == 2
    np.testing.assert_allclose(
        vector(response.whole_image), embed_whole(embedding, corel(3)), atol=1e-5
    )
    for box, region in zip(boxes, response.regions, strict=True):
        alone = embedding.Embed(embedding_pb2.EmbedRequest(image=corel(3), regions=[box]))
        np.testing.assert_allclose(vector(region), vector(alone.regions[0]), atol=1e-5)


def test_requests_larger_than_one_model_batch_are_split_in_order(
    embedding: embedding_pb2_grpc.EmbeddingServiceStub,
) -> None:
    boxes = [common_pb2.Box(x0=10 * i, y0=5 * i, x1=100 + 20 * i, y1=90 + 10 * i) for i in range(4)]
    request = embedding_pb2.EmbedRequest(image=corel(123), whole_image=True, regions=boxes)
    service = EmbeddingService(EmbeddingSettings.from_env())
    service.batch_size = 2  # five images: three backend calls
    with serving(service) as channel:
        split = embedding_pb2_grpc.EmbeddingServiceStub(channel).Embed(request)
    together = embedding.Embed(request)

    np.testing.assert_allclose(vector(split.whole_image), vector(together.whole_image), atol=1e-5)
    for a, b in zip(split.regions, together.regions, strict=True):
        np.testing.assert_allclose(vector(a), vector(b), atol=1e-5)


def test_same_class_images_are_closer_than_other_classes(
    embedding: embedding_pb2_grpc.EmbeddingServiceStub,
) -> None:
    dinosaur, other_dinosaur, horse = (embed_whole(embedding, corel(i)) for i in (400, 401, 700))
    assert dinosaur @ other_dinosaur > dinosaur @ horse + 0.1


def test_bad_embedding_requests_are_invalid_arguments(
    embedding: embedding_pb2_grpc.EmbeddingServiceStub,
) -> None:
    box = common_pb2.Box(x0=0, y0=0, x1=50, y1=50)
    assert_invalid_argument(
        embedding.Embed, embedding_pb2.EmbedRequest(image=corel(1)), "nothing to embed"
    )
    assert_invalid_argument(
        embedding.Embed, embedding_pb2.EmbedRequest(image=corel(1), regions=[box] * 5), "at most 4"
    )
    outside = common_pb2.Box(x0=1000, y0=1000, x1=1100, y1=1100)
    assert_invalid_argument(
        embedding.Embed,
        embedding_pb2.EmbedRequest(image=corel(1), regions=[box, outside]),
        "regions[1]",
    )


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_undecodable_images_are_refused_and_the_services_carry_on(
    embedding: embedding_pb2_grpc.EmbeddingServiceStub,
    detection: detection_pb2_grpc.DetectionServiceStub,
    damage: str,
) -> None:
    data = corel(7)[: len(corel(7)) // 2] if damage == "truncated" else b"\x00garbage\xff" * 100
    assert_invalid_argument(
        embedding.Embed, embedding_pb2.EmbedRequest(image=data, whole_image=True), "image:"
    )
    assert_invalid_argument(detection.Detect, detection_pb2.DetectRequest(image=data), "image:")

    assert embed_whole(embedding, corel(7)).shape == (1280,)
    assert detection.Detect(detection_pb2.DetectRequest(image=corel(7))).model_name == "detector"


# --- detection --------------------------------------------------------------------------------


def test_detects_the_labelled_person(detection: detection_pb2_grpc.DetectionServiceStub) -> None:
    data = (COCO / "images" / f"{PERSON_IMAGE}.jpg").read_bytes()
    width, height = decode_image(data).size
    truths = []
    for line in (COCO / "labels" / f"{PERSON_IMAGE}.txt").read_text().splitlines():
        class_id, cx, cy, w, h = (float(v) for v in line.split())
        if class_id == 0:
            truths.append(
                (
                    (cx - w / 2) * width,
                    (cy - h / 2) * height,
                    (cx + w / 2) * width,
                    (cy + h / 2) * height,
                )
            )
    assert truths

    response = detection.Detect(detection_pb2.DetectRequest(image=data))

    assert (response.image_width, response.image_height) == (width, height)
    assert (response.model_name, response.model_version) == ("detector", "1")
    people = [
        (d.box.x0, d.box.y0, d.box.x1, d.box.y1) for d in response.detections if d.label == "person"
    ]
    assert all(d.class_id == 0 for d in response.detections if d.label == "person")
    assert any(iou(person, truth) > 0.5 for person in people for truth in truths)
    for d in response.detections:
        assert 0 <= d.box.x0 < d.box.x1 <= width and 0 <= d.box.y0 < d.box.y1 <= height
        assert d.score >= 0.3


def test_request_threshold_and_limit_apply(
    detection: detection_pb2_grpc.DetectionServiceStub,
) -> None:
    data = (COCO / "images" / "000000000139.jpg").read_bytes()  # a living room: many objects
    loose = detection.Detect(detection_pb2.DetectRequest(image=data, score_threshold=0.05))
    scores = [d.score for d in loose.detections]
    assert len(scores) == 20  # the default limit
    assert scores == sorted(scores, reverse=True)
    assert min(scores) >= 0.05

    limited = detection.Detect(
        detection_pb2.DetectRequest(image=data, score_threshold=0.05, max_detections=3)
    )
    assert [d.score for d in limited.detections] == scores[:3]


def test_a_region_detects_like_the_cropped_image_in_the_images_pixels(
    detection: detection_pb2_grpc.DetectionServiceStub,
) -> None:
    data = (COCO / "images" / "000000000139.jpg").read_bytes()  # a living room: many objects
    x0, y0, x1, y1 = 200, 100, 460, 330
    buffer = io.BytesIO()
    decode_image(data).crop((x0, y0, x1, y1)).save(buffer, "PNG")
    cropped = detection.Detect(detection_pb2.DetectRequest(image=buffer.getvalue()))
    within = detection.Detect(
        detection_pb2.DetectRequest(image=data, region=common_pb2.Box(x0=x0, y0=y0, x1=x1, y1=y1))
    )
    assert within.detections, "the region holds objects"
    assert (within.image_width, within.image_height) == (640, 426)  # the image's, not the crop's
    assert [d.label for d in within.detections] == [d.label for d in cropped.detections]
    for a, b in zip(within.detections, cropped.detections, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-4)
        assert [a.box.x0, a.box.y0, a.box.x1, a.box.y1] == pytest.approx(
            [b.box.x0 + x0, b.box.y0 + y0, b.box.x1 + x0, b.box.y1 + y0], abs=0.01
        )
        assert x0 <= a.box.x0 < a.box.x1 <= x1 and y0 <= a.box.y0 < a.box.y1 <= y1
    outside = detection_pb2.DetectRequest(
        image=data, region=common_pb2.Box(x0=700, y0=0, x1=800, y1=50)
    )
    assert_invalid_argument(detection.Detect, outside, "region")


@pytest.mark.parametrize(
    ("request_fields", "message_part"),
    [
        ({"score_threshold": 1.5}, "score_threshold"),
        ({"score_threshold": -0.1}, "score_threshold"),
        ({"max_detections": -1}, "max_detections"),
        ({"max_detections": 1001}, "max_detections"),
    ],
)
def test_bad_detection_parameters_are_invalid_arguments(
    detection: detection_pb2_grpc.DetectionServiceStub,
    request_fields: dict[str, float],
    message_part: str,
) -> None:
    request = detection_pb2.DetectRequest(image=corel(0), **request_fields)  # type: ignore[arg-type]
    assert_invalid_argument(detection.Detect, request, message_part)


def upscaled(path: Path, factor: int, fmt: str) -> bytes:
    """A camera-size version of a small image, as JPEG (the decoder may shrink it while
    decoding) or PNG (always decoded in full)."""
    image = decode_image(path.read_bytes())
    big = image.resize((image.width * factor, image.height * factor), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    big.save(buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def test_large_jpegs_embed_like_their_full_decode(
    embedding: embedding_pb2_grpc.EmbeddingServiceStub,
) -> None:
    path = COREL / "450.jpg"
    jpeg, png = upscaled(path, 6, "JPEG"), upscaled(path, 6, "PNG")
    region = common_pb2.Box(x0=300, y0=240, x1=1500, y1=1200)
    replies = [
        embedding.Embed(embedding_pb2.EmbedRequest(image=data, whole_image=True, regions=[region]))
        for data in (jpeg, png)
    ]
    assert (replies[0].image_width, replies[0].image_height) == (
        replies[1].image_width,
        replies[1].image_height,
    )
    for a, b in (
        (replies[0].whole_image, replies[1].whole_image),
        (replies[0].regions[0], replies[1].regions[0]),
    ):
        assert float(vector(a) @ vector(b)) > 0.99


def test_large_jpegs_detect_like_their_full_decode(
    detection: detection_pb2_grpc.DetectionServiceStub,
) -> None:
    path = COCO / "images" / f"{PERSON_IMAGE}.jpg"
    found = [
        detection.Detect(detection_pb2.DetectRequest(image=upscaled(path, 5, fmt)))
        for fmt in ("JPEG", "PNG")
    ]
    assert found[0].image_width == found[1].image_width == decode_image(path.read_bytes()).width * 5
    reduced, full = (
        max((d for d in reply.detections if d.label == "person"), key=lambda d: d.score)
        for reply in found
    )
    box = lambda d: (d.box.x0, d.box.y0, d.box.x1, d.box.y1)  # noqa: E731
    assert iou(box(reduced), box(full)) > 0.9


def test_exif_rotation_is_applied_before_boxes_and_shrinking(
    embedding: embedding_pb2_grpc.EmbeddingServiceStub,
) -> None:
    image = decode_image((COREL / "450.jpg").read_bytes()).resize((1536, 1024))
    # Stored landscape, tagged "rotate 90 clockwise": callers see a 1024x1536 portrait.
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated_tag, upright = io.BytesIO(), io.BytesIO()
    image.save(rotated_tag, "JPEG", quality=95, exif=exif)
    image.transpose(Image.Transpose.ROTATE_270).save(upright, "JPEG", quality=95)
    region = common_pb2.Box(x0=100, y0=700, x1=900, y1=1500)
    replies = [
        embedding.Embed(
            embedding_pb2.EmbedRequest(image=b.getvalue(), whole_image=True, regions=[region])
        )
        for b in (rotated_tag, upright)
    ]
    assert (replies[0].image_width, replies[0].image_height) == (1024, 1536)
    assert float(vector(replies[0].whole_image) @ vector(replies[1].whole_image)) > 0.99
    assert float(vector(replies[0].regions[0]) @ vector(replies[1].regions[0])) > 0.99
