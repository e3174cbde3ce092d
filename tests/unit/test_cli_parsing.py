from pathlib import Path

import pytest

from services.cli.main import image_files
from services.cli.parsing import UsageError, parse_box, parse_metadata, parse_where


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
