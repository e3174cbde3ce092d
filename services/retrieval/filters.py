r"""Metadata filters as Milvus boolean expressions, with caller values as safe literals.

Why literals and not Milvus filter templates (`item_id == {p}` with `filter_params`): neither
milvus-lite 2.5.1 nor the Milvus 2.3 server parse the `{p}` placeholder (a lexer error; lite
even answers with an opaque UNKNOWN that pymilvus keeps retrying). So every caller string goes
through `quote`, the one escaping function, and numbers and bools are written by this module
from typed proto fields. `build_filter` still returns a parameter dict (always empty today) and
the store passes it on, so moving to templates later changes this file only.

The two Milvus parsers agree that `\\` is a backslash and `\"` a quote, and take every other
character (tab, NUL, any Unicode) as is, except line breaks: both lexers refuse them raw, and
they decode escapes differently. The server (Go) unquotes `\n` and `\r` like Go does;
milvus-lite's C++ parser drops the backslash of any escape (`\n` means "n") and reads a
backslash followed by a raw LF as a LF; it cannot express a lone CR at all. Hence `lite`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from loupe.v1 import common_pb2
from services.common.items import InvalidItem, check_filter_conditions
from services.retrieval.metadata import is_valid_key

MAX_ANY_OF = 1000
MAX_EXCLUDED = 10_000

_SERVER_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r"})
_LITE_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\\n"})


class InvalidFilter(ValueError):
    """The caller's filter cannot be expressed; the message says which condition and why."""


def quote(text: str, *, lite: bool = False) -> str:
    """A Milvus string literal that matches `text` exactly."""
    if lite and "\r" in text:
        raise InvalidFilter(
            f"{text!r}: milvus-lite cannot match a string containing a carriage return (\\r)"
        )
    return '"' + text.translate(_LITE_ESCAPES if lite else _SERVER_ESCAPES) + '"'


def build_filter(
    filter_proto: common_pb2.Filter | None,
    exclude_item_ids: Iterable[str] = (),
    whole_images_only: bool = False,
    *,
    lite: bool = False,
) -> tuple[str, dict[str, Any]]:
    """The expression for a search (empty when nothing filters) and its parameters."""
    conditions = filter_proto.all if filter_proto else ()
    try:
        check_filter_conditions(len(conditions))
    except InvalidItem as error:
        raise InvalidFilter(str(error)) from None
    clauses = [_condition(c, lite) for c in conditions]
    excluded = list(dict.fromkeys(exclude_item_ids))
    if len(excluded) > MAX_EXCLUDED:
        raise InvalidFilter(f"{len(excluded)} exclude_item_ids; at most {MAX_EXCLUDED}")
    if excluded:
        # `not item_id in [...]` is refused by both parsers; `not in` is the supported form.
        clauses.append(f"item_id not in [{', '.join(quote(i, lite=lite) for i in excluded)}]")
    if whole_images_only:
        clauses.append("object_index == 0")
    return _all_of(clauses) if clauses else "", {}


def _all_of(clauses: list[str]) -> str:
    """The clauses ANDed as a balanced tree. Both Milvus parsers nest `a and b and c ...` one
    level per clause, and milvus-lite fails a plan about 50 levels deep ("unsupported expr
    proto node"); balanced, the deepest filter allowed is a few levels."""
    if len(clauses) == 1:
        return clauses[0]
    middle = (len(clauses) + 1) // 2
    return " and ".join(f"({_all_of(half)})" for half in (clauses[:middle], clauses[middle:]))


def _condition(condition: common_pb2.Condition, lite: bool) -> str:
    field = condition.field
    if not is_valid_key(field):
        raise InvalidFilter(
            f"filter field {field!r} is not a metadata key: expected [A-Za-z_][A-Za-z0-9_]{{0,63}}"
        )
    path = f'metadata["{field}"]'
    test = condition.WhichOneof("test")
    if test == "equals":
        return f"{path} == {_literal(condition.equals, field, lite)}"
    if test == "not_equals":
        # Like Milvus itself: rows without the field match too.
        return f"{path} != {_literal(condition.not_equals, field, lite)}"
    if test == "any_of":
        return _any_of(path, field, condition.any_of.values, lite)
    if test == "range":
        return _range(path, field, condition.range)
    raise InvalidFilter(f"filter on {field!r} has no test (equals, not_equals, any_of or range)")


def _any_of(path: str, field: str, values: Iterable[common_pb2.Value], lite: bool) -> str:
    literals = list(values)
    if not literals:
        raise InvalidFilter(f"filter on {field!r}: any_of needs at least one value")
    if len(literals) > MAX_ANY_OF:
        raise InvalidFilter(
            f"filter on {field!r}: any_of has {len(literals)} values; at most {MAX_ANY_OF}"
        )
    # Milvus (lite and server) crashes the query on a list mixing types, even int and float,
    # so each type gets its own list.
    groups: dict[str, list[str]] = {}
    for value in literals:
        kind = value.WhichOneof("kind") or ""
        groups.setdefault(kind, []).append(_literal(value, field, lite))
    return " or ".join(f"{path} in [{', '.join(dict.fromkeys(g))}]" for g in groups.values())


def _range(path: str, field: str, bounds: common_pb2.Range) -> str:
    parts = [
        f"{path} {op} {_number(getattr(bounds, name), field)}"
        for name, op in (("gte", ">="), ("gt", ">"), ("lte", "<="), ("lt", "<"))
        if bounds.HasField(name)
    ]
    if not parts:
        raise InvalidFilter(f"filter on {field!r}: range needs at least one of gte, gt, lte, lt")
    return " and ".join(parts)


def _literal(value: common_pb2.Value, field: str, lite: bool) -> str:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return quote(value.string_value, lite=lite)
    if kind == "number_value":
        return _number(value.number_value, field)
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    raise InvalidFilter(f"filter on {field!r}: a value has no string, number or bool set")


def _number(number: float, field: str) -> str:
    if not math.isfinite(number):
        raise InvalidFilter(f"filter on {field!r}: {number} is not a finite number")
    # Always a float literal: Milvus compares a JSON 3 and 3.0 as equal, but mixing int and
    # float literals in one list crashes it (see _any_of).
    return repr(float(number))
