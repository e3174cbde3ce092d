import subprocess
import sys
from pathlib import Path

import pytest

from services.cli.main import image_files, main
from services.cli.parsing import UsageError, parse_box, parse_metadata, parse_where
from services.common.items import MAX_FILTER_CONDITIONS


def test_where_builds_each_condition_kind() -> None:
    f = parse_where(["color=red", "size!=3", "brand=a|b", "price>=10", "price<20.5", "ok=true"])
    by_field = [(c.field, c.WhichOneof("test")) for c in f.all]
    assert by_field == [
        ("color", "equals"),
        ("size", "not_equals"),
        ("brand", "any_of"),
        ("price", "range"),
        ("price", "range"),
        ("ok", "equals"),
    ]
    assert f.all[0].equals.string_value == "red"
    assert f.all[1].not_equals.number_value == 3
    assert [v.string_value for v in f.all[2].any_of.values] == ["a", "b"]
    assert f.all[3].range.gte == 10 and not f.all[3].range.HasField("lt")
    assert f.all[4].range.lt == 20.5
    assert f.all[5].equals.bool_value is True


def test_quoted_values_stay_strings() -> None:
    assert parse_where(['sku="42"']).all[0].equals.string_value == "42"
    assert parse_metadata(['sku="42"', "n=42"]) == {
        "sku": parse_metadata(['sku="42"'])["sku"],
        "n": parse_metadata(["n=42"])["n"],
    }
    assert parse_metadata(["n=42"])["n"].number_value == 42


@pytest.mark.parametrize("bad", ["novalue", "=x", "price>=cheap"])
def test_bad_conditions_are_usage_errors(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_where([bad])


def test_box() -> None:
    box = parse_box("1,2.5,30,40")
    assert (box.x0, box.y0, box.x1, box.y1) == (1, 2.5, 30, 40)
    with pytest.raises(UsageError):
        parse_box("1,2,3")


def test_item_ids_are_paths_relative_to_the_folder_given(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.jpg").write_bytes(b"1")
    (tmp_path / "a" / "y.png").write_bytes(b"2")
    single = tmp_path / "a" / "y.png"
    assert list(image_files([str(tmp_path / "a"), str(single)])) == [
        (tmp_path / "a" / "b" / "x.jpg", "b/x.jpg"),
        (tmp_path / "a" / "y.png", "y.png"),
        (single, "y.png"),
    ]
    with pytest.raises(UsageError):
        list(image_files([str(tmp_path / "missing")]))


HUGE = "99999999999999"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["search", "x.jpg", "--top-k", HUGE], f"--top-k: {HUGE} is out of range: expected 1 to"),
        (["search", "x.jpg", "--top-k", "0"], "--top-k: 0 is out of range"),
        (["search", "x.jpg", "--top-k", "-3"], "--top-k: -3 is out of range"),
        (["search", "x.jpg", "--top-k", "ten"], "--top-k: 'ten' is not a whole number"),
        (["search", "x.jpg", "--candidates", HUGE], "--candidates: 99999999999999 is out of"),
        (["detect", "x.jpg", "--score-threshold", "2"], "--score-threshold: 2 is out of range"),
        (["detect", "x.jpg", "--score-threshold", "nan"], "--score-threshold: nan is out of"),
        (["catalogs", "augment", "c", "--neighbours", HUGE], "--neighbours: 99999999999999"),
        (["catalogs", "augment", "c", "--alpha", "inf"], "--alpha: inf is out of range"),
        (["up", "--timeout", "-1"], "--timeout: -1 is out of range"),
        (["index", "--manifest", "m.csv", "--download-concurrency", HUGE], "concurrency"),
        (["index", "--manifest", "m.csv", "--download-retries", "-1"], "--download-retries"),
        (["index", "--manifest", "m.csv", "--download-timeout", "0"], "--download-timeout: 0"),
        (["eval", "retrieval", "--gallery", "g", "--top-k", HUGE], "--top-k: 99999999999999"),
        (["eval", "retrieval", "--gallery", "g", "--candidates", f"10,{HUGE}"], "each must be"),
        (["eval", "retrieval", "--gallery", "g", "--numbered-groups", "-1"], "-1 is out of"),
    ],
)
def test_numeric_flags_out_of_range_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage: loupe" in err and message in err, err


def test_too_many_where_conditions_are_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    where = [a for i in range(MAX_FILTER_CONDITIONS + 1) for a in ("--where", f"k{i}=1")]
    assert main(["search", "x.jpg", *where]) == 2
    assert (
        f"--where given 65 times: filter has 65 conditions; the limit is {MAX_FILTER_CONDITIONS}"
        in (capsys.readouterr().err)
    )


def test_eval_detection_refuses_more_detections_than_the_service_returns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--images", str(tmp_path), "--coco-json", str(tmp_path / "c.json")]
    assert main(["eval", "detection", *args, "--max-detections", HUGE]) == 2
    assert f"--max-detections {HUGE}: must be 1 to 1000" in capsys.readouterr().err


def test_the_installed_command_gives_a_usage_error_not_a_traceback() -> None:
    """The reported case, as a user runs it."""
    loupe = Path(sys.executable).parent / "loupe"
    result = subprocess.run(
        [str(loupe), "search", "--top-k", HUGE, "photo.jpg"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"argument --top-k: {HUGE} is out of range: expected 1 to 1000" in result.stderr
