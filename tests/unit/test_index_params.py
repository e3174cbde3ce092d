"""Index parameters: every type gets working defaults; bad values stop start-up."""

import pytest

from services.common.config import ConfigError
from services.retrieval import index_params


@pytest.mark.parametrize("index_type", sorted(index_params.DEFAULTS))
def test_every_index_type_has_defaults_that_pass_its_own_checks(index_type: str) -> None:
    build = index_params.build_params(index_type, {}, 1280)
    search = index_params.search_params(index_type, {})
    assert set(build) <= index_params.BUILD_KEYS.get(index_type, set())
    assert set(search) <= index_params.SEARCH_KEYS.get(index_type, set())


def test_the_defaults_milvus_needs_are_there() -> None:
    # Empty parameters are what Milvus refuses: "nlist out of range", "efConstruction ...".
    assert index_params.build_params("BIN_IVF_FLAT", {}, 1280)["nlist"] == 1024
    assert index_params.build_params("HNSW", {}, 1280) == {"M": 16, "efConstruction": 200}
    pq = index_params.build_params("IVF_PQ", {}, 1280)
    assert 1280 % pq["m"] == 0 and pq["m"] <= 160


def test_configured_values_override_defaults() -> None:
    assert index_params.build_params("IVF_FLAT", {"nlist": 4096}, 64) == {"nlist": 4096}
    assert index_params.search_params("HNSW", {"ef": 512}) == {"ef": 512}


@pytest.mark.parametrize(
    ("index_type", "configured", "message"),
    [
        ("HNSW", {"nlist": 5}, "HNSW takes no 'nlist'"),
        ("HNSW", {"efConstruction": 2}, "out of range"),
        ("IVF_FLAT", {"nlist": "many"}, "must be a number"),
        ("IVF_FLAT", {"nlist": True}, "must be a number"),
        ("SCANN", {"with_raw_data": 1}, "true or false"),
        ("IVF_PQ", {"m": 7}, "m dividing the dimension 1280"),
        ("BIN_FLAT", {"nlist": 16}, "it takes: none"),
    ],
)
def test_bad_build_parameters(index_type: str, configured: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        index_params.build_params(index_type, configured, 1280)


def test_search_limits_raise_ef_and_search_list() -> None:
    assert index_params.for_limit("HNSW", {"ef": 128}, 1000) == {"ef": 1000}
    assert index_params.for_limit("HNSW", {"ef": 128}, 10) == {"ef": 128}
    assert index_params.for_limit("DISKANN", {"search_list": 100}, 400) == {"search_list": 400}
    assert index_params.for_limit("IVF_FLAT", {"nprobe": 32}, 5000) == {"nprobe": 32}
