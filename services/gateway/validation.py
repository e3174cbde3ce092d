"""Checks on what callers send, with messages that say how to fix the request."""

from __future__ import annotations

import math
from collections.abc import Mapping

from loupe.v1 import common_pb2
from services.common import catalogs
from services.common import items as item_rules
from services.common.items import MAX_METADATA_KEYS, MAX_STRING_VALUE_CHARS
from services.gateway.backends import RequestError, grpc


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def check_item_id(item_id: str) -> None:
    try:
        item_rules.check_item_id(item_id)
    except item_rules.InvalidItem as error:
        raise invalid(str(error)) from None


def check_source_uri(source_uri: str) -> None:
    try:
        item_rules.check_source_uri(source_uri)
    except item_rules.InvalidItem as error:
        raise invalid(str(error)) from None


def check_filter(filter_: common_pb2.Filter) -> None:
    """Retrieval checks the filter too; here a search that cannot run costs no embedding."""
    try:
        item_rules.check_filter_conditions(len(filter_.all))
    except item_rules.InvalidItem as error:
        raise invalid(str(error)) from None


def resolve_catalog(catalog: str) -> str:
    try:
        return catalogs.resolve_catalog(catalog)
    except catalogs.InvalidCatalog as error:
        raise invalid(str(error)) from None


def check_metadata(metadata: Mapping[str, common_pb2.Value], what: str = "metadata") -> None:
    items = list(metadata.items())
    if len(items) > MAX_METADATA_KEYS:
        raise invalid(f"{what} has {len(items)} keys; the limit is {MAX_METADATA_KEYS}")
    for key, value in items:
        if not item_rules.is_metadata_key(key):
            raise invalid(f"{what} key {key!r} must match [A-Za-z_][A-Za-z0-9_]{{0,63}}")
        kind = value.WhichOneof("kind")
        if kind is None:
            raise invalid(f"{what}[{key!r}] has no value")
        if kind == "number_value" and not math.isfinite(value.number_value):
            raise invalid(f"{what}[{key!r}] is not a finite number")
        if kind == "string_value" and len(value.string_value) > MAX_STRING_VALUE_CHARS:
            raise invalid(f"{what}[{key!r}] is longer than {MAX_STRING_VALUE_CHARS} characters")


def resolve_top_k(top_k: int, default: int, maximum: int) -> int:
    if top_k == 0:
        return default
    if not 1 <= top_k <= maximum:
        raise invalid(f"top_k={top_k}: must be between 1 and {maximum}")
    return top_k
