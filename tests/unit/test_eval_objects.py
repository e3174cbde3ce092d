"""`loupe eval objects`: the pure logic (COCO loading, query selection, relevance, matching)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.cli import eval_objects
from services.cli.eval_objects import CocoImage, Scored, Truth
from services.cli.eval_retrieval import EvalError, query_metrics


def coco_document(**overrides: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "images": [
            {"id": 10, "file_name": "a.jpg", "width": 200, "height": 100},
            {"id": 11, "file_name": "sub/b.jpg", "width": 300, "height": 300},
            {"id": 12, "file_name": "c.jpg", "width": 50, "height": 50},
            {"id": 13, "file_name": "not-on-disk.jpg", "width": 10, "height": 10},
        ],
        "annotations": [
            # a.jpg: a big cat, a small dog, a crowd of people.
            {"id": 1, "image_id": 10, "category_id": 17, "bbox": [10, 10, 100, 80], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 18, "bbox": [0, 0, 30, 30], "iscrowd": 0},
            {"id": 3, "image_id": 10, "category_id": 1, "bbox": [0, 0, 200, 100], "iscrowd": 1},
            # b.jpg: a person whose box runs off the right edge.
            {"id": 4, "image_id": 11, "category_id": 1, "bbox": [250, 0, 100, 200]},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 17, "name": "cat"}, {"id": 18}],
    }
    document.update(overrides)
    return document


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg", "extra.jpg", "notes.txt"):
        (folder / name).write_bytes(b"x")
    return folder


def write_json(tmp_path: Path, document: Any) -> Path:
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(document))
    return path


def test_load_coco_matches_files_by_name_and_keeps_annotations(
    images_dir: Path, tmp_path: Path
) -> None:
    coco = eval_objects.load_coco(images_dir, write_json(tmp_path, coco_document()))
    assert [i.key for i in coco.images] == ["a.jpg", "b.jpg", "c.jpg"]
    assert coco.images_in_json == 4
    assert coco.category_names == {1: "person", 17: "cat", 18: "18"}
    a, b, c = coco.images
    assert (a.width, a.height) == (200, 100)
    assert a.truth[0] == Truth((10.0, 10.0, 110.0, 90.0), 17, False)
    assert a.truth[2].crowd and not b.truth[0].crowd  # iscrowd missing: not a crowd
    assert c.truth == ()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d, j: (d / "missing", j), "no such folder"),
        (lambda d, j: (d, j.with_name("missing.json")), "no such file"),
        (lambda d, j: (d, j.write_text("{not json") and j), "not readable JSON"),
        (lambda d, j: (d, j.write_text('{"annotations": [], "categories": []}') and j), "'images'"),
        (
            lambda d, j: (d, j.write_text(json.dumps(coco_document(images=[]))) and j),
            "a gallery needs two or more",
        ),
        (
            lambda d, j: (
                d,
                j.write_text(
                    json.dumps(
                        coco_document(
                            annotations=[{"image_id": 10, "category_id": 99, "bbox": [0, 0, 1, 1]}]
                        )
                    )
                )
                and j,
            ),
            "unknown category_id 99",
        ),
        (
            lambda d, j: (
                d,
                j.write_text(json.dumps(coco_document(annotations=[{"image_id": 10}]))) and j,
            ),
            "malformed",
        ),
    ],
    ids=["no-folder", "no-json", "bad-json", "no-images-list", "no-match", "category", "bbox"],
)
def test_load_coco_errors_say_what_to_fix(
    images_dir: Path, tmp_path: Path, make: Any, message: str
) -> None:
    folder, path = make(images_dir, write_json(tmp_path, coco_document()))
    with pytest.raises(EvalError, match=message):
        eval_objects.load_coco(folder, path)


def image(key: str, *truth: Truth, size: tuple[int, int] = (200, 100)) -> CocoImage:
    return CocoImage(Path(key), key, size[0], size[1], truth)


def test_crop_queries_skip_crowds_and_small_boxes_and_clip_to_the_image() -> None:
    a = image(
        "a.jpg",
        Truth((10, 10, 110, 90), 17, False),  # 100 x 80: a query
        Truth((0, 0, 30, 30), 18, False),  # too small
        Truth((0, 0, 200, 100), 1, True),  # a crowd
        Truth((150, -20, 260, 70), 2, False),  # clipped to 150..200 x 0..70: 50 px wide
    )
    assert [(q.image.key, q.box, q.category) for q in eval_objects.crop_queries([a], 64)] == [
        ("a.jpg", (10, 10, 110, 90), 17)
    ]
    smaller = eval_objects.crop_queries([a], 50)
    assert [(q.box, q.category) for q in smaller] == [
        ((10, 10, 110, 90), 17),
        ((150, 0.0, 200, 70), 2),
    ]


def test_relevance_counts_crowds_as_holding_their_category_and_leaves_out_the_query() -> None:
    gallery = [
        image("a.jpg", Truth((0, 0, 100, 100), 1, False)),
        image("b.jpg", Truth((0, 0, 100, 100), 1, True)),
        image("c.jpg", Truth((0, 0, 100, 100), 2, False)),
    ]
    holders = eval_objects.holders(gallery)
    assert holders == {1: {"a.jpg", "b.jpg"}, 2: {"c.jpg"}}
    relevant = holders[1] - {"a.jpg"}
    ranked = eval_objects.ranked_relevance(["a.jpg", "c.jpg", "b.jpg"], "a.jpg", relevant, 2)
    assert ranked == [False, True]  # the own image dropped, then cut to top-k
    # Only the own image returned, top-k 1: nothing relevant found, AP 0.
    assert eval_objects.ranked_relevance(["a.jpg"], "a.jpg", relevant, 1) == []


def test_ap_counts_relevant_images_that_were_not_returned_as_misses() -> None:
    # Relevant at ranks 1 and 3, a third relevant image never returned.
    figures = query_metrics([True, False, True], 3)
    assert figures["ap"] == pytest.approx((1 + 2 / 3) / 3)
    assert figures["p5"] == pytest.approx(2 / 5)


def test_detections_match_ground_truth_greedily_one_to_one() -> None:
    truth = [
        Truth((0, 0, 100, 100), 1, False),
        Truth((0, 0, 100, 100), 5, True),  # a crowd: never matched
        Truth((200, 200, 300, 300), 2, False),
    ]
    detected = np.array(
        [
            [0, 0, 90, 100],  # IoU 0.9 with the first box
            [0, 0, 100, 100],  # IoU 1.0 with the first box: takes it
            [210, 200, 300, 300],  # IoU 0.9 with the third
            [400, 400, 500, 500],  # nothing
        ],
        np.float64,
    )
    matches = eval_objects.match_detections(detected, truth, 0.5)
    assert matches == [None, truth[0], truth[2], None]
    # Below the IoU asked for: no match.
    assert eval_objects.match_detections(detected[2:3], truth, 0.95) == [None]
    assert eval_objects.match_detections(np.zeros((0, 4)), truth, 0.5) == []
    assert eval_objects.match_detections(detected[:1], [truth[1]], 0.5) == [None]


def test_scored_reports_per_category_and_no_figures_without_queries() -> None:
    scored = Scored(skipped=2)
    assert scored.report({}) == {"queries": 0, "skipped_queries": 2}
    scored.add([True], 1, 5, 0.010, 1)
    scored.add([False, True], 2, 5, 0.030, 2)
    report = scored.report({1: "person"})
    assert report["queries"] == 2 and report["skipped_queries"] == 2
    assert report["map"] == pytest.approx((1 + 0.5 / 2) / 2)
    assert report["chance_map"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    scored.add([True, False], 2, 5, 0.020, 1)
    # APs 1 and 0.5 for person, 0.25 for category 2: a mean of 0.75 and 0.25.
    assert scored.report({})["category_map"] == pytest.approx((0.75 + 0.25) / 2)
    assert report["latency_ms_median"] == pytest.approx(20.0)
    assert report["ap_by_category"] == {
        "2": {"queries": 1, "map": 0.25},
        "person": {"queries": 1, "map": 1.0},
    }


def test_arguments_are_checked() -> None:
    parser = argparse.ArgumentParser()
    eval_objects.add_arguments(parser)
    base = ["--images", "i", "--coco-json", "j"]
    args = parser.parse_args(base)
    assert args.configs == ["objects", "whole", "exact"] and args.min_side == 64
    assert args.catalog_prefix is None and args.concurrency == 1
    assert parser.parse_args([*base, "--configs", "exact,whole,exact"]).configs == [
        "exact",
        "whole",
    ]
    for bad in (["--configs", "fast"], ["--catalog-prefix", "Bad-Name"], ["--top-k", "1000"]):
        with pytest.raises(SystemExit):
            parser.parse_args([*base, *bad])


def test_no_crop_query_is_an_error_the_user_can_fix(images_dir: Path, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    eval_objects.add_arguments(parser)
    path = write_json(tmp_path, coco_document())
    args = parser.parse_args(
        ["--images", str(images_dir), "--coco-json", str(path), "--min-side", "5000"]
    )
    assert eval_objects.run(args) == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--configs", "exact", "--objects"], "--objects needs the engine"),
        (["--configs", "exact", "--gateway", "127.0.0.1:9"], "pass --embedding-addr"),
    ],
    ids=["lens-without-engine", "no-embedding-service"],
)
def test_a_run_that_cannot_work_stops_before_it_starts(
    images_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
    message: str,
) -> None:
    monkeypatch.delenv("LOUPE_GATEWAY", raising=False)
    parser = argparse.ArgumentParser()
    eval_objects.add_arguments(parser)
    path = write_json(tmp_path, coco_document())
    args = parser.parse_args(
        ["--images", str(images_dir), "--coco-json", str(path), "--min-side", "64",
         "--data-dir", str(tmp_path / "no-stack"), *extra]
    )  # fmt: skip
    assert eval_objects.run(args) == 2
    assert message in capsys.readouterr().err
