"""YOLOX decoding and NMS on synthetic raw outputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from services.detection.yolox import YoloxDecoder

STRIDES = (8, 16, 32)
NUM_CLASSES = 80


@pytest.fixture(scope="module")
def decoder() -> YoloxDecoder:
    return YoloxDecoder(416, 416, STRIDES)


def anchor_index(stride: int, x: int, y: int) -> int:
    """Position of grid cell (x, y) of `stride` in the model's output order."""
    index = 0
    for s in STRIDES:
        cells = 416 // s
        if s == stride:
            return index + y * cells + x
        index += cells * cells
    raise ValueError(stride)


def empty_output() -> np.ndarray:
    return np.zeros((1, 3549, 5 + NUM_CLASSES), np.float32)


def put(
    raw: np.ndarray,
    index: int,
    *,
    offset: tuple[float, float] = (0.0, 0.0),
    size_in_strides: tuple[float, float] = (1.0, 1.0),
    objectness: float,
    classes: dict[int, float],
) -> None:
    raw[0, index, 0:2] = offset
    raw[0, index, 2:4] = np.log(size_in_strides)
    raw[0, index, 4] = objectness
    for class_id, probability in classes.items():
        raw[0, index, 5 + class_id] = probability


def decode(decoder: YoloxDecoder, raw: np.ndarray, **overrides: float) -> tuple:
    options = {
        "ratio": 1.0,
        "image_width": 416,
        "image_height": 416,
        "score_threshold": 0.3,
        "iou_threshold": 0.45,
        "max_detections": 20,
    }
    options.update(overrides)
    detections = decoder(raw, **options)  # type: ignore[arg-type]
    return detections.boxes, detections.scores, detections.class_ids


def test_anchor_layout_matches_the_model_output(decoder: YoloxDecoder) -> None:
    assert decoder.num_anchors == 52 * 52 + 26 * 26 + 13 * 13 == 3549
    index = anchor_index(16, x=5, y=3)
    np.testing.assert_array_equal(decoder.grid[index], [5, 3])
    assert decoder.stride[index, 0] == 16


def test_a_known_anchor_decodes_to_its_box_in_original_pixels(decoder: YoloxDecoder) -> None:
    raw = empty_output()
    # Cell (5, 3) at stride 16, centre offset (0.5, 0.25) cells, size 4x2 strides:
    # centre (88, 52) and size 64x32 in letterbox pixels.
    put(
        raw,
        anchor_index(16, x=5, y=3),
        offset=(0.5, 0.25),
        size_in_strides=(4, 2),
        objectness=0.9,
        classes={3: 0.8},
    )

    # The original image was twice the letterbox size.
    boxes, scores, class_ids = decode(decoder, raw, ratio=0.5, image_width=832, image_height=832)

    np.testing.assert_allclose(boxes, [[112, 72, 240, 136]], rtol=1e-5)
    np.testing.assert_allclose(scores, [0.72], rtol=1e-6)
    np.testing.assert_array_equal(class_ids, [3])


def test_boxes_are_clipped_to_the_image(decoder: YoloxDecoder) -> None:
    raw = empty_output()
    put(raw, anchor_index(32, 0, 0), size_in_strides=(4, 4), objectness=1.0, classes={0: 0.9})

    boxes, _, _ = decode(decoder, raw, ratio=1.0, image_width=300, image_height=200)

    np.testing.assert_allclose(boxes, [[0, 0, 64, 64]])


def test_nms_is_per_class(decoder: YoloxDecoder) -> None:
    raw = empty_output()
    # 80x80 boxes at stride 8: neighbouring cells overlap with IoU 72*80 / (2*80*80 - 72*80) = 0.82
    big = (10.0, 10.0)
    put(raw, anchor_index(8, 20, 20), size_in_strides=big, objectness=1.0, classes={2: 0.9})
    put(raw, anchor_index(8, 21, 20), size_in_strides=big, objectness=1.0, classes={2: 0.8})
    put(raw, anchor_index(8, 22, 20), size_in_strides=big, objectness=1.0, classes={7: 0.7})
    # One anchor confident in two classes is kept for both, as YOLOX's class-aware NMS does.
    put(raw, anchor_index(32, 2, 10), objectness=1.0, classes={5: 0.6, 6: 0.5})

    boxes, scores, class_ids = decode(decoder, raw)

    np.testing.assert_array_equal(class_ids, [2, 7, 5, 6])
    np.testing.assert_allclose(scores, [0.9, 0.7, 0.6, 0.5], rtol=1e-6)
    np.testing.assert_allclose(boxes[0], [120, 120, 200, 200])
    np.testing.assert_array_equal(boxes[2], boxes[3])


def test_score_is_objectness_times_class_probability_against_the_threshold(
    decoder: YoloxDecoder,
) -> None:
    raw = empty_output()
    put(raw, anchor_index(8, 5, 5), objectness=0.5, classes={1: 0.9})  # 0.45
    put(raw, anchor_index(8, 40, 40), objectness=0.9, classes={1: 0.5})  # 0.45
    put(raw, anchor_index(16, 10, 10), objectness=0.6, classes={1: 0.5})  # 0.30

    assert len(decode(decoder, raw, score_threshold=0.4)[1]) == 2
    assert len(decode(decoder, raw, score_threshold=0.25)[1]) == 3
    assert len(decode(decoder, raw, score_threshold=0.5)[1]) == 0


def test_only_the_best_max_detections_are_kept(decoder: YoloxDecoder) -> None:
    raw = empty_output()
    for i, score in enumerate([0.5, 0.9, 0.6, 0.8, 0.7]):
        put(raw, anchor_index(16, 4 * i, 0), objectness=1.0, classes={0: score})

    _, scores, _ = decode(decoder, raw, max_detections=3)

    np.testing.assert_allclose(scores, [0.9, 0.8, 0.7], rtol=1e-6)


def test_no_detections_is_an_empty_result(decoder: YoloxDecoder) -> None:
    boxes, scores, class_ids = decode(decoder, empty_output())
    assert boxes.shape == (0, 4)
    assert scores.shape == class_ids.shape == (0,)


def test_an_output_of_another_shape_is_refused(decoder: YoloxDecoder) -> None:
    with pytest.raises(ValueError, match="3549"):
        decode(decoder, np.zeros((1, 8400, 85), np.float32))
