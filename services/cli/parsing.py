"""Command-line arguments as API messages: metadata, filters, boxes, values.

Shared by the `loupe` commands (main.py) and manifest ingestion (manifest.py).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from loupe.v1 import common_pb2
from services.common.items import InvalidItem, check_filter_conditions
from services.retrieval.settings import MILVUS_MAX_TOPK

# Below the gateway's default LOUPE_MAX_MESSAGE_BYTES (32 MiB), leaving room for metadata.
MAX_IMAGE_BYTES = 30 << 20
# The most any gateway answers: LOUPE_GATEWAY_MAX_TOP_K is at most 1000, and candidates come
# from one Milvus search. A gateway configured lower says so itself.
MAX_TOP_K = 1000
MAX_CANDIDATES = MILVUS_MAX_TOPK


class UsageError(Exception):
    pass


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from `low` to `high`. Out of range is a usage error (exit
    2) naming the range, not a traceback from the protobuf field it would overflow."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range: expected {low} to {high}")
        return value

    return parse


def float_in(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a finite number from `low` to `high`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"{text} is out of range: expected {low:g} to {high:g}"
            )
        return value

    return parse


def parse_value(text: str) -> common_pb2.Value:
    """`true`/`false` are booleans, anything float() reads is a number, "quoted" is a string."""
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return common_pb2.Value(string_value=text[1:-1])
    if text in ("true", "false"):
        return common_pb2.Value(bool_value=text == "true")
    try:
        return common_pb2.Value(number_value=float(text))
    except ValueError:
        return common_pb2.Value(string_value=text)


def parse_metadata(pairs: list[str]) -> dict[str, common_pb2.Value]:
    metadata = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--meta {pair!r}: expected KEY=VALUE")
        metadata[key] = parse_value(value)
    return metadata


def parse_where(conditions: list[str]) -> common_pb2.Filter:
    """KEY=V, KEY!=V, KEY=V1|V2 (any of), KEY>=N, KEY>N, KEY<=N, KEY<N; all must hold."""
    try:
        check_filter_conditions(len(conditions))
    except InvalidItem as error:
        raise UsageError(f"--where given {len(conditions)} times: {error}") from None
    result = common_pb2.Filter()
    for text in conditions:
        for op in ("!=", ">=", "<=", "=", ">", "<"):
            key, sep, value = text.partition(op)
            if sep and key and value:
                break
        else:
            raise UsageError(f"--where {text!r}: expected KEY=VALUE, KEY!=VALUE, KEY>=N, ...")
        condition = result.all.add(field=key)
        if op == "=" and "|" in value:
            condition.any_of.values.extend(parse_value(v) for v in value.split("|"))
        elif op == "=":
            condition.equals.CopyFrom(parse_value(value))
        elif op == "!=":
            condition.not_equals.CopyFrom(parse_value(value))
        else:
            try:
                number = float(value)
            except ValueError:
                raise UsageError(f"--where {text!r}: {op} needs a number") from None
            bound = {">=": "gte", ">": "gt", "<=": "lte", "<": "lt"}[op]
            setattr(condition.range, bound, number)
    return result


def parse_box(text: str) -> common_pb2.Box:
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--box {text!r}: expected x0,y0,x1,y1 in pixels") from None
    return common_pb2.Box(x0=x0, y0=y0, x1=x1, y1=y1)
