"""Vectors as the ANN index holds them, and full vectors as text beside them.

Binary codes are sign random projections (SimHash): bit j is 1 when the vector's inner product
with hyperplane j is positive, so the Hamming distance h of two codes estimates the angle
between the vectors as pi * h / bits. The hyperplanes are +-1 entries drawn from SHA-256 in
counter mode: the same on every machine and every numpy version, which the codes of a
catalogue depend on (a changed projection would silently break every stored code).
"""

from __future__ import annotations

import base64
import hashlib
import math
from functools import lru_cache

import numpy as np

SEED = b"loupe-simhash-v1"


@lru_cache(maxsize=4)
def hyperplanes(dim: int, bits: int) -> np.ndarray:
    """A fixed [dim, bits] matrix of +-1."""
    needed = dim * bits // 8 + 1
    stream = bytearray()
    counter = 0
    while len(stream) < needed:
        stream += hashlib.sha256(SEED + counter.to_bytes(8, "little")).digest()
        counter += 1
    signs = np.unpackbits(np.frombuffer(bytes(stream), np.uint8))[: dim * bits]
    return (signs.reshape(dim, bits).astype(np.float32) * 2.0 - 1.0).astype(np.float32)


def code_bits(dim: int) -> int:
    """One bit per dimension, rounded up to whole bytes (Milvus stores bytes)."""
    return 8 * math.ceil(dim / 8)


def binary_codes(vectors: np.ndarray) -> list[bytes]:
    """[n, dim] float -> n packed sign codes of code_bits(dim) bits."""
    matrix = np.asarray(vectors, np.float32).reshape(len(vectors), -1)
    projected = matrix @ hyperplanes(matrix.shape[1], code_bits(matrix.shape[1]))
    return [row.tobytes() for row in np.packbits(projected > 0, axis=1)]


def hamming_to_cosine(distance: float, bits: int) -> float:
    """The cosine that a Hamming distance between sign codes implies."""
    return math.cos(math.pi * min(max(distance, 0.0), bits) / bits)


def encode_vector(vector: np.ndarray) -> str:
    """float32 little-endian, base64: the full-precision vector as a VARCHAR value.

    Milvus returns VARCHARs several times faster than float vector fields (tools/bench_search.py
    measured this), and a text field keeps one schema across milvus-lite and Milvus 2.3+.
    """
    return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode("ascii")


def decode_vector(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), "<f4")


def encoded_length(dim: int) -> int:
    return 4 * math.ceil(4 * dim / 3)
