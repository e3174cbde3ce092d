"""Vectors on the wire and on disk: one place for every encoding the services share.

- `Vector` messages carry one vector as packed floats; `as_array` reads them without making a
  Python float per value.
- `PackedVectors` carry a matrix (candidates) as float16 or float32 bytes, passed on by the
  gateway without decoding.
- Stored vectors are int8 with one float32 scale per vector (`quantise` / `dequantise`): a
  quarter of float32, and on Corel-1k no change of mAP (docs/scale.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from loupe.v1 import common_pb2

Encoding = common_pb2.PackedVectors.Encoding
FLOAT32 = common_pb2.PackedVectors.FLOAT32
FLOAT16 = common_pb2.PackedVectors.FLOAT16
_DTYPES: dict[int, np.dtype[Any]] = {FLOAT32: np.dtype("<f4"), FLOAT16: np.dtype("<f2")}
# Field 1 of Vector (`values`), wire type 2 (length-delimited: packed floats).
_PACKED_VALUES_TAG = b"\x0a"
# Bytes before the int8 values of a stored vector: its float32 scale.
SCALE_BYTES = 4


class InvalidVectors(ValueError):
    """Packed vectors that do not match what they claim; the message says how."""


# -- one vector ------------------------------------------------------------------------------


def as_array(vector: common_pb2.Vector) -> np.ndarray:
    """The values as float32, sliced from the message's packed wire bytes.

    Reading a repeated field value by value costs ~70 ns each (0.2 s for 2000 candidates of
    1280 values); packed floats are already little-endian float32 on the wire.
    """
    count = len(vector.values)
    data = vector.SerializeToString()
    header = len(data) - 4 * count
    # Exactly tag 0x0A and the length before the floats; anything else, such as unknown
    # fields from a newer client, takes the slow path.
    if count and data[0] == 0x0A and header == 1 + max(1, ((4 * count).bit_length() + 6) // 7):
        return np.frombuffer(data, dtype="<f4", offset=header)
    return np.asarray(vector.values, dtype=np.float32)


def to_vector(values: np.ndarray) -> common_pb2.Vector:
    """A Vector message parsed from its wire form: no Python float is made."""
    data = np.ascontiguousarray(values, dtype="<f4").tobytes()
    return common_pb2.Vector.FromString(_PACKED_VALUES_TAG + _varint(len(data)) + data)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# -- matrices --------------------------------------------------------------------------------


def pack(matrix: np.ndarray, encoding: int = FLOAT16) -> common_pb2.PackedVectors:
    rows = np.asarray(matrix)
    if rows.ndim != 2:
        raise ValueError(f"pack expects a matrix, got shape {rows.shape}")
    return common_pb2.PackedVectors(
        encoding=encoding,  # type: ignore[arg-type]
        dimension=rows.shape[1],
        data=np.ascontiguousarray(rows, dtype=_DTYPES[encoding]).tobytes(),
    )


def unpack(packed: common_pb2.PackedVectors, rows: int) -> np.ndarray:
    """[rows, dimension] float32; InvalidVectors when the bytes do not hold exactly that."""
    dtype = _DTYPES.get(packed.encoding)
    if dtype is None:
        raise InvalidVectors(f"packed vectors: unknown encoding {packed.encoding}")
    expected = rows * packed.dimension * dtype.itemsize
    if packed.dimension <= 0 or len(packed.data) != expected:
        raise InvalidVectors(
            f"packed vectors: {len(packed.data)} bytes for {rows} rows of dimension "
            f"{packed.dimension} in {Encoding.Name(packed.encoding)} (expected {expected})"
        )
    matrix = np.frombuffer(packed.data, dtype=dtype).reshape(rows, packed.dimension)
    return matrix.astype(np.float32)


# -- stored vectors: int8 with a scale -------------------------------------------------------


def quantise(matrix: np.ndarray) -> list[bytes]:
    """Each row as a float32 scale then int8 values (round(x / scale), scale = max|x| / 127).

    Symmetric, so signed embeddings (CLIP, ViT) keep their sign; the error of a unit vector's
    cosine is about 1e-3, far below the gaps that order neighbours.
    """
    rows = np.asarray(matrix, dtype=np.float32)
    scales = np.abs(rows).max(axis=1) / 127.0
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
    values = np.clip(np.rint(rows / safe[:, None]), -127, 127).astype(np.int8)
    records = np.empty((len(rows), SCALE_BYTES + rows.shape[1]), dtype=np.uint8)
    records[:, :SCALE_BYTES] = safe.astype("<f4").view(np.uint8).reshape(-1, SCALE_BYTES)
    records[:, SCALE_BYTES:] = values.view(np.uint8)
    return [row.tobytes() for row in records]


def dequantise(records: Sequence[bytes], dim: int) -> np.ndarray:
    """[len(records), dim] float32 from `quantise`'s records."""
    if not records:
        return np.empty((0, dim), dtype=np.float32)
    width = SCALE_BYTES + dim
    joined = b"".join(records)
    if len(joined) != width * len(records):
        raise InvalidVectors(f"stored vectors are not {width} bytes each (dimension {dim})")
    table = np.frombuffer(joined, dtype=np.uint8).reshape(len(records), width)
    scales = table[:, :SCALE_BYTES].copy().view("<f4")
    return table[:, SCALE_BYTES:].view(np.int8).astype(np.float32) * scales


def stored_bytes(dim: int) -> int:
    return SCALE_BYTES + dim


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)
