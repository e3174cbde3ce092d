"""Vector encodings the services share: packed matrices on the wire, int8 on disk."""

import numpy as np
import pytest

from loupe.v1 import common_pb2
from services.common import vectors

rng = np.random.default_rng(11)


def unit_rows(count: int, dim: int) -> np.ndarray:
    rows = rng.standard_normal((count, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("encoding", [vectors.FLOAT32, vectors.FLOAT16])
def test_packed_matrices_round_trip(encoding: int) -> None:
    matrix = unit_rows(7, 1280)
    packed = vectors.pack(matrix, encoding)
    assert len(packed.data) == 7 * 1280 * (4 if encoding == vectors.FLOAT32 else 2)
    back = vectors.unpack(common_pb2.PackedVectors.FromString(packed.SerializeToString()), 7)
    tolerance = 0 if encoding == vectors.FLOAT32 else 1e-3
    assert np.allclose(back, matrix, atol=tolerance, rtol=0)


def test_unpack_refuses_bytes_that_do_not_fit() -> None:
    packed = vectors.pack(unit_rows(3, 8), vectors.FLOAT16)
    with pytest.raises(vectors.InvalidVectors, match="for 4 rows of dimension 8"):
        vectors.unpack(packed, 4)
    packed.encoding = 0  # type: ignore[assignment]
    with pytest.raises(vectors.InvalidVectors, match="unknown encoding"):
        vectors.unpack(packed, 3)


def test_int8_records_keep_cosines_within_two_thousandths() -> None:
    matrix = unit_rows(200, 1280)
    records = vectors.quantise(matrix)
    assert {len(r) for r in records} == {vectors.stored_bytes(1280)} == {1284}
    back = vectors.unit_rows(vectors.dequantise(records, 1280))
    cosines = matrix @ matrix.T
    errors = np.abs(back @ matrix.T - cosines)
    assert errors.max() < 2e-3 and np.median(errors) < 3e-4
    # Non-negative features (a ReLU network's) and a zero vector survive too.
    relu = np.maximum(matrix, 0)
    assert np.allclose(vectors.dequantise(vectors.quantise(relu), 1280), relu, atol=2e-3)
    assert not vectors.dequantise(vectors.quantise(np.zeros((1, 4))), 4).any()


def test_quantising_twice_changes_nothing() -> None:
    """The DBA job writes back vectors it read: a dequantised record quantises to itself."""
    records = vectors.quantise(unit_rows(20, 64))
    assert vectors.quantise(vectors.dequantise(records, 64)) == records


def test_vector_messages_are_made_and_read_without_python_floats() -> None:
    values = unit_rows(1, 1280)[0]
    message = vectors.to_vector(values)
    assert list(message.values) == pytest.approx(values.tolist())
    assert np.array_equal(vectors.as_array(message), values)
    # A message with another field beside the values takes the slow path, same answer.
    assert np.array_equal(vectors.as_array(common_pb2.Vector(values=values.tolist())), values)
