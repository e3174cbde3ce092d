"""Decoding YOLOX's raw output into boxes, with class-aware NMS, in plain numpy.

Follows YOLOX's reference ONNX demo (`demo_postprocess` then `multiclass_nms_class_aware`):
score = objectness x class probability, and NMS runs per class, so one box may be kept for
more than one class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Candidates beyond this many (by score) are dropped before NMS: a caller's tiny threshold
# must not turn one request into seconds of quadratic NMS.
PRE_NMS_TOP_K = 3000


@dataclass(frozen=True)
class Detections:
    boxes: np.ndarray  # [K, 4] float32 x0, y0, x1, y1 in original image pixels
    scores: np.ndarray  # [K] float32, descending
    class_ids: np.ndarray  # [K] int64

    def __len__(self) -> int:
        return len(self.scores)


def anchor_points(
    input_height: int, input_width: int, strides: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Grid cell (x, y) [A, 2] and stride [A, 1] of every anchor point, in the model's order:
    stride by stride, each grid row-major with x fastest."""
    cells, cell_strides = [], []
    for stride in strides:
        xs, ys = np.meshgrid(np.arange(input_width // stride), np.arange(input_height // stride))
        grid = np.stack((xs, ys), axis=2).reshape(-1, 2)
        cells.append(grid)
        cell_strides.append(np.full((len(grid), 1), stride))
    return (
        np.concatenate(cells).astype(np.float32),
        np.concatenate(cell_strides).astype(np.float32),
    )


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS; indices of the kept boxes, best first."""
    x0, y0, x1, y1 = boxes.T
    areas = np.maximum(x1 - x0, 0) * np.maximum(y1 - y0, 0)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        overlap_w = np.maximum(0.0, np.minimum(x1[best], x1[rest]) - np.maximum(x0[best], x0[rest]))
        overlap_h = np.maximum(0.0, np.minimum(y1[best], y1[rest]) - np.maximum(y0[best], y0[rest]))
        intersection = overlap_w * overlap_h
        union = areas[best] + areas[rest] - intersection
        iou = np.where(union > 0, intersection / np.maximum(union, 1e-12), 0.0)
        order = rest[iou <= iou_threshold]
    return np.array(keep, dtype=np.int64)


class YoloxDecoder:
    def __init__(self, input_height: int, input_width: int, strides: Sequence[int]) -> None:
        self.grid, self.stride = anchor_points(input_height, input_width, strides)

    @property
    def num_anchors(self) -> int:
        return len(self.grid)

    def __call__(
        self,
        raw: np.ndarray,
        *,
        ratio: float,
        image_width: int,
        image_height: int,
        score_threshold: float,
        iou_threshold: float,
        max_detections: int,
    ) -> Detections:
        """`raw` is the model output [1, A, 5 + classes] for one letterboxed image."""
        if raw.ndim != 3 or raw.shape[0] != 1 or raw.shape[1] != self.num_anchors:
            raise ValueError(f"expected output [1, {self.num_anchors}, 5+C], got {raw.shape}")
        predictions = raw[0]
        centers = (predictions[:, :2] + self.grid) * self.stride
        sizes = np.exp(predictions[:, 2:4]) * self.stride
        boxes = np.concatenate((centers - sizes / 2, centers + sizes / 2), axis=1)
        scores = predictions[:, 4:5] * predictions[:, 5:]

        anchors, classes = np.nonzero(scores >= score_threshold)
        candidate_scores = scores[anchors, classes]
        if len(candidate_scores) > PRE_NMS_TOP_K:
            top = np.argpartition(-candidate_scores, PRE_NMS_TOP_K)[:PRE_NMS_TOP_K]
            anchors, classes, candidate_scores = anchors[top], classes[top], candidate_scores[top]

        kept = [
            members[nms(boxes[anchors[members]], candidate_scores[members], iou_threshold)]
            for members in (np.flatnonzero(classes == c) for c in np.unique(classes))
        ]
        chosen = np.concatenate(kept) if kept else np.zeros(0, np.int64)
        chosen = chosen[np.argsort(-candidate_scores[chosen], kind="stable")][:max_detections]

        # NMS ran in letterbox pixels; IoU does not change when mapping back by one ratio.
        final_boxes = boxes[anchors[chosen]] / ratio
        final_boxes[:, 0::2] = np.clip(final_boxes[:, 0::2], 0, image_width)
        final_boxes[:, 1::2] = np.clip(final_boxes[:, 1::2], 0, image_height)
        # A box lying wholly outside the image has nothing left after clipping.
        visible = (final_boxes[:, 2] > final_boxes[:, 0]) & (final_boxes[:, 3] > final_boxes[:, 1])
        return Detections(
            boxes=final_boxes[visible].astype(np.float32),
            scores=candidate_scores[chosen][visible].astype(np.float32),
            class_ids=classes[chosen][visible].astype(np.int64),
        )
