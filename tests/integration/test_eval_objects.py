"""`loupe eval objects` through a whole stack (`loupe up`) on a few coco128-val images: the
three configurations and the Lens mode in one run, and nothing left behind."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from loupe.v1 import gateway_pb2
from tests.integration.stacks import running_stack

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("LOUPE_SHARED_DIR", ROOT.parent / "shared"))
COCO = SHARED / "data" / "coco128-val"
COCO_JSON = COCO / "instances_val2017_subset.json"
# Few enough for seconds of indexing and querying on two cores; enough that most categories
# queried have another image holding them.
IMAGES = 12

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not COCO_JSON.is_file(), reason=f"no coco128-val at {COCO}"),
    pytest.mark.skipif(
        not (ROOT / "models" / "embedder" / "1" / "model.onnx").is_file(),
        reason="models not built: python models/build_models.py",
    ),
]


def test_eval_objects_measures_every_configuration_and_cleans_up(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((COCO / "images").glob("*.jpg"))[:IMAGES]:
        (images / path.name).symlink_to(path)
    truth = json.loads(COCO_JSON.read_text())
    on_disk = {p.name for p in images.iterdir()}
    ids = {i["id"] for i in truth["images"] if i["file_name"] in on_disk}
    expected_queries = sum(
        1
        for a in truth["annotations"]
        if a["image_id"] in ids and not a.get("iscrowd") and min(a["bbox"][2:]) >= 64
    )
    report_file = tmp_path / "report.json"
    with running_stack(tmp_path / "stack") as stack:
        # The stack's own directory: the exact baseline finds its embedding service, and both
        # channels its client certificate, there (LOUPE_TLS_CA alone would send none).
        stack.env.pop("LOUPE_TLS_CA", None)
        result = stack.loupe(
            "eval", "objects", "--images", str(images), "--coco-json", str(COCO_JSON),
            "--data-dir", str(stack.data_dir), "--objects", "--top-k", "5", "--quiet",
            "--catalog-prefix", "itest", "--json", str(report_file),
        )  # fmt: skip
        left = [
            c.name
            for c in stack.stub().ListCatalogs(gateway_pb2.ListCatalogsRequest()).catalogs
            if c.name.startswith("itest")
        ]
        unreachable = stack.loupe(
            "eval", "objects", "--images", str(images), "--coco-json", str(COCO_JSON),
            "--configs", "exact", "--embedding-addr", "127.0.0.1:1", "--quiet",
            check=False, timeout=60,
        )  # fmt: skip
    print(result.stdout)
    assert left == []
    assert unreachable.returncode == 2 and "embedding service at 127.0.0.1:1" in unreachable.stderr

    report = json.loads(report_file.read_text())
    assert report["gallery_images"] == IMAGES and report["top_k"] == 5
    assert report["crop_queries"] == expected_queries > 10
    assert report["model_version"].startswith("embedder/")
    assert report["size_mismatches"] == [] and report["cached_responses"] == 0
    assert report["catalogs"]["objects"]["rows"] > report["catalogs"]["whole"]["rows"] == IMAGES
    crops = report["crops"]
    assert set(crops) == {"objects", "whole", "exact"}
    for config, figures in crops.items():
        # Same images, same relevance: only the ranking differs between configurations.
        assert figures["queries"] + figures["skipped_queries"] == expected_queries, config
        assert figures["queries"] == crops["exact"]["queries"], config
        assert 0.2 < figures["map"] <= 1 and 0 < figures["p_at_5"] <= 1, (config, figures)
        assert 0 < figures["latency_ms_median"] <= figures["latency_ms_p95"], config
    lens = report["lens"]
    assert set(lens) == {"objects", "whole", "exact"}
    for config, figures in lens.items():
        assert 0 < figures["matched_objects"] <= figures["detected_objects"], config
        assert figures["queries"] + figures["skipped_queries"] == figures["matched_objects"]
        assert 0.2 < figures["map"] <= 1, (config, figures)
    assert re.search(r"^\| crops +\| exact +\| +\d+ \|", result.stdout, re.MULTILINE)
    assert re.search(r"^\| lens +\| objects +\| +\d+ \|", result.stdout, re.MULTILINE)
