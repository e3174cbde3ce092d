"""What the compact index holds: sign codes of a fixed random projection (SimHash).

Bit j of a code is 1 when the vector's inner product with hyperplane j is positive, so the
Hamming distance h of two codes estimates the angle between the vectors as pi * h / bits. The
hyperplanes are +-1 entries drawn from SHA-256 in counter mode: the same on every machine and
every numpy version, which a catalogue's codes depend on (a changed projection would silently
break every stored code, so a catalogue records which code it was built with: CatalogLayout).

Two versions:
- "simhash-v1": the hyperplanes as drawn.
- "simhash-v2" (new catalogues): each hyperplane shifted to sum to zero. A sign code then
  ignores any offset shared by all dimensions, and the features of a ReLU network (MobileNetV2's,
  all >= 0) share a large one: with v1 many bits are nearly constant across a catalogue. On
  Corel-1k mixed into 1 M vectors, candidate recall@10 of the top 1000 by Hamming distance goes
  from 0.96 (v1) to 0.98 (v2) (docs/scale.md). It costs nothing for centred embeddings (CLIP).
"""

from __future__ import annotations

import base64
import hashlib
import math
from functools import lru_cache

import numpy as np

SEED = b"loupe-simhash-v1"
SIMHASH_V1 = "simhash-v1"
SIMHASH_V2 = "simhash-v2"
FLOAT = "float"
BINARY_CODES = (SIMHASH_V1, SIMHASH_V2)


@lru_cache(maxsize=4)
def hyperplanes(dim: int, bits: int) -> np.ndarray:
    """A fixed [dim, bits] matrix of +-1 (simhash-v1)."""
    needed = dim * bits // 8 + 1
    stream = bytearray()
    counter = 0
    while len(stream) < needed:
        stream += hashlib.sha256(SEED + counter.to_bytes(8, "little")).digest()
        counter += 1
    signs = np.unpackbits(np.frombuffer(bytes(stream), np.uint8))[: dim * bits]
    return (signs.reshape(dim, bits).astype(np.float32) * 2.0 - 1.0).astype(np.float32)


@lru_cache(maxsize=4)
def zero_sum_hyperplanes(dim: int, bits: int) -> np.ndarray:
    """simhash-v1's hyperplanes, each shifted to sum to zero over the dimensions (v2)."""
    planes = hyperplanes(dim, bits).astype(np.float64)
    return (planes - planes.mean(axis=0, keepdims=True)).astype(np.float32)


def code_bits(dim: int) -> int:
    """One bit per dimension, rounded up to whole bytes (Milvus stores bytes)."""
    return 8 * math.ceil(dim / 8)


def binary_codes(vectors: np.ndarray, code: str = SIMHASH_V1) -> list[bytes]:
    """[n, dim] float -> n packed sign codes of code_bits(dim) bits."""
    matrix = np.asarray(vectors, np.float32).reshape(len(vectors), -1)
    dim = matrix.shape[1]
    if code == SIMHASH_V2:
        planes = zero_sum_hyperplanes(dim, code_bits(dim))
    elif code == SIMHASH_V1:
        planes = hyperplanes(dim, code_bits(dim))
    else:
        raise ValueError(f"not a binary code: {code!r}")
    return [row.tobytes() for row in np.packbits(matrix @ planes > 0, axis=1)]


def hamming_to_cosine(distance: float, bits: int) -> float:
    """The cosine that a Hamming distance between sign codes implies."""
    return math.cos(math.pi * min(max(distance, 0.0), bits) / bits)


# -- full vectors as text (catalogues made before the int8 encoding) ---------------------------


def encode_vector(vector: np.ndarray) -> str:
    """float32 little-endian, base64: how catalogues made before stored vectors became int8
    (services/common/vectors.py) hold them. Still read; never written."""
    return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode("ascii")


def decode_vector(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), "<f4")


def encoded_length(dim: int) -> int:
    """Characters of encode_vector's text for a vector of `dim` values."""
    return 4 * math.ceil(4 * dim / 3)
