import json
import re

import pytest

from loupe.v1 import common_pb2 as c
from services.common.items import MAX_FILTER_CONDITIONS
from services.retrieval.filters import InvalidFilter, build_filter, quote

HOSTILE = [
    'x" or item_id != "',
    "') or true or ('",
    "a\\b",
    "\\",
    'end\\"',
    '\\"',
    "it's",
    "ü中😀",
    "line\nbreak",
    "tab\tNUL\x00esc\x1b",
    "{p0}",
    "",
]


def s(text: str) -> c.Value:
    return c.Value(string_value=text)


def n(number: float) -> c.Value:
    return c.Value(number_value=number)


def where(*conditions: c.Condition) -> c.Filter:
    return c.Filter(all=list(conditions))


def expr(*conditions: c.Condition, lite: bool = False) -> str:
    expression, params = build_filter(where(*conditions), lite=lite)
    assert params == {}
    return expression


# How each Milvus parser reads a string literal (measured against milvus-lite 2.5.1 and the
# Milvus 2.3.5 server): the server unquotes like Go (JSON-compatible for what `quote` writes);
# milvus-lite drops the backslash of every escape.
def server_unquote(literal: str) -> str:
    return json.loads(literal, strict=False)


def lite_unquote(literal: str) -> str:
    assert literal[0] == literal[-1] == '"'
    return re.sub(r"\\(.)", r"\1", literal[1:-1], flags=re.DOTALL)


def test_equals_for_each_value_kind() -> None:
    assert expr(c.Condition(field="color", equals=s("red"))) == 'metadata["color"] == "red"'
    assert expr(c.Condition(field="n", equals=n(3))) == 'metadata["n"] == 3.0'
    assert expr(c.Condition(field="ok", equals=c.Value(bool_value=True))) == (
        'metadata["ok"] == true'
    )


def test_not_equals() -> None:
    condition = c.Condition(field="ok", not_equals=c.Value(bool_value=False))
    assert expr(condition) == 'metadata["ok"] != false'


def test_any_of_groups_values_by_type_and_drops_duplicates() -> None:
    values = c.ValueList(values=[s("a"), n(1), s("b"), s("a"), n(2.5)])
    assert expr(c.Condition(field="k", any_of=values)) == (
        'metadata["k"] in ["a", "b"] or metadata["k"] in [1.0, 2.5]'
    )


def test_range_bounds() -> None:
    assert expr(c.Condition(field="p", range=c.Range(gte=1, lt=10))) == (
        'metadata["p"] >= 1.0 and metadata["p"] < 10.0'
    )
    assert expr(c.Condition(field="p", range=c.Range(gt=-2.5, lte=1e300))) == (
        'metadata["p"] > -2.5 and metadata["p"] <= 1e+300'
    )


def test_conditions_exclusions_and_whole_images_are_anded() -> None:
    expression, params = build_filter(
        where(c.Condition(field="a", equals=s("x")), c.Condition(field="b", equals=n(1))),
        ["i1", "i2", "i1"],
        True,
    )
    assert expression == (
        '((metadata["a"] == "x") and (metadata["b"] == 1.0)) and '
        '((item_id not in ["i1", "i2"]) and (object_index == 0))'
    )
    assert params == {}


def nesting(expression: str) -> int:
    depth = deepest = 0
    for char in expression:
        depth += {"(": 1, ")": -1}.get(char, 0)
        deepest = max(deepest, depth)
    return deepest


def test_conditions_nest_as_a_balanced_tree() -> None:
    """Milvus fails a plan nested about 50 levels deep: a chain of ANDs grows a level per
    condition, a balanced tree one per doubling."""
    conditions = [c.Condition(field=f"k{i}", equals=n(i)) for i in range(MAX_FILTER_CONDITIONS)]
    expression, _ = build_filter(where(*conditions), ["x"], True)
    assert nesting(expression) == 7  # ceil(log2(64 + 2))
    assert expression.count(" and ") == MAX_FILTER_CONDITIONS + 1
    three, _ = build_filter(where(*conditions[:3]))
    assert three == (
        '((metadata["k0"] == 0.0) and (metadata["k1"] == 1.0)) and (metadata["k2"] == 2.0)'
    )


def test_too_many_conditions_names_the_limit() -> None:
    conditions = [c.Condition(field="k", equals=n(i)) for i in range(MAX_FILTER_CONDITIONS + 1)]
    with pytest.raises(InvalidFilter, match=f"65 conditions; the limit is {MAX_FILTER_CONDITIONS}"):
        build_filter(where(*conditions))


def test_nothing_to_filter_is_an_empty_expression() -> None:
    assert build_filter(None) == ("", {})
    assert build_filter(c.Filter()) == ("", {})


@pytest.mark.parametrize("key", ["", "1a", "a-b", 'a"]', "a b", "é", "a" * 65, 'x"] or true or ["'])
def test_invalid_keys(key: str) -> None:
    with pytest.raises(InvalidFilter, match="not a metadata key"):
        build_filter(where(c.Condition(field=key, equals=s("x"))))


def test_longest_valid_key() -> None:
    assert expr(c.Condition(field="_" + "a" * 63, equals=n(1))).startswith('metadata["_aaa')


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        (c.Condition(field="k", any_of=c.ValueList()), "at least one value"),
        (c.Condition(field="k", any_of=c.ValueList(values=[n(i) for i in range(1001)])), "1001"),
        (c.Condition(field="k", range=c.Range()), "at least one of"),
        (c.Condition(field="k"), "no test"),
        (c.Condition(field="k", equals=c.Value()), "no string, number or bool"),
        (c.Condition(field="k", equals=n(float("nan"))), "not a finite number"),
        (c.Condition(field="k", range=c.Range(lt=float("inf"))), "not a finite number"),
    ],
)
def test_invalid_conditions(condition: c.Condition, message: str) -> None:
    with pytest.raises(InvalidFilter, match=message):
        build_filter(where(condition))


def test_too_many_exclusions() -> None:
    with pytest.raises(InvalidFilter, match="exclude_item_ids"):
        build_filter(None, [str(i) for i in range(10_001)])


@pytest.mark.parametrize("text", HOSTILE)
def test_quote_round_trips_in_both_dialects(text: str) -> None:
    assert server_unquote(quote(text)) == text
    assert lite_unquote(quote(text, lite=True)) == text


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_values_stay_inside_one_literal(text: str) -> None:
    for lite in (False, True):
        expression = expr(c.Condition(field="k", equals=s(text)), lite=lite)
        prefix = 'metadata["k"] == '
        assert expression.startswith(prefix)
        literal = expression[len(prefix) :]
        # No unescaped quote before the closing one: the value cannot end the literal early.
        assert re.fullmatch(r'"(?:[^"\\]|\\.)*"', literal, flags=re.DOTALL), literal


def test_quote_escapes_exactly() -> None:
    assert quote('x" or item_id != "') == r'"x\" or item_id != \""'
    assert quote("a\\b") == r'"a\\b"'
    assert quote("a\nb") == r'"a\nb"'
    assert quote("a\nb", lite=True) == '"a\\\nb"'
    assert quote("a\r\nb") == r'"a\r\nb"'


def test_carriage_return_is_refused_for_milvus_lite() -> None:
    with pytest.raises(InvalidFilter, match="carriage return"):
        quote("a\rb", lite=True)
