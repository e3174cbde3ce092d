"""Offline harness for crop and object search: how the defaults of the object settings were
chosen (docs/quality.md, "Objects: what each change adds").

It runs the engine's own models through the repo's own code in process (no stack): the
detector's letterbox and YOLOX decoding (services/detection), the embedder's region
preparation (services/embedding/preprocess.py), ranking's alpha-QE (services/ranking/scoring.py)
and DBA's augmentation (services/retrieval/augmentation.py). On a labelled set (COCO json), it
detects objects in every image as indexing would, embeds whole images and object crops, then
scores crop queries (ground-truth boxes, min side 64) against every other image under
variants of the scoring. A hit is relevant when its image holds a ground-truth object of the
query's category (the relevance of `loupe eval objects`).

To avoid fitting 128 images, parameters are chosen on the queries of even image ids (`--split
even`) and reported on the odd ones (`--split odd`); `all` reports both halves together.

    nice -n 19 .venv/bin/python tools/objects_offline.py extract \\
        --data ../shared/data/coco128-val --cache /tmp/objects-offline.npz
    .venv/bin/python tools/objects_offline.py evaluate --cache /tmp/objects-offline.npz
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services" / "api"))

from services.common.images import EncodedImage, PixelBox  # noqa: E402
from services.common.inference import OnnxRuntimeBackend, load_model_spec  # noqa: E402
from services.detection.labels import LABEL_SETS  # noqa: E402
from services.detection.preprocess import LetterboxPreprocessing  # noqa: E402
from services.detection.yolox import YoloxDecoder  # noqa: E402
from services.embedding.preprocess import StretchPreprocessing, prepare_batch  # noqa: E402
from services.ranking import scoring  # noqa: E402
from services.retrieval import augmentation  # noqa: E402

MIN_QUERY_SIDE = 64
# Detections are kept down to this score, so that thresholds above it can be compared
# without detecting again (NMS only suppresses a box for a higher-scoring one).
FLOOR_SCORE = 0.1
# Object crops are embedded down to this side, for the same reason.
FLOOR_SIDE = 16
PADDINGS = (0.0, 0.1, 0.2)
MAX_DETECTIONS = 20
NMS_IOU = 0.45


def padded(box: Sequence[float], pad: float) -> PixelBox:
    """The box grown by `pad` of its width and height on each side (clipped later)."""
    x0, y0, x1, y1 = box
    dx, dy = pad * (x1 - x0), pad * (y1 - y0)
    return PixelBox(x0 - dx, y0 - dy, x1 + dx, y1 + dy)


def category_names(coco: dict[str, list[dict[str, object]]]) -> dict[int, str]:
    """Category id -> name in the detector's vocabulary: coco128-val's json names its
    categories by YOLO class index ("0", "1", ...), which are COCO80's positions."""
    labels = LABEL_SETS["coco80"]
    return {
        int(str(c["id"])): labels[int(str(c["name"]))]
        if str(c["name"]).isdigit()
        else str(c["name"])
        for c in coco["categories"]
    }


class Models:
    def __init__(self, repository: Path, threads: int) -> None:
        embed_spec = load_model_spec(repository, "embedder")
        self.stretch = StretchPreprocessing.from_spec(embed_spec)
        self.embedder = OnnxRuntimeBackend(embed_spec, threads=threads, spinning=False)
        self.embed_io = (embed_spec.inputs[0].name, embed_spec.outputs[0].name)
        self.batch = max(1, embed_spec.max_batch_size)
        detect_spec = load_model_spec(repository, "detector")
        self.letterbox = LetterboxPreprocessing.from_spec(detect_spec)
        strides = [int(s) for s in detect_spec.parameter("loupe.strides").split(",")]
        self.decoder = YoloxDecoder(
            self.letterbox.input_height, self.letterbox.input_width, strides
        )
        self.labels = LABEL_SETS[detect_spec.parameter("loupe.labels")]
        self.detector = OnnxRuntimeBackend(detect_spec, threads=threads, spinning=False)
        self.detect_io = (detect_spec.inputs[0].name, detect_spec.outputs[0].name)

    def embed(self, data: bytes, *, whole: bool, regions: list[PixelBox]) -> np.ndarray:
        if not whole and not regions:
            return np.zeros((0, 1280), np.float32)
        _, tensors = prepare_batch(
            data, whole_image=whole, regions=regions, preprocess=self.stretch, max_pixels=10**8
        )
        out = []
        for start in range(0, len(tensors), self.batch):
            result = asyncio.run(
                self.embedder.infer({self.embed_io[0]: tensors[start : start + self.batch]})
            )
            out.append(result[self.embed_io[1]])
        return augmentation.normalise(np.concatenate(out)).astype(np.float32)

    def detect(self, data: bytes) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Boxes [K, 4] in original pixels, scores [K], labels: the detection service's path."""
        encoded = EncodedImage(data, 10**8)
        width, height = encoded.size
        ratio = min(self.letterbox.input_height / height, self.letterbox.input_width / width)
        image = encoded.decode(at_least=(math.ceil(width * ratio), math.ceil(height * ratio)))
        boxed = self.letterbox(image)
        raw = asyncio.run(self.detector.infer({self.detect_io[0]: boxed.tensor}))
        found = self.decoder(
            raw[self.detect_io[1]],
            ratio=boxed.ratio,
            image_width=image.size[0],
            image_height=image.size[1],
            score_threshold=FLOOR_SCORE,
            iou_threshold=NMS_IOU,
            max_detections=MAX_DETECTIONS,
        )
        sx, sy = width / image.size[0], height / image.size[1]
        boxes = found.boxes * np.array([sx, sy, sx, sy], dtype=np.float32)
        return boxes, found.scores, [self.labels[c] for c in found.class_ids.tolist()]


def extract(data_dir: Path, repository: Path, cache: Path, threads: int) -> None:
    coco: dict[str, Any] = json.loads((data_dir / "instances_val2017_subset.json").read_text())
    names = category_names(coco)
    images = sorted(coco["images"], key=lambda i: i["id"])
    models = Models(repository, threads)
    store: dict[str, list[object]] = {
        k: []
        for k in (
            "image_id",
            "whole",
            "obj_image",
            "obj_box",
            "obj_score",
            "obj_label",
            *[f"obj_vec_{p}" for p in PADDINGS],
            "gt_image",
            "gt_category",
            "q_image",
            "q_box",
            "q_category",
            *[f"q_vec_{p}" for p in PADDINGS],
            "q_crop_label",
            "q_crop_score",
        )
    }
    by_image: dict[int, list[dict[str, Any]]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    started = time.monotonic()
    for n, info in enumerate(images):
        data = (data_dir / "images" / info["file_name"]).read_bytes()
        image_id = info["id"]
        store["image_id"].append(image_id)
        store["whole"].append(models.embed(data, whole=True, regions=[])[0])
        boxes, scores, labels = models.detect(data)
        keep = [
            k
            for k in range(len(scores))
            if min(boxes[k][2] - boxes[k][0], boxes[k][3] - boxes[k][1]) >= FLOOR_SIDE
        ]
        for pad in PADDINGS:
            vecs = models.embed(
                data, whole=False, regions=[padded(boxes[k].tolist(), pad) for k in keep]
            )
            store[f"obj_vec_{pad}"].extend(list(vecs))
        for k in keep:
            store["obj_image"].append(image_id)
            store["obj_box"].append(boxes[k])
            store["obj_score"].append(float(scores[k]))
            store["obj_label"].append(labels[k])
        queries = []
        for a in by_image.get(image_id, []):
            store["gt_image"].append(image_id)
            store["gt_category"].append(names[a["category_id"]])
            x, y, w, h = a["bbox"]
            if min(w, h) >= MIN_QUERY_SIDE:
                queries.append((x, y, x + w, y + h, names[a["category_id"]]))
        for pad in PADDINGS:
            vecs = models.embed(data, whole=False, regions=[padded(q[:4], pad) for q in queries])
            store[f"q_vec_{pad}"].extend(list(vecs))
        pixels = Image.open(io.BytesIO(data)).convert("RGB")
        for q in queries:
            store["q_image"].append(image_id)
            store["q_box"].append(np.array(q[:4], np.float32))
            store["q_category"].append(q[4])
            # Detection on the crop itself: the fallback label of a query region.
            buffer = io.BytesIO()
            x0, y0, x1, y1 = (int(round(v)) for v in q[:4])
            pixels.crop((x0, y0, x1, y1)).save(buffer, format="PNG")
            _, crop_scores, crop_labels = models.detect(buffer.getvalue())
            store["q_crop_label"].append(crop_labels[0] if len(crop_labels) else "")
            store["q_crop_score"].append(float(crop_scores[0]) if len(crop_scores) else 0.0)
        print(
            f"{n + 1}/{len(images)} images, {len(store['q_image'])} queries, "
            f"{len(store['obj_image'])} objects, {time.monotonic() - started:.0f} s",
            file=sys.stderr,
        )
    arrays: dict[str, Any] = {k: np.array(v) for k, v in store.items()}
    np.savez_compressed(cache, **arrays)


# ---- evaluation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    objects: bool = True
    # Index time: detections kept from this score and this side (px), at most this many.
    threshold: float = 0.3
    min_side: float = 32
    max_objects: int = 10
    pad_index: float = 0.0
    pad_query: float = 0.0
    # Whole rows for crop queries: "dba" (the stored, augmented vectors), "raw".
    whole_rows: str = "dba"
    qe: bool = True
    # Same-label bonus, and where the query's label comes from: "overlap" (best detection
    # of the query's image overlapping the crop with IoU >= label_iou), "crop" (detection
    # on the crop), "both" (overlap, else crop), "gt" (an oracle, for reference only).
    label_bonus: float = 0.0
    label_source: str = "both"
    label_iou: float = 0.5
    # "row": only a candidate row labelled so; "item": any object of the item.
    label_scope: str = "item"
    # Item score from its rows: "max", or "fuse" = w * whole + (1 - w) * best object.
    combine: str = "max"
    fuse_whole: float = 0.5
    exact: bool = False  # the exact baseline: crop vector vs raw whole-image vectors


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    if len(boxes) == 0:
        return np.zeros(0)
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def average_precision(relevant: np.ndarray) -> float:
    """AP of a ranked list of booleans over the relevant items in it."""
    total = int(relevant.sum())
    if total == 0:
        return float("nan")
    hits = np.cumsum(relevant)
    ranks = np.arange(1, len(relevant) + 1)
    return float((hits / ranks)[relevant].sum() / total)


class Data:
    def __init__(self, cache: Path) -> None:
        z = np.load(cache, allow_pickle=False)
        self.z = {k: z[k] for k in z.files}
        self.images = self.z["image_id"]
        self.whole = self.z["whole"]
        self.whole_dba = augmentation.augment_all(self.whole, 5, 3.0)
        self.position = {int(i): p for p, i in enumerate(self.images)}
        gt: dict[int, set[str]] = {}
        labels = LABEL_SETS["coco80"]

        def name(c: str) -> str:  # caches made before category_names
            return labels[int(c)] if c.isdigit() else c

        self.z["q_category"] = np.array([name(str(c)) for c in self.z["q_category"]])
        for i, c in zip(self.z["gt_image"], self.z["gt_category"], strict=True):
            gt.setdefault(int(i), set()).add(name(str(c)))
        self.gt = gt
        self.obj_image = self.z["obj_image"]
        self.obj_box = self.z["obj_box"]
        self.obj_score = self.z["obj_score"]
        self.obj_label = self.z["obj_label"]

    def index_objects(self, v: Variant) -> np.ndarray:
        """Positions of the object rows indexing would keep, per the variant."""
        sides = np.minimum(
            self.obj_box[:, 2] - self.obj_box[:, 0], self.obj_box[:, 3] - self.obj_box[:, 1]
        )
        ok = (self.obj_score >= v.threshold) & (sides >= v.min_side)
        kept: list[int] = []
        count: dict[int, int] = {}
        for p in np.flatnonzero(ok).tolist():  # in detection order: score, descending
            image = int(self.obj_image[p])
            if count.get(image, 0) < v.max_objects:
                count[image] = count.get(image, 0) + 1
                kept.append(p)
        return np.array(kept, dtype=np.int64)

    def query_label(self, v: Variant, q: int) -> str:
        if v.label_source == "gt":
            return str(self.z["q_category"][q])
        image = int(self.z["q_image"][q])
        if v.label_source in ("overlap", "both"):
            rows = np.flatnonzero((self.obj_image == image) & (self.obj_score >= v.threshold))
            if len(rows):
                overlaps = iou(self.z["q_box"][q], self.obj_box[rows])
                best = int(np.argmax(overlaps))
                if overlaps[best] >= v.label_iou:
                    return str(self.obj_label[rows[best]])
        if v.label_source in ("crop", "both") and self.z["q_crop_score"][q] >= v.threshold:
            return str(self.z["q_crop_label"][q])
        return ""


def run_variant(data: Data, v: Variant, queries: np.ndarray) -> dict[str, float]:
    z = data.z
    n_items = len(data.images)
    objects = data.index_objects(v) if v.objects else np.zeros(0, np.int64)
    obj_vecs = z[f"obj_vec_{v.pad_index}"][objects] if len(objects) else np.zeros((0, 1280))
    obj_item = np.array([data.position[int(i)] for i in data.obj_image[objects]], np.int64)
    obj_labels = data.obj_label[objects]
    item_labels: list[set[str]] = [set() for _ in range(n_items)]
    for item, label in zip(obj_item.tolist(), obj_labels.tolist(), strict=True):
        item_labels[item].add(label)
    whole = data.whole if (v.exact or v.whole_rows == "raw") else data.whole_dba
    aps, p5, p10, labelled, label_right = [], [], [], 0, 0
    for q in queries.tolist():
        qv = z[f"q_vec_{v.pad_query}"][q].astype(np.float64)
        own = data.position[int(z["q_image"][q])]
        category = str(z["q_category"][q])
        s_whole = whole @ qv
        if v.exact or len(objects) == 0:
            best_vec = whole.astype(np.float64)
            best_label = np.array([""] * n_items, dtype=object)
            item_score = s_whole.copy()
        else:
            s_obj = obj_vecs @ qv
            best_obj = np.full(n_items, -np.inf)
            best_obj_row = np.full(n_items, -1)
            for r in np.argsort(-s_obj).tolist():
                if best_obj_row[obj_item[r]] < 0:
                    best_obj_row[obj_item[r]] = r
                    best_obj[obj_item[r]] = s_obj[r]
            use_obj = best_obj > s_whole
            best_vec = np.where(
                use_obj[:, None],
                obj_vecs[np.maximum(best_obj_row, 0)],
                whole,
            ).astype(np.float64)
            best_label = np.where(use_obj, obj_labels[np.maximum(best_obj_row, 0)], "")
            if v.combine == "max":
                item_score = np.maximum(best_obj, s_whole)
            else:
                has = best_obj_row >= 0
                item_score = np.where(
                    has, v.fuse_whole * s_whole + (1 - v.fuse_whole) * best_obj, s_whole
                )
        mask = np.ones(n_items, bool)
        mask[own] = False
        ids = [str(i) for i in range(n_items)]
        if v.qe and not v.exact:
            sims = np.where(mask, item_score, -np.inf)
            expanded = scoring.expand_query(
                qv,
                best_vec[mask],
                sims[mask],
                [ids[i] for i in np.flatnonzero(mask)],
                [0] * int(mask.sum()),
                5,
                3.0,
            )
            # Each item keeps the row retrieval chose for it; QE re-scores that row.
            unit = best_vec / np.linalg.norm(best_vec, axis=1, keepdims=True)
            item_score = unit @ expanded
        if v.label_bonus > 0 and not v.exact:
            label = data.query_label(v, q)
            if label:
                labelled += 1
                label_right += label == category
                if v.label_scope == "item":
                    match = np.array([label in s for s in item_labels])
                else:
                    match = best_label == label
                item_score = item_score + v.label_bonus * match
        order = [i for i in np.argsort(-item_score, kind="stable").tolist() if mask[i]]
        relevant = np.array([category in data.gt.get(int(data.images[i]), set()) for i in order])
        ap = average_precision(relevant)
        if ap == ap:
            aps.append(ap)
            p5.append(relevant[:5].mean())
            p10.append(relevant[:10].mean())
    return {
        "mAP": float(np.mean(aps)),
        "P@5": float(np.mean(p5)),
        "P@10": float(np.mean(p10)),
        "queries": len(aps),
        "labelled": labelled / max(1, len(queries)),
        "label_right": label_right / max(1, labelled),
    }


def variants() -> list[Variant]:
    raw: dict[str, Any] = {"whole_rows": "raw"}
    out = [
        Variant("exact baseline: crop vs raw whole images", exact=True, objects=False),
        Variant("engine without objects (DBA whole rows, QE)", objects=False),
        Variant("engine now: objects, max, QE, DBA whole rows"),
        Variant("objects, no QE", qe=False),
        Variant("without objects, raw whole rows", objects=False, **raw),
        Variant("R = objects, raw whole rows (no DBA)", **raw),
        Variant("R, no QE", qe=False, **raw),
    ]
    for pad in PADDINGS[1:]:
        out.append(Variant(f"R, pad index+query {pad}", pad_index=pad, pad_query=pad, **raw))
        out.append(Variant(f"R, pad index only {pad}", pad_index=pad, **raw))
    for side in (48, 64):
        out.append(Variant(f"R, min object side {side}", min_side=side, **raw))
    for threshold in (0.2, 0.4):
        out.append(Variant(f"R, detection threshold {threshold}", threshold=threshold, **raw))
    for w in (0.3, 0.5):
        out.append(Variant(f"R, fuse whole {w}", combine="fuse", fuse_whole=w, **raw))
    for bonus in (0.05, 0.1, 0.2):
        out.append(Variant(f"R, label bonus {bonus} both item", label_bonus=bonus, **raw))
    out.append(
        Variant("R, label bonus 0.1 overlap item", label_bonus=0.1, label_source="overlap", **raw)
    )
    out.append(Variant("R, label bonus 0.1 crop item", label_bonus=0.1, label_source="crop", **raw))
    out.append(Variant("R, label bonus 0.1 both row", label_bonus=0.1, label_scope="row", **raw))
    out.append(Variant("label bonus 0.1 both item (DBA whole rows)", label_bonus=0.1))
    out.append(
        Variant("R, label bonus 0.1 oracle (gt label)", label_bonus=0.1, label_source="gt", **raw)
    )
    return out


def label_weights() -> list[Variant]:
    """The label bonus's weight, with the engine's label source (overlap with the query
    image's detections) and raw vectors for object searches."""
    out = [
        Variant("exact baseline: crop vs raw whole images", exact=True, objects=False),
        Variant("before: objects, max, QE, DBA whole rows"),
        Variant("before: without objects", objects=False),
        Variant("raw vectors only (LOUPE_RANKING_LABEL_WEIGHT=0)", whole_rows="raw"),
    ]
    for w in (0.05, 0.1, 0.2, 0.3, 0.5, 1.0):
        out.append(
            Variant(
                f"raw + label bonus {w} (overlap)",
                whole_rows="raw",
                label_bonus=w,
                label_source="overlap",
            )
        )
    for w in (0.1, 0.2):
        out.append(
            Variant(
                f"raw + label bonus {w} (overlap, else detection on the crop)",
                whole_rows="raw",
                label_bonus=w,
                label_source="both",
            )
        )
    out.append(
        Variant("without objects + raw (no labels to match)", objects=False, whole_rows="raw")
    )
    return out


VARIANT_SETS: dict[str, Callable[[], list[Variant]]] = {
    "sweep": variants,
    "weights": label_weights,
}


def evaluate(cache: Path, split: str, chosen: Callable[[], list[Variant]] = variants) -> None:
    data = Data(cache)
    q_images = data.z["q_image"]
    if split == "even":
        queries = np.flatnonzero(q_images % 2 == 0)
    elif split == "odd":
        queries = np.flatnonzero(q_images % 2 == 1)
    else:
        queries = np.arange(len(q_images))
    print(f"split {split}: {len(queries)} crop queries, {len(data.images)} images")
    print(f"{'variant':60s} {'mAP':>6s} {'P@5':>6s} {'P@10':>6s} {'lab%':>5s} {'lab ok':>6s}")
    for v in chosen():
        r = run_variant(data, v, queries)
        print(
            f"{v.name:60s} {r['mAP']:6.3f} {r['P@5']:6.3f} {r['P@10']:6.3f} "
            f"{100 * r['labelled']:5.0f} {r['label_right']:6.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("extract")
    e.add_argument("--data", type=Path, default=Path("../shared/data/coco128-val"))
    e.add_argument("--models", type=Path, default=Path("models"))
    e.add_argument("--cache", type=Path, default=Path("/tmp/objects-offline.npz"))
    e.add_argument("--threads", type=int, default=2)
    v = sub.add_parser("evaluate")
    v.add_argument("--cache", type=Path, default=Path("/tmp/objects-offline.npz"))
    v.add_argument("--split", choices=("even", "odd", "all"), default="even")
    v.add_argument("--variants", choices=sorted(VARIANT_SETS), default="sweep")
    args = parser.parse_args()
    if args.command == "extract":
        extract(args.data, args.models, args.cache, args.threads)
    else:
        evaluate(args.cache, args.split, VARIANT_SETS[args.variants])


if __name__ == "__main__":
    main()
