"""What an item may be: one rule for the gateway, which checks what callers send, and
retrieval, which stores it."""

from __future__ import annotations

import re
import unicodedata

MAX_ITEM_ID_CHARS = 512
# Recorded source URIs (a path or URI the image came from).
MAX_SOURCE_URI_BYTES = 2048
# Keys are written into filter expressions (metadata["key"]), so they are restricted to names.
METADATA_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
MAX_METADATA_KEYS = 64
MAX_STRING_VALUE_CHARS = 4096
# Conditions in one search filter: as many as an item has metadata keys. Milvus refuses an
# expression nested about 50 levels deep (a chain of 50 ANDs); retrieval/filters.py nests
# conditions as a balanced tree, so this limit, not Milvus's, is the one callers meet.
MAX_FILTER_CONDITIONS = MAX_METADATA_KEYS


class InvalidItem(ValueError):
    """The message says what to change."""


def check_item_id(item_id: str) -> str:
    if not item_id:
        raise InvalidItem("item_id is empty")
    if len(item_id) > MAX_ITEM_ID_CHARS:
        raise InvalidItem(
            f"item_id has {len(item_id)} characters; the limit is {MAX_ITEM_ID_CHARS}"
        )
    # Ids are identifiers; control characters are never meant, and milvus-lite could not
    # match a carriage return in a filter (retrieval/filters.py).
    if any(unicodedata.category(c) == "Cc" for c in item_id):
        raise InvalidItem(f"item_id {item_id!r} contains a control character")
    return item_id


def check_source_uri(source_uri: str) -> str:
    size = len(source_uri.encode())
    if size > MAX_SOURCE_URI_BYTES:
        raise InvalidItem(
            f"source_uri is {size} bytes in UTF-8; the limit is {MAX_SOURCE_URI_BYTES}"
        )
    if any(unicodedata.category(c) == "Cc" for c in source_uri):
        raise InvalidItem("source_uri contains a control character")
    return source_uri


def check_filter_conditions(count: int) -> None:
    if count > MAX_FILTER_CONDITIONS:
        raise InvalidItem(
            f"filter has {count} conditions; the limit is {MAX_FILTER_CONDITIONS} "
            "(any_of matches one of many values in one condition)"
        )


def is_metadata_key(key: str) -> bool:
    return METADATA_KEY.fullmatch(key) is not None
