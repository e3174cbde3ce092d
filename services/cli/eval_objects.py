"""Measure search by crops and by detected objects on a COCO-format labelled set.

Queries: every non-crowd ground-truth box whose shorter side is at least --min-side pixels is a
crop query (SearchRequest.crop over its image). The gallery is the images themselves; a result
is relevant when its image holds an object of the query's category by the ground truth, crowd
annotations included (a crowd of people shows people; crowd boxes are never queries, as in
COCO's own evaluation). The query's own image never counts: K+1 results are asked for and it is
dropped before scoring. AP is over the returned top-k with every relevant image in the gallery
as the denominator (those not returned count as misses), as `loupe eval retrieval` does.

Configurations, measured in one run on the same images (--configs):
  objects  the engine, the gallery indexed with --detect into a fresh catalogue (a row per
           detected object beside each whole image);
  whole    the engine, the gallery indexed without detection into another fresh catalogue;
  exact    a baseline outside the engine: the crop's vector against every whole-image vector
           by exact cosine. The gateway's API returns no vectors, so this path calls the
           embedding service directly (--embedding-addr; by default the local stack's), and
           the run checks that it runs the model the gateway reports.

--objects adds the Lens mode: each image is searched with SearchRequest.objects; each detected
object whose box matches a ground-truth box (IoU >= --match-iou, greedy one-to-one by IoU,
class-agnostic) is scored with that box's category over its own results. It runs against each
engine catalogue, and, with exact, the detected box's crop vector against whole-image vectors.
The gateway searches at most LOUPE_GATEWAY_MAX_QUERY_OBJECTS objects per query image.

Reported per configuration, as a Markdown table and (--json) with the settings, the
catalogues' rows, the model version and per-category mAPs: mAP over the top-k, cat mAP (the
mean of per-category mAPs: on COCO, people are most of the queries), mAP@100, P@1/5/10, R@10,
chance (the share of the other images that are relevant: about a random order's mAP), median
and p95 latency as this client sees it (queries one at a time unless --concurrency), queries
scored and skipped (no relevant image in the gallery, or an image the service could not read).
Catalogues are dropped after the run unless --keep.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from tqdm import tqdm

from loupe.v1 import (
    common_pb2,
    embedding_pb2,
    embedding_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
)
from services.cli.client import (
    DEFAULT_DATA_DIR,
    MAX_MESSAGE_BYTES,
    _same_address,
    api_key,
    channel,
    client_tls,
    gateway_address,
)
from services.cli.eval_detection import IMAGE_SUFFIXES, pairwise_iou, read_coco_json
from services.cli.eval_retrieval import (
    DEFAULT_TOP_K,
    EvalError,
    Labelled,
    Metrics,
    add_run_arguments,
    catalog_info,
    index_gallery,
    query_metrics,
    say,
    summarise,
)
from services.cli.parsing import MAX_TOP_K, int_in
from services.cli.stack import StackState
from services.common.channels import open_channel

CONFIGS = ("objects", "whole", "exact")
DEFAULT_MIN_SIDE = 64
DEFAULT_MATCH_IOU = 0.5
CATALOG_PREFIX = re.compile(r"[a-z0-9][a-z0-9_]{0,55}")
RPC_TIMEOUT_SECONDS = 120.0

T = TypeVar("T")


@dataclass(frozen=True)
class Truth:
    """One ground-truth annotation: x0, y0, x1, y1 in pixels."""

    box: tuple[float, float, float, float]
    category: int
    crowd: bool


@dataclass(frozen=True)
class CocoImage:
    path: Path
    key: str  # the file name: the item id in the catalogues
    width: int
    height: int
    truth: tuple[Truth, ...]


@dataclass(frozen=True)
class CropQuery:
    image: CocoImage
    box: tuple[float, float, float, float]
    category: int


@dataclass(frozen=True)
class CocoSet:
    images: list[CocoImage]
    category_names: dict[int, str]
    images_in_json: int


@dataclass
class Scored:
    """What one configuration's queries gave; `metrics` once summarised."""

    per_query: list[dict[str, float]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    skipped: int = 0
    categories: list[int] = field(default_factory=list)
    extra: dict[str, int] = field(default_factory=dict)

    def add(
        self, ranked: list[bool], relevant: int, gallery: int, seconds: float, category: int
    ) -> None:
        """`gallery`: the images a query is ranked against, its own included."""
        figures = query_metrics(ranked, relevant)
        figures["chance"] = relevant / max(gallery - 1, 1)
        self.per_query.append(figures)
        self.latencies.append(seconds)
        self.categories.append(category)

    def report(self, names: dict[int, str]) -> dict[str, Any]:
        figures: dict[str, Any] = {"queries": 0, "skipped_queries": self.skipped}
        if self.per_query:
            metrics: Metrics = summarise(self.per_query, self.latencies, self.skipped)
            figures = {k: round(v, 4) for k, v in asdict(metrics).items() if isinstance(v, float)}
            figures |= {"queries": metrics.queries, "skipped_queries": metrics.skipped_queries}
            # The share of the other images that are relevant: about the mAP of a random order.
            figures["chance_map"] = round(float(np.mean([q["chance"] for q in self.per_query])), 4)
            by_category: dict[str, list[float]] = {}
            for category, ap in zip(self.categories, metrics.per_query, strict=True):
                by_category.setdefault(names.get(category, str(category)), []).append(ap)
            figures["ap_by_category"] = {
                name: {"queries": len(aps), "map": round(float(np.mean(aps)), 4)}
                for name, aps in sorted(by_category.items())
            }
            # Each category weighs the same: on COCO, people are most of the queries.
            figures["category_map"] = round(
                float(np.mean([float(np.mean(aps)) for aps in by_category.values()])), 4
            )
        return figures | self.extra


# ---- the labelled set ------------------------------------------------------------------------


def load_coco(images_dir: Path, coco_json: Path) -> CocoSet:
    """The images of `images_dir` that the JSON's `images` list names (by file name), with
    their annotations."""
    document = read_coco_json(images_dir, coco_json)
    try:
        names = {int(c["id"]): str(c.get("name", c["id"])) for c in document["categories"]}
        entries = {int(e["id"]): e for e in document["images"]}
        by_name = {Path(str(e["file_name"])).name: i for i, e in entries.items()}
        truth: dict[int, list[Truth]] = {}
        for note in document["annotations"]:
            x, y, w, h = (float(v) for v in note["bbox"])
            category = int(note["category_id"])
            if category not in names:
                raise ValueError(f"annotation {note.get('id')}: unknown category_id {category}")
            truth.setdefault(int(note["image_id"]), []).append(
                Truth((x, y, x + w, y + h), category, bool(note.get("iscrowd", 0)))
            )
        sizes = {i: (int(e["width"]), int(e["height"])) for i, e in entries.items()}
    except (KeyError, TypeError, ValueError) as error:
        raise EvalError(f"--coco-json {coco_json}: malformed: {error!r}") from None
    files = sorted(
        p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise EvalError(f"--images {images_dir}: no image files in it")
    images = [
        CocoImage(p, p.name, *sizes[by_name[p.name]], tuple(truth.get(by_name[p.name], ())))
        for p in files
        if p.name in by_name
    ]
    if len(images) < 2:
        known = ", ".join(sorted(by_name)[:3]) or "none"
        raise EvalError(
            f"{len(images)} of the {len(files)} images in {images_dir} (e.g. {files[0].name}) "
            f"are in the 'images' list of {coco_json} (file names there: {known}, ...); "
            "a gallery needs two or more"
        )
    return CocoSet(images, names, len(entries))


def crop_queries(images: Sequence[CocoImage], min_side: float) -> list[CropQuery]:
    """Every non-crowd box at least `min_side` pixels on its shorter side, clipped to its
    image."""
    queries = []
    for image in images:
        for truth in image.truth:
            x0, y0, x1, y1 = truth.box
            box = (max(x0, 0.0), max(y0, 0.0), min(x1, image.width), min(y1, image.height))
            if not truth.crowd and min(box[2] - box[0], box[3] - box[1]) >= min_side:
                queries.append(CropQuery(image, box, truth.category))
    return queries


def holders(images: Sequence[CocoImage]) -> dict[int, set[str]]:
    """Category -> the images holding at least one object of it (crowd annotations too)."""
    result: dict[int, set[str]] = {}
    for image in images:
        for truth in image.truth:
            result.setdefault(truth.category, set()).add(image.key)
    return result


def ranked_relevance(
    item_ids: Sequence[str], own: str, relevant: set[str], top_k: int
) -> list[bool]:
    """Whether each result is relevant, the query's own image left out, cut to `top_k`."""
    return [item in relevant for item in item_ids if item != own][:top_k]


def match_detections(
    detected: np.ndarray, truth: Sequence[Truth], min_iou: float
) -> list[Truth | None]:
    """For each detected box (x0, y0, x1, y1), the non-crowd ground-truth box it matches:
    pairs taken greedily by IoU, best first, each box of either side used once."""
    boxes = [t for t in truth if not t.crowd]
    matched: list[Truth | None] = [None] * len(detected)
    if not len(detected) or not boxes:
        return matched
    iou = pairwise_iou(
        np.asarray(detected, np.float64).reshape(-1, 4), np.array([t.box for t in boxes])
    )
    used: set[int] = set()
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        d, t = divmod(int(flat), len(boxes))
        if iou[d, t] < min_iou:
            break
        if matched[d] is None and t not in used:
            matched[d] = boxes[t]
            used.add(t)
    return matched


def box_of(box: common_pb2.Box) -> tuple[float, float, float, float]:
    return (box.x0, box.y0, box.x1, box.y1)


# ---- the command ----------------------------------------------------------------------------


def config_list(text: str) -> list[str]:
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in CONFIGS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a comma-separated subset of {','.join(CONFIGS)}"
        )
    return list(dict.fromkeys(chosen))


def catalog_prefix(text: str) -> str:
    if not CATALOG_PREFIX.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: lower-case letters, digits and _, starting with a letter or digit, "
            "at most 56 characters"
        )
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, type=Path, metavar="DIR")
    parser.add_argument(
        "--coco-json",
        required=True,
        type=Path,
        metavar="FILE",
        help="COCO instances JSON (images matched by file name)",
    )
    parser.add_argument(
        "--min-side",
        type=int_in(1, 100_000),
        default=DEFAULT_MIN_SIDE,
        metavar="PX",
        help=f"smallest box side that makes a crop query (default {DEFAULT_MIN_SIDE})",
    )
    parser.add_argument(
        "--configs",
        type=config_list,
        default=list(CONFIGS),
        metavar="LIST",
        help=f"what to measure (default {','.join(CONFIGS)})",
    )
    parser.add_argument(
        "--objects",
        action="store_true",
        help="also the Lens mode: search each image with objects=true, score matched objects",
    )
    parser.add_argument(
        "--match-iou",
        type=float,
        default=DEFAULT_MATCH_IOU,
        metavar="IOU",
        help=f"--objects: IoU for a detection to match a ground-truth box "
        f"(default {DEFAULT_MATCH_IOU})",
    )
    parser.add_argument(
        "--top-k",
        type=int_in(0, MAX_TOP_K - 1),
        default=0,
        metavar="K",
        help=f"results scored per query (default: gallery size - 1, at most {DEFAULT_TOP_K - 1}; "
        "K+1 are asked for, to leave out the query's own image)",
    )
    parser.add_argument(
        "--concurrency",
        type=int_in(1, 64),
        default=1,
        metavar="N",
        help="queries in flight (default 1: latencies without queueing)",
    )
    parser.add_argument(
        "--limit",
        type=int_in(0, 1_000_000),
        default=0,
        metavar="N",
        help="only the first N images by name (a quick run)",
    )
    parser.add_argument(
        "--catalog-prefix",
        type=catalog_prefix,
        default=None,
        metavar="NAME",
        help="catalogues NAME_objects and NAME_whole (default evalobj_<random>); they must "
        "not exist",
    )
    add_run_arguments(parser, "catalogues")
    parser.add_argument(
        "--embedding-addr",
        metavar="HOST:PORT",
        help="the embedding service, for the exact baseline (default: the local stack's, when "
        "the gateway is its; TLS as LOUPE_TLS_* say, else the local stack's certificates)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        metavar="DIR",
        help="the local stack's directory (default ./.loupe)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(evaluate(args))
    except EvalError as error:
        print(f"loupe eval objects: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # an image or --json that cannot be read or written
        print(f"loupe eval objects: {error.filename}: {error.strerror}", file=sys.stderr)
        return 2


def embedding_address(flag: str | None, gateway: str, data_dir: Path) -> str:
    if flag:
        return flag
    state = StackState.load(data_dir.resolve())
    if state is not None and _same_address(state.gateway, gateway):
        for process in state.processes:
            if process.name == "embedding" and process.port:
                return f"127.0.0.1:{process.port}"
    raise EvalError(
        f"the exact baseline calls the embedding service, and the gateway at {gateway} is not "
        f"the local stack's in {data_dir}: pass --embedding-addr HOST:PORT, or --data-dir of "
        "the stack, or leave exact out of --configs"
    )


class Evaluation:
    """One run: the images, the settings, and the channels it talks through."""

    def __init__(self, args: argparse.Namespace, coco: CocoSet) -> None:
        self.args = args
        self.coco = coco
        self.images = coco.images
        self.holders = holders(self.images)
        self.top_k: int = args.top_k or min(DEFAULT_TOP_K - 1, len(self.images) - 1)
        self.progress = not args.quiet
        self.gateway: gateway_pb2_grpc.GatewayStub | None = None
        self.embedder: embedding_pb2_grpc.EmbeddingServiceStub | None = None
        self.indexed: dict[str, set[str]] = {}  # catalogue -> item ids indexed
        self.whole_vectors: np.ndarray = np.zeros((0, 0), np.float32)
        self.whole_keys: list[str] = []
        self.whole_set: set[str] = set()
        self.size_mismatches: list[str] = []  # found by the exact baseline's embedding
        self.model_version = ""  # as the gateway reports it
        self.cached_responses = 0

    # -- running many calls ---------------------------------------------------------------

    async def each(
        self, items: Sequence[T], call: Callable[[T], Awaitable[None]], description: str
    ) -> None:
        """`call` on every item, --concurrency at a time, with a progress bar."""
        limit = asyncio.Semaphore(self.args.concurrency)
        bar = tqdm(
            total=len(items),
            unit="q",
            desc=description,
            file=sys.stderr,
            mininterval=0.5,
            disable=not self.progress,
        )

        async def one(item: T) -> None:
            async with limit:
                await call(item)
                bar.update(1)

        try:
            await asyncio.gather(*(one(item) for item in items))
        finally:
            bar.close()

    def relevant(self, category: int, own: str, gallery: set[str]) -> set[str]:
        return (self.holders.get(category, set()) & gallery) - {own}

    # -- the engine -----------------------------------------------------------------------

    async def search(
        self, request: gateway_pb2.SearchRequest, scored: Scored, what: str
    ) -> tuple[gateway_pb2.SearchResponse | None, float]:
        """The response and its latency, or None when the gateway could not read the query
        (counted as skipped)."""
        assert self.gateway is not None
        started = time.perf_counter()
        try:
            reply = await self.gateway.Search(request, timeout=RPC_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            scored.skipped += 1
            tqdm.write(f"query skipped: {what}: {error.details()}", file=sys.stderr)
            return None, 0.0
        seconds = time.perf_counter() - started
        if reply.degraded:
            raise EvalError(
                f"{what}: the gateway answered without {', '.join(reply.degraded_reasons)} "
                "(a backend failed): the figures would not be the engine's"
            )
        self.model_version = reply.model_version
        # Fresh catalogues make a cached answer rare (the same box twice); counted, since its
        # latency is the cache's.
        self.cached_responses += reply.cached
        return reply, seconds

    async def engine_crops(self, catalog: str, queries: Sequence[CropQuery]) -> Scored:
        scored = Scored()
        gallery = self.indexed[catalog]

        async def query(q: CropQuery) -> None:
            relevant = self.relevant(q.category, q.image.key, gallery)
            if not relevant or q.image.key not in gallery:
                scored.skipped += 1
                return
            request = gateway_pb2.SearchRequest(
                image=q.image.path.read_bytes(),
                crop=common_pb2.Box(x0=q.box[0], y0=q.box[1], x1=q.box[2], y1=q.box[3]),
                top_k=self.top_k + 1,
                catalog=catalog,
            )
            reply, seconds = await self.search(request, scored, q.image.key)
            if reply is not None:
                ranked = ranked_relevance(
                    [h.item_id for h in reply.results], q.image.key, relevant, self.top_k
                )
                scored.add(ranked, len(relevant), len(gallery), seconds, q.category)

        await self.each(queries, query, f"crops {catalog}")
        return scored

    async def engine_objects(
        self, catalog: str, detections: dict[str, list[tuple[float, float, float, float]]]
    ) -> Scored:
        """Lens: every image searched with objects=true; `detections` gets each image's
        detected boxes (for the exact baseline)."""
        scored = Scored(extra={"detected_objects": 0, "matched_objects": 0})
        gallery = self.indexed[catalog]

        async def query(image: CocoImage) -> None:
            if image.key not in gallery:
                scored.skipped += 1
                return
            request = gateway_pb2.SearchRequest(
                image=image.path.read_bytes(), objects=True, top_k=self.top_k + 1, catalog=catalog
            )
            reply, seconds = await self.search(request, scored, image.key)
            if reply is None:
                return
            boxes = [box_of(o.detection.box) for o in reply.objects]
            detections[image.key] = boxes
            scored.extra["detected_objects"] += len(boxes)
            matches = match_detections(
                np.array(boxes).reshape(-1, 4), image.truth, self.args.match_iou
            )
            for found, truth in zip(reply.objects, matches, strict=True):
                if truth is None:
                    continue
                scored.extra["matched_objects"] += 1
                relevant = self.relevant(truth.category, image.key, gallery)
                if not relevant:
                    scored.skipped += 1
                    continue
                ranked = ranked_relevance(
                    [h.item_id for h in found.results], image.key, relevant, self.top_k
                )
                # One search answers all of an image's objects: each is charged its latency.
                scored.add(ranked, len(relevant), len(gallery), seconds, truth.category)

        await self.each(self.images, query, f"lens {catalog}")
        return scored

    async def index(self, catalog: str, detect: bool) -> dict[str, Any]:
        assert self.gateway is not None
        say(f"indexing {len(self.images)} images into catalog {catalog!r} (detect={detect})")
        started = time.perf_counter()
        gallery = [Labelled(image.path, image.key, "") for image in self.images]
        failed = await index_gallery(self.gateway, catalog, gallery, detect)
        seconds = time.perf_counter() - started
        info = await catalog_info(self.gateway, catalog)
        augment = 0.0
        if not self.args.no_augment and info.dba_neighbours > 0:
            reply = await self.gateway.AugmentCatalog(
                gateway_pb2.AugmentCatalogRequest(catalog=catalog)
            )
            augment = reply.seconds
            info = await catalog_info(self.gateway, catalog)
        self.indexed[catalog] = {image.key for image in self.images} - failed
        return {
            "catalog": catalog,
            "items": info.items,
            "rows": info.rows,
            "index_failures": len(failed),
            "index_seconds": round(seconds, 2),
            "augment_seconds": round(augment, 2),
            "index_type": info.index_type,
            "candidate_code": info.candidate_code,
            "dba_neighbours": info.dba_neighbours,
        }

    # -- the exact baseline ----------------------------------------------------------------

    async def embed(self, request: embedding_pb2.EmbedRequest) -> embedding_pb2.EmbedResponse:
        assert self.embedder is not None
        return await self.embedder.Embed(request, timeout=RPC_TIMEOUT_SECONDS)

    async def embed_gallery(self) -> None:
        vectors: dict[str, list[float]] = {}

        async def one(image: CocoImage) -> None:
            try:
                reply = await self.embed(
                    embedding_pb2.EmbedRequest(image=image.path.read_bytes(), whole_image=True)
                )
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                tqdm.write(f"not embedded: {image.key}: {error.details()}", file=sys.stderr)
                return
            vectors[image.key] = list(reply.whole_image.values)
            # The ground truth's boxes are in the pixels the JSON records; an image the
            # service sees at another size (an EXIF rotation) would be queried at wrong boxes.
            if (reply.image_width, reply.image_height) != (image.width, image.height):
                self.size_mismatches.append(
                    f"{image.key}: JSON {image.width}x{image.height}, "
                    f"seen {reply.image_width}x{reply.image_height}"
                )

        await self.each(self.images, one, "exact: gallery")
        self.whole_keys = sorted(vectors)
        self.whole_set = set(self.whole_keys)
        self.whole_vectors = np.array([vectors[k] for k in self.whole_keys], np.float32)
        for mismatch in self.size_mismatches[:5]:
            say(f"warning: image size differs from the JSON: {mismatch}")

    async def exact(
        self,
        image: CocoImage,
        box: tuple[float, float, float, float],
        category: int,
        scored: Scored,
    ) -> None:
        """The crop's vector against every whole-image vector; its latency is the embedding
        call and the scan."""
        gallery = self.whole_set
        relevant = self.relevant(category, image.key, gallery)
        if not relevant or image.key not in gallery:
            scored.skipped += 1
            return
        data = image.path.read_bytes()
        started = time.perf_counter()
        try:
            reply = await self.embed(
                embedding_pb2.EmbedRequest(
                    image=data,
                    regions=[common_pb2.Box(x0=box[0], y0=box[1], x1=box[2], y1=box[3])],
                )
            )
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            scored.skipped += 1
            tqdm.write(f"query skipped: {image.key}: {error.details()}", file=sys.stderr)
            return
        similarity = self.whole_vectors @ np.asarray(reply.regions[0].values, np.float32)
        order = np.argsort(-similarity, kind="stable")[: self.top_k + 1]
        seconds = time.perf_counter() - started
        ranked = ranked_relevance(
            [self.whole_keys[i] for i in order], image.key, relevant, self.top_k
        )
        scored.add(ranked, len(relevant), len(gallery), seconds, category)

    async def exact_crops(self, queries: Sequence[CropQuery]) -> Scored:
        scored = Scored()

        async def query(q: CropQuery) -> None:
            await self.exact(q.image, q.box, q.category, scored)

        await self.each(queries, query, "crops exact")
        return scored

    async def exact_objects(
        self, detections: dict[str, list[tuple[float, float, float, float]]]
    ) -> Scored:
        scored = Scored(extra={"detected_objects": 0, "matched_objects": 0})
        pairs: list[tuple[CocoImage, tuple[float, float, float, float], int]] = []
        for image in self.images:
            boxes = detections.get(image.key, [])
            scored.extra["detected_objects"] += len(boxes)
            matches = match_detections(
                np.array(boxes).reshape(-1, 4), image.truth, self.args.match_iou
            )
            pairs += [(image, b, t.category) for b, t in zip(boxes, matches, strict=True) if t]
        scored.extra["matched_objects"] = len(pairs)

        async def query(pair: tuple[CocoImage, tuple[float, float, float, float], int]) -> None:
            await self.exact(*pair, scored)

        await self.each(pairs, query, "objects exact")
        return scored


async def evaluate(args: argparse.Namespace) -> int:
    if not 0.0 < args.match_iou <= 1.0:
        raise EvalError(f"--match-iou {args.match_iou}: must be in (0, 1]")
    coco = load_coco(args.images, args.coco_json)
    if args.limit:
        coco = CocoSet(coco.images[: args.limit], coco.category_names, coco.images_in_json)
    queries = crop_queries(coco.images, args.min_side)
    if not queries:
        raise EvalError(
            f"no ground-truth box of {len(coco.images)} images has both sides >= {args.min_side} "
            "px and is not a crowd: nothing to query (lower --min-side?)"
        )
    run = Evaluation(args, coco)
    engine = [c for c in args.configs if c != "exact"]
    if args.objects and not engine:
        raise EvalError(
            "--objects needs the engine (objects or whole in --configs): its detections are "
            "what the Lens mode scores"
        )
    prefix = args.catalog_prefix or f"evalobj_{uuid.uuid4().hex[:8]}"
    catalogs = {"objects": f"{prefix}_objects", "whole": f"{prefix}_whole"}
    address = gateway_address(args.gateway, args.data_dir)
    results: dict[str, dict[str, Scored]] = {"crops": {}, "lens": {}}
    indexes: dict[str, dict[str, Any]] = {}
    model_version = ""
    detections: dict[str, list[tuple[float, float, float, float]]] = {}
    say(
        f"{len(coco.images)} images, {len(queries)} crop queries (boxes >= {args.min_side} px, "
        f"not crowd); top_k {run.top_k}"
    )
    key = api_key(args.api_key, address, args.data_dir)
    async with contextlib.AsyncExitStack() as channels:
        ch = await channels.enter_async_context(channel(address, key, data_dir=args.data_dir))
        run.gateway = gateway_pb2_grpc.GatewayStub(ch)
        if "exact" in args.configs:
            # Before any indexing: a baseline that cannot run should fail in a second.
            embedder = embedding_address(args.embedding_addr, address, args.data_dir)
            model_version = await connect_embedding(run, embedder, args.data_dir, channels)
        created: list[str] = []
        try:
            if engine:
                existing = await run.gateway.ListCatalogs(gateway_pb2.ListCatalogsRequest())
                names = {c.name for c in existing.catalogs}
                taken = [catalogs[c] for c in engine if catalogs[c] in names]
                if taken:
                    raise EvalError(
                        f"catalog {taken[0]!r} already exists: an evaluation needs fresh ones "
                        "(another --catalog-prefix, or `loupe catalogs drop`)"
                    )
            for config in engine:
                created.append(catalogs[config])
                indexes[config] = await run.index(catalogs[config], detect=config == "objects")
            for config in engine:
                results["crops"][config] = await run.engine_crops(catalogs[config], queries)
                if args.objects:
                    results["lens"][config] = await run.engine_objects(catalogs[config], detections)
        except grpc.aio.AioRpcError as error:
            raise EvalError(
                f"gateway at {address}: {error.code().name}: {error.details()}"
            ) from None
        finally:
            if not args.keep:
                for catalog in created:
                    try:
                        await run.gateway.DropCatalog(
                            gateway_pb2.DropCatalogRequest(catalog=catalog)
                        )
                    except grpc.aio.AioRpcError as error:
                        say(f"could not drop catalog {catalog!r}: {error.details()}")
        if run.embedder is not None:
            if run.model_version and run.model_version != model_version:
                raise EvalError(
                    f"the embedding service at {embedder} runs {model_version}, the gateway "
                    f"{run.model_version}: the exact baseline would not be comparable "
                    "(--embedding-addr)"
                )
            try:
                await run.embed_gallery()
                results["crops"]["exact"] = await run.exact_crops(queries)
                if args.objects:
                    results["lens"]["exact"] = await run.exact_objects(detections)
            except grpc.aio.AioRpcError as error:
                raise EvalError(
                    f"embedding service at {embedder}: {error.code().name}: {error.details()}"
                ) from None
        model_version = run.model_version or model_version

    report: dict[str, Any] = {
        "images": str(args.images),
        "coco_json": str(args.coco_json),
        "gallery_images": len(coco.images),
        "images_in_json": coco.images_in_json,
        "crop_queries": len(queries),
        "min_side": args.min_side,
        "top_k": run.top_k,
        "match_iou": args.match_iou,
        "concurrency": args.concurrency,
        "gateway": address,
        "model_version": model_version,
        "kept": bool(args.keep),
        "cached_responses": run.cached_responses,
        "size_mismatches": run.size_mismatches,
        "catalogs": indexes,
        "crops": {c: s.report(coco.category_names) for c, s in results["crops"].items()},
        "lens": {c: s.report(coco.category_names) for c, s in results["lens"].items()},
    }
    print(table(report))
    if args.json:
        try:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        except OSError as error:
            raise EvalError(f"--json {args.json}: {error.strerror or error}") from None
        say(f"wrote {args.json}")
    return 0


async def connect_embedding(
    run: Evaluation, address: str, data_dir: Path, channels: contextlib.AsyncExitStack
) -> str:
    """Open the exact baseline's channel to the embedding service; the model it runs."""
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    ch = await channels.enter_async_context(
        open_channel(address, client_tls(address, data_dir), options=options)
    )
    run.embedder = embedding_pb2_grpc.EmbeddingServiceStub(ch)
    try:
        info = await run.embedder.Describe(common_pb2.DescribeRequest(), timeout=30)
    except grpc.aio.AioRpcError as error:
        raise EvalError(
            f"embedding service at {address}: {error.code().name}: {error.details()}"
        ) from None
    return f"{info.model_name}/{info.model_version}"


TABLE_COLUMNS = (
    ("mode", "<"),
    ("config", "<"),
    ("queries", ">"),
    ("skipped", ">"),
    ("mAP", ">"),
    ("cat mAP", ">"),
    ("mAP@100", ">"),
    ("P@1", ">"),
    ("P@5", ">"),
    ("P@10", ">"),
    ("R@10", ">"),
    ("chance", ">"),
    ("p50 ms", ">"),
    ("p95 ms", ">"),
)


def table(report: dict[str, Any]) -> str:
    """A Markdown table (padded, so that it reads as text too), a row per mode and
    configuration, under a line that says what was measured."""
    rows = []
    for mode in ("crops", "lens"):
        for config, m in report[mode].items():
            row = [mode, config, str(m["queries"]), str(m["skipped_queries"])]
            if m["queries"]:
                row += [
                    f"{m[key]:.4f}"
                    for key in (
                        "map", "category_map", "map_at_100", "p_at_1", "p_at_5", "p_at_10",
                        "r_at_10", "chance_map",
                    )
                ]  # fmt: skip
                row += [f"{m['latency_ms_median']:.1f}", f"{m['latency_ms_p95']:.1f}"]
            else:
                row += ["-"] * (len(TABLE_COLUMNS) - len(row))
            rows.append(row)
    widths = [
        max(len(name), *(len(row[i]) for row in rows)) for i, (name, _) in enumerate(TABLE_COLUMNS)
    ]

    def line(cells: Sequence[str]) -> str:
        padded = (
            f"{cell:{align}{width}}"
            for cell, (_, align), width in zip(cells, TABLE_COLUMNS, widths, strict=True)
        )
        return "| " + " | ".join(padded) + " |"

    lines = [
        f"{report['gallery_images']} images of {report['images']}, {report['crop_queries']} crop "
        f"queries (boxes >= {report['min_side']} px); top_k {report['top_k']}, own image left "
        f"out; model {report['model_version'] or '-'}",
        "",
        line([name for name, _ in TABLE_COLUMNS]),
        "|" + "|".join(("-" * (w + 1) + ":") if a == ">" else "-" * (w + 2)
                       for (_, a), w in zip(TABLE_COLUMNS, widths, strict=True)) + "|",
        *(line(row) for row in rows),
    ]  # fmt: skip
    if report["lens"]:
        lines.append("")
    for config, m in report["lens"].items():
        lines.append(
            f"lens {config}: {m['matched_objects']} of {m['detected_objects']} detected "
            f"objects matched a ground-truth box (IoU >= {report['match_iou']})"
        )
    return "\n".join(lines)
