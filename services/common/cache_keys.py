"""Redis keys of the result and embedding caches: the gateway reads and writes them, and
retrieval, which changes rows, bumps the generation that makes cached results unreachable."""

from __future__ import annotations

import hashlib

GENERATION_KEY = "loupe:generation"


def generation_key(catalog: str) -> str:
    """Each catalogue has its own index generation: writing to one keeps the others' cached
    results."""
    return f"{GENERATION_KEY}:{catalog}"


def embedding_key(embedder: str, detector: str, content_hash: str) -> str:
    """Vectors of one image content under one model pair ("-" when nothing was detected)."""
    return f"loupe:emb:{embedder}:{detector}:{content_hash}"


def search_key(generation: int, normalised_request: bytes) -> str:
    digest = hashlib.sha256(normalised_request).hexdigest()
    return f"loupe:search:{generation}:{digest}"
