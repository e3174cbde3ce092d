"""Catalogue names: one rule for the gateway, which checks what callers send, and retrieval,
which turns a name into a Milvus collection.

A name never holds "__": retrieval names a catalogue's re-index collections NAME__gN (and
its own record collection starts with "_"), so no catalogue can collide with them."""

from __future__ import annotations

import re

DEFAULT_CATALOG = "default"
CATALOG_PATTERN = re.compile(r"(?!.*__)[a-z0-9][a-z0-9_]{0,63}")


class InvalidCatalog(ValueError):
    """The message says what a catalogue name may be."""


def resolve_catalog(catalog: str) -> str:
    """The catalogue a request names: empty means the default one."""
    if not catalog:
        return DEFAULT_CATALOG
    if not CATALOG_PATTERN.fullmatch(catalog):
        raise InvalidCatalog(
            f"catalog {catalog!r}: expected 1 to 64 lower-case letters, digits and underscores, "
            "starting with a letter or digit, with no two underscores in a row"
        )
    return catalog
