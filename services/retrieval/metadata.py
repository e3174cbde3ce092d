"""Item metadata: the proto map<string, Value> and the JSON object Milvus stores."""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping
from typing import Any

from loupe.v1 import common_pb2
from services.common.items import is_metadata_key

Scalar = str | float | bool


class InvalidMetadata(ValueError):
    """Metadata the caller sent cannot be stored; the message says which key and why."""


def is_valid_key(key: str) -> bool:
    return is_metadata_key(key)


def value_to_python(value: common_pb2.Value) -> Scalar | None:
    """The value as str, float or bool; None when no kind is set."""
    kind = value.WhichOneof("kind")
    if kind is None:
        return None
    result: Scalar = getattr(value, kind)
    return result


def value_from_python(data: Any) -> common_pb2.Value | None:
    """A Value for a JSON scalar; None for what a Value cannot hold (null, lists, objects)."""
    # bool first: it is a subclass of int.
    if isinstance(data, bool):
        return common_pb2.Value(bool_value=data)
    if isinstance(data, int | float):
        return common_pb2.Value(number_value=float(data))
    if isinstance(data, str):
        return common_pb2.Value(string_value=data)
    return None


def to_json(metadata: Mapping[str, common_pb2.Value]) -> dict[str, Scalar]:
    """Validate and convert a proto metadata map for storage."""
    result: dict[str, Scalar] = {}
    for key, value in metadata.items():
        if not is_valid_key(key):
            raise InvalidMetadata(
                f"metadata key {key!r} is not a name: expected [A-Za-z_][A-Za-z0-9_]{{0,63}}"
            )
        python = value_to_python(value)
        if python is None:
            raise InvalidMetadata(f"metadata[{key!r}] has no string, number or bool value")
        if isinstance(python, float) and not math.isfinite(python):
            raise InvalidMetadata(f"metadata[{key!r}] = {python}: numbers must be finite")
        result[key] = python
    return result


def to_proto(data: Mapping[str, Any] | None, target: MutableMapping[str, common_pb2.Value]) -> None:
    """Fill a proto metadata map from stored JSON, skipping values a Value cannot hold."""
    for key, item in (data or {}).items():
        value = value_from_python(item)
        if value is not None:
            target[key].CopyFrom(value)
