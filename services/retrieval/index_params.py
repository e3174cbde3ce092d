"""Build and search parameters for every index type: working defaults, checked at start-up.

Milvus refuses most index types with empty parameters (BIN_IVF_FLAT: "nlist out of range",
HNSW: "efConstruction out of range"), and answers a bad search parameter only when a search
runs. So every type gets defaults here, a configured value overrides its default, and an
unknown key or a value out of range stops the service at start-up with a ConfigError naming
the variable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.common.config import ConfigError


@dataclass(frozen=True)
class Knob:
    minimum: float
    maximum: float
    # A boolean knob (True/False) rather than a number.
    boolean: bool = False


# Each index type: (build defaults, search defaults). Defaults follow Milvus's documented
# recommendations for 1 M - 10 M rows (nlist ~ 4 sqrt(n), nprobe a few % of nlist).
DEFAULTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "BIN_FLAT": ({}, {}),
    "BIN_IVF_FLAT": ({"nlist": 1024}, {"nprobe": 32}),
    "FLAT": ({}, {}),
    "AUTOINDEX": ({}, {}),
    "IVF_FLAT": ({"nlist": 1024}, {"nprobe": 32}),
    "IVF_SQ8": ({"nlist": 1024}, {"nprobe": 32}),
    "IVF_PQ": ({"nlist": 1024, "nbits": 8}, {"nprobe": 32}),
    "HNSW": ({"M": 16, "efConstruction": 200}, {"ef": 128}),
    "DISKANN": ({}, {"search_list": 100}),
    "SCANN": ({"nlist": 1024, "with_raw_data": True}, {"nprobe": 32, "reorder_k": 200}),
}
KNOBS: dict[str, Knob] = {
    "nlist": Knob(1, 65536),
    "nprobe": Knob(1, 65536),
    "m": Knob(1, 65536),
    "nbits": Knob(1, 16),
    "M": Knob(2, 2048),
    "efConstruction": Knob(8, 4096),
    "ef": Knob(1, 32768),
    "search_list": Knob(1, 65535),
    "with_raw_data": Knob(0, 1, boolean=True),
    "reorder_k": Knob(1, 65536),
}
BUILD_KEYS = {
    "BIN_IVF_FLAT": {"nlist"},
    "IVF_FLAT": {"nlist"},
    "IVF_SQ8": {"nlist"},
    "IVF_PQ": {"nlist", "m", "nbits"},
    "HNSW": {"M", "efConstruction"},
    "SCANN": {"nlist", "with_raw_data"},
}
SEARCH_KEYS = {
    "BIN_IVF_FLAT": {"nprobe"},
    "IVF_FLAT": {"nprobe"},
    "IVF_SQ8": {"nprobe"},
    "IVF_PQ": {"nprobe"},
    "HNSW": {"ef"},
    "DISKANN": {"search_list"},
    "SCANN": {"nprobe", "reorder_k"},
}
# The search parameter that must be at least the number of results asked for.
AT_LEAST_LIMIT = {"HNSW": "ef", "DISKANN": "search_list"}


def build_params(index_type: str, configured: dict[str, Any], dim: int) -> dict[str, Any]:
    """The index's build parameters: defaults, then LOUPE_MILVUS_INDEX_PARAMS over them."""
    params = dict(DEFAULTS[index_type][0])
    if index_type == "IVF_PQ":
        params["m"] = _pq_subquantisers(dim)
    params.update(configured)
    _check("LOUPE_MILVUS_INDEX_PARAMS", index_type, params, BUILD_KEYS.get(index_type, set()))
    if index_type == "IVF_PQ" and dim % int(params["m"]):
        raise ConfigError(
            f"LOUPE_MILVUS_INDEX_PARAMS: IVF_PQ needs m dividing the dimension {dim} "
            f"(got m={params['m']})"
        )
    return params


def search_params(index_type: str, configured: dict[str, Any]) -> dict[str, Any]:
    """The search parameters: defaults, then LOUPE_MILVUS_SEARCH_PARAMS over them."""
    params = {**DEFAULTS[index_type][1], **configured}
    _check("LOUPE_MILVUS_SEARCH_PARAMS", index_type, params, SEARCH_KEYS.get(index_type, set()))
    return params


def for_limit(index_type: str, params: dict[str, Any], limit: int) -> dict[str, Any]:
    """`params` for a search of `limit` results: HNSW's ef and DiskANN's search_list must be
    at least the limit, or Milvus refuses the search."""
    key = AT_LEAST_LIMIT.get(index_type)
    if key is None or int(params.get(key, 0)) >= limit:
        return params
    return {**params, key: limit}


def _pq_subquantisers(dim: int) -> int:
    """The largest m <= dim / 8 dividing dim: about 8 dimensions a sub-quantiser."""
    for m in range(max(1, dim // 8), 0, -1):
        if dim % m == 0:
            return m
    return 1


def _check(variable: str, index_type: str, params: dict[str, Any], allowed: set[str]) -> None:
    for key, value in params.items():
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise ConfigError(f"{variable}: {index_type} takes no {key!r} (it takes: {known})")
        knob = KNOBS[key]
        if knob.boolean:
            if not isinstance(value, bool):
                raise ConfigError(f"{variable}: {key} must be true or false (got {value!r})")
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{variable}: {key} must be a number (got {value!r})")
        if not knob.minimum <= value <= knob.maximum:
            raise ConfigError(
                f"{variable}: {key}={value} is out of range for {index_type} "
                f"({knob.minimum:g} to {knob.maximum:g})"
            )
