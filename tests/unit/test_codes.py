"""Binary codes, the full-vector encoding and database-side augmentation, as numpy."""

import hashlib
import math

import numpy as np
import pytest

from services.retrieval import augmentation, codes

rng = np.random.default_rng(3)


def unit_rows(count: int, dim: int) -> np.ndarray:
    return augmentation.normalise(rng.standard_normal((count, dim))).astype(np.float32)


def test_hyperplanes_never_change() -> None:
    """Stored codes depend on these exact hyperplanes: a change would silently break every
    catalogue, so it must be a deliberate one (a new SEED, and re-indexing)."""
    digest = hashlib.sha256(codes.hyperplanes(16, 16).tobytes()).hexdigest()
    assert digest == "8ea7415578e93ac3293aba1dc4922eb03adb66bcaeacdbdcf02eee37c90552e8"
    assert set(np.unique(codes.hyperplanes(64, 64))) == {-1.0, 1.0}


def test_codes_are_packed_sign_bits() -> None:
    vectors = unit_rows(3, 20)
    packed = codes.binary_codes(vectors)
    assert codes.code_bits(20) == 24 and all(len(c) == 3 for c in packed)
    bits = np.unpackbits(np.frombuffer(packed[0], np.uint8))[:24]
    expected = (vectors[0] @ codes.hyperplanes(20, 24)) > 0
    assert (bits.astype(bool) == expected).all()


def test_hamming_distance_estimates_the_angle() -> None:
    dim = 1024
    base = unit_rows(1, dim)[0]
    for target in (0.95, 0.7, 0.3):
        # A vector at a known cosine from base.
        noise = unit_rows(1, dim)[0]
        noise -= (noise @ base) * base
        other = target * base + math.sqrt(1 - target**2) * noise / np.linalg.norm(noise)
        a, b = codes.binary_codes(np.stack([base, other]))
        distance = int(np.unpackbits(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum())
        assert codes.hamming_to_cosine(distance, dim) == pytest.approx(target, abs=0.08)
    assert codes.hamming_to_cosine(0, dim) == 1.0
    assert codes.hamming_to_cosine(dim, dim) == -1.0


def test_full_vectors_round_trip_exactly() -> None:
    vector = unit_rows(1, 1280)[0]
    text = codes.encode_vector(vector)
    assert len(text) <= codes.encoded_length(1280)
    assert np.array_equal(codes.decode_vector(text), vector)


def test_augment_all_matches_one_at_a_time() -> None:
    vectors = unit_rows(50, 16)
    batch = augmentation.augment_all(vectors, neighbours=3, alpha=3.0)
    similarities = vectors @ vectors.T
    np.fill_diagonal(similarities, -np.inf)
    for i in (0, 17, 49):
        nearest = np.argsort(-similarities[i])[:3]
        one = augmentation.augment(vectors[i], vectors[nearest], similarities[i, nearest], 3.0)
        assert np.allclose(batch[i], one, atol=1e-6)
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)


def test_augment_all_blocks_and_tiny_catalogues(monkeypatch: pytest.MonkeyPatch) -> None:
    vectors = unit_rows(10, 8)
    whole = augmentation.augment_all(vectors, 2, 1.0)
    monkeypatch.setattr(augmentation, "BLOCK", 3)
    assert np.allclose(augmentation.augment_all(vectors, 2, 1.0), whole, atol=1e-6)
    # One item has no neighbour; k beyond the catalogue is capped.
    assert np.array_equal(augmentation.augment_all(vectors[:1], 5, 3.0), vectors[:1])
    assert augmentation.augment_all(vectors[:3], 10, 3.0).shape == (3, 8)


def test_negative_similarities_do_not_push_away() -> None:
    vector = np.array([1.0, 0.0], np.float32)
    opposite = np.array([[-1.0, 0.0]], np.float32)
    result = augmentation.augment(vector, opposite, np.array([-1.0]), alpha=1.0)
    assert np.allclose(result, vector)


def test_v2_hyperplanes_sum_to_zero_and_ignore_a_shared_offset() -> None:
    planes = codes.zero_sum_hyperplanes(64, 64)
    assert np.abs(planes.sum(axis=0)).max() < 1e-4
    vectors = unit_rows(5, 64)
    shifted = vectors + 0.3  # every dimension up by the same amount (ReLU features share one)
    assert codes.binary_codes(vectors, codes.SIMHASH_V2) == codes.binary_codes(
        shifted, codes.SIMHASH_V2
    )
    assert codes.binary_codes(vectors, codes.SIMHASH_V1) != codes.binary_codes(
        shifted, codes.SIMHASH_V1
    )


def test_layouts_are_recorded_and_read_back() -> None:
    from services.retrieval.layout import SIDECAR, CatalogLayout, legacy_layout

    layout = CatalogLayout(code=codes.SIMHASH_V2, dim=1280, vectors=SIDECAR)
    assert CatalogLayout.from_description(layout.description()) == layout
    assert (layout.code_bytes, layout.stored_vector_bytes, layout.metric) == (160, 1284, "HAMMING")
    assert CatalogLayout.from_description("") is None
    assert CatalogLayout.from_description('{"other": 1}') is None
    old = legacy_layout(binary=True, dim=1280)
    assert (old.code, old.encoding, old.source_uri) == (codes.SIMHASH_V1, "float32", False)
