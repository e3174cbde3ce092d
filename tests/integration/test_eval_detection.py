"""`loupe eval detection` against a real detection service on a few coco128-val images."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loupe.v1 import detection_pb2_grpc
from services.cli import eval_detection
from services.common.inference import REPOSITORY_IN_CHECKOUT
from services.detection.service import DetectionService
from services.detection.settings import DetectionSettings
from tests.support import serving

SHARED_DIR = Path(
    os.environ.get("LOUPE_SHARED_DIR", REPOSITORY_IN_CHECKOUT.parent.parent / "shared")
)
COCO = SHARED_DIR / "data" / "coco128-val"
IMAGES = COCO / "images"
COCO_JSON = COCO / "instances_val2017_subset.json"
MODEL = REPOSITORY_IN_CHECKOUT / "detector" / "1" / "model.onnx"
# Enough images for AP to mean something, few enough for a few seconds on two cores.
LIMIT = 12

pytestmark = [
    pytest.mark.skipif(not MODEL.is_file(), reason="models not built: run models/build_models.py"),
    pytest.mark.skipif(
        not COCO_JSON.is_file(), reason=f"no coco128-val at {COCO} (set LOUPE_SHARED_DIR)"
    ),
]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    eval_detection.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def detection() -> Iterator[detection_pb2_grpc.DetectionServiceStub]:
    with serving(DetectionService(DetectionSettings.from_env())) as channel:
        yield detection_pb2_grpc.DetectionServiceStub(channel)


@pytest.fixture(scope="module")
def dataset() -> eval_detection.Dataset:
    full = eval_detection.load_dataset(IMAGES, COCO_JSON)
    return eval_detection.Dataset(
        full.ground_truth, full.images[:LIMIT], full.category_of_class, full.images_in_json
    )


def test_service_matches_the_reference(
    detection: detection_pb2_grpc.DetectionServiceStub,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # run() as the CLI calls it, with only the channel swapped for the in-process service.
    @contextlib.contextmanager
    def in_process(_: argparse.Namespace) -> Iterator[tuple[Any, str]]:
        yield detection, "in-process detection service"

    monkeypatch.setattr(eval_detection, "connect", in_process)
    out = tmp_path / "figures.json"
    args = parse(
        "--images", str(IMAGES), "--coco-json", str(COCO_JSON), "--limit", str(LIMIT),
        "--json", str(out), "--quiet",
    )  # fmt: skip
    assert eval_detection.run(args) == 0
    figures = json.loads(out.read_text())
    assert figures["images"] == LIMIT
    for side in ("service", "reference"):
        assert 0.2 < figures[side]["AP"] < 0.8, figures
        assert figures[side]["AP"] < figures[side]["AP50"] <= 1.0, figures
        assert 0 < figures[side]["detections"] <= LIMIT * 100
    # The two differ only in the resize filter (Pillow's anti-aliased bilinear against
    # OpenCV's plain one): a few thousandths of AP at most.
    assert abs(figures["gap"]["AP"]) <= 0.005, figures
    assert figures["agreement"] > 0.85, figures
    assert figures["within_max_gap"] is True


class RgbInput(eval_detection.ReferenceDecoder):
    """The classic preprocessing slip: feeding YOLOX RGB where it was trained on BGR."""

    def letterbox(self, rgb: np.ndarray) -> tuple[np.ndarray, float]:
        tensor, ratio = super().letterbox(rgb)
        return np.ascontiguousarray(tensor[:, ::-1]), ratio


@pytest.mark.parametrize(
    ("broken", "worse_by"),
    [
        # Strides in the wrong order: the same anchor count, so it runs, and every box lands
        # on the wrong grid.
        (lambda t: eval_detection.ReferenceDecoder(MODEL, t, strides=(16, 8, 32)), 0.1),
        # Subtler: boxes stay right, scores sag (-0.028 AP on these 12 images).
        (lambda t: RgbInput(MODEL, t), 0.01),
    ],
    ids=["scrambled-strides", "rgb-input"],
)
def test_a_broken_decode_shows_as_a_gap(
    dataset: eval_detection.Dataset,
    broken: Callable[[eval_detection.Thresholds], eval_detection.ReferenceDecoder],
    worse_by: float,
) -> None:
    """The tool's point: a service that decodes or preprocesses wrongly cannot pass. The
    'service' here is the reference with one deliberate mistake."""
    thresholds = eval_detection.Thresholds(0.001, 0.45, 100)
    reference = eval_detection.ReferenceDecoder(MODEL, thresholds)
    report = eval_detection.compare(dataset, broken(thresholds), reference, progress=False)
    gap = report.gap("AP")
    assert gap is not None and gap < -worse_by, eval_detection.format_table(report)
    assert report.agreement is not None and report.agreement < 0.8


def test_unreachable_service_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    # Port 1 on loopback: nothing listens there, the connection is refused at once.
    args = parse(
        "--images", str(IMAGES), "--coco-json", str(COCO_JSON), "--detection-addr",
        "127.0.0.1:1", "--quiet",
    )  # fmt: skip
    assert eval_detection.run(args) == 1
    message = capsys.readouterr().err
    assert "cannot reach the detection service at 127.0.0.1:1" in message


def test_wrong_paths_and_foreign_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    no_folder = parse("--images", str(tmp_path / "nope"), "--coco-json", str(COCO_JSON))
    assert eval_detection.run(no_folder) == 2
    assert f"--images {tmp_path / 'nope'}: no such folder" in capsys.readouterr().err

    missing = parse("--images", str(IMAGES), "--coco-json", str(tmp_path / "none.json"))
    assert eval_detection.run(missing) == 2
    assert "no such file" in capsys.readouterr().err

    foreign = tmp_path / "foreign.json"
    truth = json.loads(COCO_JSON.read_text())
    for image in truth["images"]:
        image["file_name"] = "other_" + image["file_name"]
    foreign.write_text(json.dumps(truth))
    assert eval_detection.run(parse("--images", str(IMAGES), "--coco-json", str(foreign))) == 2
    assert "is in the 'images' list" in capsys.readouterr().err


def test_rpc_failure_other_than_connect_is_reported(
    detection: detection_pb2_grpc.DetectionServiceStub,
) -> None:
    # The service refuses a threshold outside (0, 1]: its message comes through as is.
    detect = eval_detection.service_detector(
        detection, eval_detection.Thresholds(1.5, 0.45, 100), "detection service"
    )
    with pytest.raises(eval_detection.EvalError, match="INVALID_ARGUMENT"):
        detect((IMAGES / "000000000139.jpg").read_bytes())
