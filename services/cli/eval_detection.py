"""`loupe eval detection`: COCO AP of the detection service beside a reference decode.

Every image goes through the detection service (by default through the gateway's public `Detect`
RPC) and through an independent YOLOX decode of the same ONNX file, run here with ONNX Runtime,
with the same thresholds. pycocotools scores both against the ground truth. The model is the
same on both sides, so any gap between the two comes from preprocessing or decoding: the
service's code is what is measured, the reference is the yardstick.

The reference follows YOLOX's own ONNX demo: OpenCV-style bilinear letterbox padded with 114,
BGR 0-255, grid/stride decode, score = objectness x class, class-aware greedy NMS, boxes divided
by the letterbox ratio. It deliberately imports nothing from services/detection, so that a bug
there cannot hide by being shared.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from loupe.v1 import detection_pb2, detection_pb2_grpc, gateway_pb2_grpc
from services.cli import eval_retrieval
from services.cli.client import (
    DEFAULT_DATA_DIR,
    MAX_MESSAGE_BYTES,
    api_key,
    client_tls,
    gateway_address,
    with_key,
)
from services.common.channels import open_blocking_channel
from services.common.config import ConfigError
from services.common.inference import load_model_spec, model_repository_from_env

# The detection service's most boxes per image (its MAX_DETECTIONS_LIMIT); more would
# overflow the request's field.
MAX_DETECTIONS = 1000

# YOLOX's facts (GUIDE.md section 3), written down here rather than read from config.pbtxt:
# the reference must not share a misconfiguration with the service.
YOLOX_STRIDES = (8, 16, 32)
PAD_VALUE = 114.0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
RPC_TIMEOUT_SECONDS = 60.0
# A reference detection "agrees" when the service returned a box of the same class this close.
AGREEMENT_IOU = 0.9
# Only confident detections count for agreement: the long low-score tail that COCO AP needs is
# where tiny numeric differences legitimately reorder boxes.
AGREEMENT_MIN_SCORE = 0.3


class EvalError(eval_retrieval.EvalError):
    """A problem the user can fix (a path, the JSON, the service address); exit status in
    `status`."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Thresholds:
    score: float
    nms_iou: float
    max_detections: int


@dataclass(frozen=True)
class Boxes:
    """Detections of one image: x0, y0, x1, y1 in original pixels, best first."""

    xyxy: np.ndarray  # [K, 4] float64
    scores: np.ndarray  # [K] float64
    classes: np.ndarray  # [K] int64
    image_size: tuple[int, int] = (0, 0)  # (width, height) the detector saw
    model: str = ""

    def __len__(self) -> int:
        return len(self.scores)


Detector = Callable[[bytes], Boxes]


@dataclass(frozen=True)
class EvalImage:
    path: Path
    image_id: int
    width: int
    height: int


@dataclass(frozen=True)
class Dataset:
    ground_truth: dict[str, Any]
    images: list[EvalImage]
    # Class index i of the model is category `category_of_class[i]` of the JSON.
    category_of_class: list[int]
    images_in_json: int


@dataclass
class PathRun:
    """What one path (service or reference) produced over the images."""

    boxes: list[Boxes] = field(default_factory=list)
    milliseconds: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Report:
    images: int
    service: dict[str, float]
    reference: dict[str, float]
    service_detections: int
    reference_detections: int
    service_ms: float
    reference_ms: float
    agreement: float | None
    size_mismatches: list[str]

    def gap(self, metric: str) -> float | None:
        a, b = self.service[metric], self.reference[metric]
        # pycocotools writes -1 where the images hold no ground truth of that size.
        return None if a < 0 or b < 0 else a - b


# ---- the reference decode ---------------------------------------------------------------


def resize_bilinear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 HxWxC resized as OpenCV's INTER_LINEAR does, which YOLOX's preprocessing uses:
    half-pixel centres, edge pixels repeated, and no anti-aliasing when shrinking (unlike
    Pillow's BILINEAR, whose filter widens with the scale)."""
    src_height, src_width = image.shape[:2]

    def taps(dst: int, src: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        position = np.clip((np.arange(dst) + 0.5) * (src / dst) - 0.5, 0, src - 1)
        low = np.floor(position).astype(np.intp)
        high = np.minimum(low + 1, src - 1)
        return low, high, (position - low).astype(np.float32)

    y0, y1, fy = taps(height, src_height)
    x0, x1, fx = taps(width, src_width)
    pixels = image.astype(np.float32)
    rows = pixels[y0] * (1 - fy)[:, None, None] + pixels[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def greedy_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Indices kept by greedy NMS, best first. Continuous IoU (no +1 on widths, unlike YOLOX's
    numpy demo but as its COCO evaluator's torchvision NMS)."""
    areas = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
    remaining = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    while remaining.size:
        best, others = remaining[0], remaining[1:]
        kept.append(int(best))
        top_left = np.maximum(boxes[best, :2], boxes[others, :2])
        bottom_right = np.minimum(boxes[best, 2:], boxes[others, 2:])
        inter = np.prod((bottom_right - top_left).clip(0), axis=1)
        union = areas[best] + areas[others] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        remaining = others[iou <= iou_threshold]
    return kept


class ReferenceDecoder:
    """YOLOX run with ONNX Runtime and decoded in plain numpy, independently of the service."""

    def __init__(
        self,
        model_path: Path,
        thresholds: Thresholds,
        strides: Sequence[int] = YOLOX_STRIDES,
        model_label: str = "",
    ) -> None:
        import onnxruntime

        try:
            self.session = onnxruntime.InferenceSession(
                str(model_path), providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # ONNX Runtime raises its own, undocumented types
            raise EvalError(f"cannot load the ONNX model {model_path}: {error}") from None
        model_input = self.session.get_inputs()[0]
        height, width = model_input.shape[-2:]
        if not isinstance(height, int) or not isinstance(width, int):
            raise EvalError(f"{model_path}: input {model_input.shape} has no fixed size")
        self.input_name = model_input.name
        self.input_height, self.input_width = height, width
        self.thresholds = thresholds
        self.model_label = model_label or model_path.name
        grids, grid_strides = [], []
        for stride in strides:
            columns, rows = np.meshgrid(np.arange(width // stride), np.arange(height // stride))
            grids.append(np.stack((columns.ravel(), rows.ravel()), axis=1))
            grid_strides.append(np.full((columns.size, 1), stride))
        self.grid = np.concatenate(grids).astype(np.float64)
        self.stride = np.concatenate(grid_strides).astype(np.float64)

    def letterbox(self, rgb: np.ndarray) -> tuple[np.ndarray, float]:
        """[1, 3, H, W] float32 BGR 0-255, and input pixels per original pixel."""
        height, width = rgb.shape[:2]
        ratio = min(self.input_height / height, self.input_width / width)
        new_width, new_height = max(1, int(width * ratio)), max(1, int(height * ratio))
        canvas = np.full((self.input_height, self.input_width, 3), PAD_VALUE, np.float32)
        canvas[:new_height, :new_width] = resize_bilinear(rgb[:, :, ::-1], new_width, new_height)
        return np.ascontiguousarray(canvas.transpose(2, 0, 1)[np.newaxis]), ratio

    def __call__(self, data: bytes) -> Boxes:
        try:
            with Image.open(io.BytesIO(data)) as opened:
                image = ImageOps.exif_transpose(opened) or opened
                rgb = np.asarray(image.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise EvalError(f"reference decode: not a readable image: {error}", 1) from None
        tensor, ratio = self.letterbox(rgb)
        (raw,) = self.session.run(None, {self.input_name: tensor})
        predictions = np.asarray(raw, np.float64).reshape(-1, raw.shape[-1])
        if len(predictions) != len(self.grid):
            raise EvalError(
                f"model output has {len(predictions)} anchor points, the strides give "
                f"{len(self.grid)}: not a YOLOX output"
            )
        centres = (predictions[:, :2] + self.grid) * self.stride
        sizes = np.exp(predictions[:, 2:4]) * self.stride
        boxes = np.concatenate((centres - sizes / 2, centres + sizes / 2), axis=1) / ratio
        scores = predictions[:, 4:5] * predictions[:, 5:]
        return self._select(boxes, scores, width=rgb.shape[1], height=rgb.shape[0])

    def _select(self, boxes: np.ndarray, scores: np.ndarray, *, width: int, height: int) -> Boxes:
        limits = self.thresholds
        picked: list[tuple[np.ndarray, np.ndarray, int]] = []
        for class_index in range(scores.shape[1]):
            (candidates,) = np.nonzero(scores[:, class_index] >= limits.score)
            if candidates.size:
                class_scores = scores[candidates, class_index]
                kept = candidates[greedy_nms(boxes[candidates], class_scores, limits.nms_iou)]
                picked.append((boxes[kept], scores[kept, class_index], class_index))
        if not picked:
            return Boxes(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), (width, height))
        all_boxes = np.concatenate([b for b, _, _ in picked])
        all_scores = np.concatenate([s for _, s, _ in picked])
        all_classes = np.concatenate([np.full(len(s), c) for _, s, c in picked])
        order = np.argsort(-all_scores, kind="stable")[: limits.max_detections]
        chosen = all_boxes[order]
        chosen[:, 0::2] = chosen[:, 0::2].clip(0, width)
        chosen[:, 1::2] = chosen[:, 1::2].clip(0, height)
        visible = (chosen[:, 2] > chosen[:, 0]) & (chosen[:, 3] > chosen[:, 1])
        return Boxes(
            chosen[visible],
            all_scores[order][visible],
            all_classes[order][visible].astype(np.int64),
            (width, height),
            self.model_label,
        )


# ---- the service ------------------------------------------------------------------------


def service_detector(stub: Any, thresholds: Thresholds, target: str) -> Detector:
    """`stub` is the gateway's or the detection service's: the same Detect RPC."""

    def detect(data: bytes) -> Boxes:
        request = detection_pb2.DetectRequest(
            image=data,
            score_threshold=thresholds.score,
            max_detections=thresholds.max_detections,
        )
        try:
            reply: detection_pb2.DetectResponse = stub.Detect(request, timeout=RPC_TIMEOUT_SECONDS)
        except grpc.RpcError as error:
            code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
            details: str = error.details() or ""  # type: ignore[attr-defined]
            # Only this client's own channel error starts so; a gateway's UNAVAILABLE names the
            # backend that is down, and is passed on as it is.
            if code == grpc.StatusCode.UNAVAILABLE and details.lower().startswith(
                "failed to connect"
            ):
                raise EvalError(
                    f"cannot reach the {target} (is `loupe up` running? see --gateway, "
                    f"LOUPE_GATEWAY, --detection-addr): {details}",
                    1,
                ) from None
            raise EvalError(f"{target}: {code.name}: {details}", 1) from None
        found = reply.detections
        return Boxes(
            np.array([[d.box.x0, d.box.y0, d.box.x1, d.box.y1] for d in found]).reshape(-1, 4),
            np.array([d.score for d in found], np.float64),
            np.array([d.class_id for d in found], np.int64),
            (reply.image_width, reply.image_height),
            f"{reply.model_name}/{reply.model_version}",
        )

    return detect


# ---- data and scoring -------------------------------------------------------------------


def read_coco_json(images_dir: Path, coco_json: Path) -> dict[str, Any]:
    """The COCO instances document of `coco_json` (its images, annotations and categories
    lists there), for the images in the folder `images_dir`."""
    if not images_dir.is_dir():
        raise EvalError(f"--images {images_dir}: no such folder")
    if not coco_json.is_file():
        raise EvalError(f"--coco-json {coco_json}: no such file")
    try:
        document = json.loads(coco_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EvalError(f"--coco-json {coco_json}: not readable JSON: {error}") from None
    if not isinstance(document, dict) or not all(
        isinstance(document.get(key), list) for key in ("images", "annotations", "categories")
    ):
        raise EvalError(
            f"--coco-json {coco_json}: not a COCO instances file "
            "(needs 'images', 'annotations' and 'categories' lists)"
        )
    return document


def load_dataset(images_dir: Path, coco_json: Path, num_classes: int = 80) -> Dataset:
    """The images of `images_dir` that the JSON's `images` list names (by file name)."""
    truth = read_coco_json(images_dir, coco_json)
    try:
        by_name = {Path(entry["file_name"]).name: entry for entry in truth["images"]}
        category_ids = sorted(int(c["id"]) for c in truth["categories"])
    except (KeyError, TypeError, ValueError) as error:
        raise EvalError(f"--coco-json {coco_json}: malformed images/categories: {error}") from None
    # Class i is the i-th category by id: identity for a JSON numbered by class index (as
    # coco128-val's), COCO's 1..90 with gaps for the official files; YOLOX maps them so too.
    if len(category_ids) != num_classes:
        raise EvalError(
            f"--coco-json {coco_json}: {len(category_ids)} categories, the model has "
            f"{num_classes} classes; category i (by id) must be class i"
        )
    files = sorted(
        p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise EvalError(f"--images {images_dir}: no image files in it")
    images = [
        EvalImage(
            p,
            int(by_name[p.name]["id"]),
            int(by_name[p.name]["width"]),
            int(by_name[p.name]["height"]),
        )
        for p in files
        if p.name in by_name
    ]
    if not images:
        known = ", ".join(sorted(by_name)[:3]) or "none"
        raise EvalError(
            f"none of the {len(files)} images in {images_dir} (e.g. {files[0].name}) is in the "
            f"'images' list of {coco_json} (file names there: {known}, ...)"
        )
    return Dataset(truth, images, category_ids, len(truth["images"]))


def coco_results(
    images: Sequence[EvalImage], boxes: Sequence[Boxes], category_of_class: Sequence[int]
) -> list[dict[str, Any]]:
    results = []
    for image, found in zip(images, boxes, strict=True):
        for (x0, y0, x1, y1), score, class_index in zip(
            found.xyxy.tolist(), found.scores.tolist(), found.classes.tolist(), strict=True
        ):
            results.append(
                {
                    "image_id": image.image_id,
                    "category_id": category_of_class[class_index],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": score,
                }
            )
    return results


def coco_metrics(
    ground_truth: dict[str, Any], image_ids: Sequence[int], results: list[dict[str, Any]]
) -> dict[str, float]:
    """AP, AP50, AP75, APs/m/l by pycocotools over `image_ids` only."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return dict.fromkeys(METRICS, 0.0)
    # pycocotools talks on stdout; this command's stdout is the table.
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = copy.deepcopy(ground_truth)
        truth.createIndex()
        found = truth.loadRes(copy.deepcopy(results))
        evaluation = COCOeval(truth, found, "bbox")
        evaluation.params.imgIds = list(image_ids)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {name: float(value) for name, value in zip(METRICS, evaluation.stats[:6], strict=True)}


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod((bottom_right - top_left).clip(0), axis=2)
    area_a = np.prod((a[:, 2:] - a[:, :2]).clip(0), axis=1)
    area_b = np.prod((b[:, 2:] - b[:, :2]).clip(0), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def agreement(service: Sequence[Boxes], reference: Sequence[Boxes]) -> float | None:
    """Share of the reference's confident detections that the service also found (same class,
    IoU >= AGREEMENT_IOU): where AP says *that* the two differ, this says whether it is the
    boxes themselves."""
    matched = total = 0
    for ours, theirs in zip(service, reference, strict=True):
        confident = theirs.scores >= AGREEMENT_MIN_SCORE
        total += int(confident.sum())
        if not confident.any() or not len(ours):
            continue
        iou = pairwise_iou(theirs.xyxy[confident], ours.xyxy)
        same_class = theirs.classes[confident][:, None] == ours.classes[None, :]
        matched += int(((iou >= AGREEMENT_IOU) & same_class).any(axis=1).sum())
    return matched / total if total else None


def compare(
    dataset: Dataset,
    service: Detector,
    reference: Detector,
    *,
    progress: bool = True,
) -> Report:
    """Run both detectors over the dataset, one image at a time so that neither's timing
    includes the other's, and score them."""
    runs = {"service": PathRun(), "reference": PathRun()}
    mismatches = []
    for image in tqdm(
        dataset.images,
        unit="img",
        file=sys.stderr,
        disable=not progress,
        mininterval=0.5,
        desc="evaluating",
    ):
        try:
            data = image.path.read_bytes()
        except OSError as error:
            raise EvalError(f"{image.path}: cannot read: {error.strerror or error}", 1) from None
        for name, detect in (("service", service), ("reference", reference)):
            started = time.perf_counter()
            try:
                found = detect(data)
            except EvalError as error:
                raise EvalError(f"{image.path.name}: {error}", error.status) from None
            runs[name].milliseconds.append((time.perf_counter() - started) * 1000)
            runs[name].boxes.append(found)
        # The JSON's boxes are in the pixel space it records; a detector that sees another
        # size (an EXIF rotation, say) scores near zero on that image for no fault of its own.
        seen = runs["service"].boxes[-1].image_size
        if seen != (image.width, image.height):
            mismatches.append(f"{image.path.name}: JSON {image.width}x{image.height}, seen {seen}")

    image_ids = [image.image_id for image in dataset.images]
    metrics = {
        name: coco_metrics(
            dataset.ground_truth,
            image_ids,
            coco_results(dataset.images, run.boxes, dataset.category_of_class),
        )
        for name, run in runs.items()
    }
    return Report(
        images=len(dataset.images),
        service=metrics["service"],
        reference=metrics["reference"],
        service_detections=sum(len(b) for b in runs["service"].boxes),
        reference_detections=sum(len(b) for b in runs["reference"].boxes),
        service_ms=statistics.median(runs["service"].milliseconds),
        reference_ms=statistics.median(runs["reference"].milliseconds),
        agreement=agreement(runs["service"].boxes, runs["reference"].boxes),
        size_mismatches=mismatches,
    )


# ---- output -----------------------------------------------------------------------------


def format_table(report: Report) -> str:
    def figure(value: float | None, signed: bool = False) -> str:
        if value is None or (value < 0 and not signed):
            return "-"
        return f"{value:+.4f}" if signed else f"{value:.4f}"

    header = f"{'':<10}" + "".join(f"{m:>8}" for m in METRICS)
    header += f"{'images':>8}{'detections':>12}{'ms/image':>10}"
    rows = [header]
    for name, metrics, detections, ms in (
        ("service", report.service, report.service_detections, report.service_ms),
        ("reference", report.reference, report.reference_detections, report.reference_ms),
    ):
        rows.append(
            f"{name:<10}"
            + "".join(f"{figure(metrics[m]):>8}" for m in METRICS)
            + f"{report.images:>8}{detections:>12}{ms:>10.1f}"
        )
    rows.append(
        f"{'gap':<10}"
        + "".join(f"{figure(report.gap(m), signed=True):>8}" for m in METRICS)
        + f"{'':>8}{report.service_detections - report.reference_detections:>+12}{'':>10}"
    )
    return "\n".join(rows)


def report_json(report: Report, settings: dict[str, Any]) -> dict[str, Any]:
    def rounded(metrics: dict[str, float]) -> dict[str, float]:
        return {m: round(v, 6) for m, v in metrics.items()}

    return {
        "images": report.images,
        "service": {
            **rounded(report.service),
            "detections": report.service_detections,
            "ms_per_image_median": round(report.service_ms, 2),
        },
        "reference": {
            **rounded(report.reference),
            "detections": report.reference_detections,
            "ms_per_image_median": round(report.reference_ms, 2),
        },
        "gap": {
            **{m: None if (g := report.gap(m)) is None else round(g, 6) for m in METRICS},
            "detections": report.service_detections - report.reference_detections,
        },
        "agreement": None if report.agreement is None else round(report.agreement, 6),
        "size_mismatches": report.size_mismatches,
        **settings,
    }


# ---- the command ------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "COCO AP of the detection service beside a reference decode of the same ONNX file, "
        "computed in the same run with the same thresholds; a preprocessing or decoding error "
        "in the service shows as a gap. Exit status: 0 when |service AP - reference AP| <= "
        "--max-gap, 1 when it is larger or the service fails, 2 for a bad path or JSON."
    )
    parser.add_argument("--images", required=True, metavar="DIR", help="folder of images")
    parser.add_argument(
        "--coco-json",
        required=True,
        metavar="FILE",
        help="COCO instances JSON; images are matched by file name, class i = the i-th "
        "category by id",
    )
    parser.add_argument(
        "--gateway",
        metavar="HOST:PORT",
        help="gateway whose Detect is measured (default: LOUPE_GATEWAY, else the local stack)",
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help="API key for the gateway (default: LOUPE_API_KEY, else the local stack's own key)",
    )
    parser.add_argument(
        "--data-dir",
        default=str(DEFAULT_DATA_DIR),
        metavar="DIR",
        help="the local stack's directory, to find its gateway (default ./.loupe)",
    )
    parser.add_argument(
        "--detection-addr",
        metavar="HOST:PORT",
        help="measure a detection service directly instead of through the gateway",
    )
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="ONNX file for the reference (default: the detector in LOUPE_MODEL_REPOSITORY, "
        "LOUPE_DETECTION_MODEL and _VERSION, as the service finds it)",
    )
    parser.add_argument(
        "--score-threshold",
        type=float,
        metavar="S",
        default=0.001,
        help="minimum score, both paths (default 0.001, as COCO evaluations use)",
    )
    parser.add_argument(
        "--max-detections",
        type=int,
        metavar="N",
        default=100,
        help="boxes per image, both paths (default 100, COCO's maxDets)",
    )
    parser.add_argument(
        "--nms-iou",
        type=float,
        metavar="IOU",
        default=0.45,
        help="the reference's NMS IoU; must equal the service's LOUPE_DETECTION_NMS_IOU, which "
        "the API neither takes nor reports (default 0.45, the service's default)",
    )
    parser.add_argument(
        "--max-gap",
        type=float,
        metavar="AP",
        default=0.005,
        help="exit 1 when |service AP - reference AP| exceeds this (default 0.005)",
    )
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N images by name")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


@contextlib.contextmanager
def connect(args: argparse.Namespace) -> Iterator[tuple[Any, str]]:
    """The stub to measure and what it is, for messages."""
    key = ""
    if args.detection_addr:
        address, target = args.detection_addr, f"detection service at {args.detection_addr}"
    else:
        address = gateway_address(args.gateway, Path(args.data_dir))
        target = f"gateway at {address}"
        key = api_key(args.api_key, address, Path(args.data_dir))
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    tls = client_tls(address, Path(args.data_dir))
    with open_blocking_channel(address, tls, options=options) as channel:
        stub = (
            detection_pb2_grpc.DetectionServiceStub(channel)
            if args.detection_addr
            else gateway_pb2_grpc.GatewayStub(with_key(channel, key))
        )
        yield stub, target


def reference_model(args: argparse.Namespace) -> tuple[Path, str]:
    """The ONNX file and, when it comes from the repository, 'name/version' to check the
    service against."""
    if args.model:
        path = Path(args.model)
        if not path.is_file():
            raise EvalError(f"--model {path}: no such file")
        return path, ""
    try:
        spec = load_model_spec(
            model_repository_from_env(),
            os.environ.get("LOUPE_DETECTION_MODEL", "").strip() or "detector",
            os.environ.get("LOUPE_DETECTION_MODEL_VERSION", "").strip(),
        )
    except ConfigError as error:
        raise EvalError(f"reference model: {error} (or pass --model PATH)") from None
    return spec.path, f"{spec.name}/{spec.version}"


def _check_arguments(args: argparse.Namespace) -> Thresholds:
    if not 0.0 < args.score_threshold <= 1.0:
        raise EvalError(f"--score-threshold {args.score_threshold}: must be in (0, 1]")
    if not 0.0 < args.nms_iou <= 1.0:
        raise EvalError(f"--nms-iou {args.nms_iou}: must be in (0, 1]")
    if not 1 <= args.max_detections <= MAX_DETECTIONS:
        raise EvalError(f"--max-detections {args.max_detections}: must be 1 to {MAX_DETECTIONS}")
    if args.limit is not None and args.limit < 1:
        raise EvalError(f"--limit {args.limit}: must be at least 1")
    if not math.isfinite(args.max_gap) or args.max_gap < 0:
        raise EvalError(f"--max-gap {args.max_gap}: must be a number >= 0")
    return Thresholds(args.score_threshold, args.nms_iou, args.max_detections)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except EvalError as error:
        print(f"loupe eval detection: {error}", file=sys.stderr, flush=True)
        return error.status


def _run(args: argparse.Namespace) -> int:
    thresholds = _check_arguments(args)
    dataset = load_dataset(Path(args.images), Path(args.coco_json))
    if args.limit:
        dataset = Dataset(
            dataset.ground_truth,
            dataset.images[: args.limit],
            dataset.category_of_class,
            dataset.images_in_json,
        )
    model_path, model_label = reference_model(args)
    with connect(args) as (stub, target):
        service = service_detector(stub, thresholds, target)
        # One call before loading anything else: an unreachable service, or one running
        # another model than the reference would load, fails in a second, not after the run.
        first = dataset.images[0].path
        try:
            probe = service(first.read_bytes())
        except OSError as error:
            raise EvalError(f"{first}: cannot read: {error.strerror or error}", 1) from None
        if model_label and probe.model != model_label:
            raise EvalError(
                f"the {target} runs {probe.model}, the reference would load {model_label} "
                f"({model_path}); pass --model with the service's ONNX file",
                1,
            )
        reference = ReferenceDecoder(model_path, thresholds, model_label=model_label)
        report = compare(dataset, service, reference, progress=not args.quiet)

    gap = report.gap("AP")
    passed = gap is not None and abs(gap) <= args.max_gap
    print(format_table(report))
    print(
        f"\n{report.images} of the {dataset.images_in_json} images in the JSON; "
        f"service: {target}, model {probe.model}; reference: {model_path}\n"
        f"both: score >= {thresholds.score}, class-aware NMS IoU {thresholds.nms_iou} "
        f"(reference; the service's is its LOUPE_DETECTION_NMS_IOU), "
        f"at most {thresholds.max_detections} per image"
    )
    if report.agreement is not None:
        print(
            f"reference detections scoring >= {AGREEMENT_MIN_SCORE} that the service also "
            f"found (same class, IoU >= {AGREEMENT_IOU}): {report.agreement:.1%}"
        )
    for mismatch in report.size_mismatches[:5]:
        print(f"warning: image size differs from the JSON: {mismatch}", file=sys.stderr)
    verdict = "within" if passed else "EXCEEDS"
    print(f"AP gap {'-' if gap is None else f'{gap:+.4f}'} {verdict} --max-gap {args.max_gap}")

    if args.json:
        settings = {
            "images_in_json": dataset.images_in_json,
            "service_target": target,
            "service_model": probe.model,
            "reference_model": str(model_path),
            "score_threshold": thresholds.score,
            "nms_iou": thresholds.nms_iou,
            "max_detections": thresholds.max_detections,
            "max_gap": args.max_gap,
            "within_max_gap": passed,
        }
        try:
            Path(args.json).write_text(json.dumps(report_json(report, settings), indent=2) + "\n")
        except OSError as error:
            raise EvalError(f"--json {args.json}: cannot write: {error}", 1) from None
    return 0 if passed else 1
