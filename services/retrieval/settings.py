"""Retrieval settings: where Milvus is and how the collection is indexed and searched."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from services.common.config import ConfigError, env_float, env_int, env_str

# What the ANN index holds. "binary": one sign bit per dimension of a fixed random projection
# (1/32 of the float32 vector, Hamming distance); "float": the full vector.
CANDIDATE_CODES = ("binary", "float")
INDEX_TYPES = {
    "binary": ("BIN_FLAT", "BIN_IVF_FLAT"),
    "float": ("FLAT", "IVF_FLAT", "AUTOINDEX", "HNSW", "IVF_SQ8", "IVF_PQ", "DISKANN", "SCANN"),
}
# milvus-lite's local mode refuses every other index (GUIDE.md section 4).
LITE_INDEX_TYPES = ("BIN_FLAT", "FLAT", "IVF_FLAT", "AUTOINDEX")
DEFAULT_INDEX_TYPE = {"binary": "BIN_FLAT", "float": "FLAT"}
# Full vectors are stored base64-encoded in a VARCHAR, whose length Milvus caps at 65535.
MAX_DIM = 12288
# Milvus refuses a search whose topk is above this.
MILVUS_MAX_TOPK = 16384
# URI schemes pymilvus treats as a Milvus server; anything else is a milvus-lite file.
SERVER_SCHEMES = ("http", "https", "tcp", "grpc", "unix")


@dataclass(frozen=True)
class RetrievalSettings:
    data_dir: Path
    milvus_uri: str
    # A secret: kept out of repr so that logging the settings cannot leak it.
    milvus_token: str = field(repr=False)
    db_name: str
    # Catalogue NAME lives in the collection PREFIX__NAME.
    collection_prefix: str
    dim: int
    candidate_code: str
    index_type: str
    index_params: dict[str, Any]
    search_params: dict[str, Any]
    max_limit: int
    timeout_seconds: int
    # Database-side augmentation at index time: each new whole image's stored vector is
    # averaged with its nearest neighbours', weighted by similarity ** alpha (0 = off).
    dba_neighbours: int
    dba_alpha: float
    # The batch DBA runs by itself once writes pause this long and at least `growth` x items
    # were written since it last ran (0 s = never); it runs, by itself or when asked, only on
    # catalogues of at most `batch_max_items` (an exact n^2 neighbour search in memory).
    dba_refresh_seconds: float
    dba_refresh_growth: float
    dba_batch_max_items: int

    @property
    def is_lite(self) -> bool:
        return is_lite_uri(self.milvus_uri)

    @classmethod
    def from_env(cls) -> RetrievalSettings:
        data_dir = Path(env_str("LOUPE_DATA_DIR", "./.loupe"))
        uri = env_str("LOUPE_MILVUS_URI", str(data_dir / "milvus.db"))
        if is_lite_uri(uri) and not uri.endswith(".db"):
            raise ConfigError(
                f"LOUPE_MILVUS_URI={uri!r}: expected http(s)://HOST:PORT for a Milvus server, "
                "or a milvus-lite file path ending in .db"
            )
        code = env_str("LOUPE_RETRIEVAL_CANDIDATE_CODE", "binary", choices=CANDIDATE_CODES)
        index_type = env_str(
            "LOUPE_MILVUS_INDEX_TYPE", DEFAULT_INDEX_TYPE[code], choices=INDEX_TYPES[code]
        )
        if is_lite_uri(uri) and index_type not in LITE_INDEX_TYPES:
            raise ConfigError(
                f"LOUPE_MILVUS_INDEX_TYPE={index_type!r}: milvus-lite (LOUPE_MILVUS_URI is a "
                f"local file) only supports {', '.join(LITE_INDEX_TYPES)}; use a Milvus server "
                "for the others"
            )
        return cls(
            data_dir=data_dir,
            milvus_uri=uri,
            milvus_token=os.environ.get("LOUPE_MILVUS_TOKEN", "").strip(),
            db_name=env_str("LOUPE_MILVUS_DB_NAME", ""),
            collection_prefix=_collection_prefix(),
            dim=env_int("LOUPE_EMBEDDING_DIM", 1280, minimum=2, maximum=MAX_DIM),
            candidate_code=code,
            index_type=index_type,
            index_params=_json_object("LOUPE_MILVUS_INDEX_PARAMS"),
            search_params=_json_object("LOUPE_MILVUS_SEARCH_PARAMS"),
            max_limit=env_int(
                "LOUPE_RETRIEVAL_MAX_LIMIT", 2000, minimum=1, maximum=MILVUS_MAX_TOPK
            ),
            # Bounds pymilvus's own retries too: without it a dead Milvus hangs a call for minutes.
            timeout_seconds=env_int("LOUPE_MILVUS_TIMEOUT_SECONDS", 10, minimum=1, maximum=3600),
            dba_neighbours=env_int("LOUPE_DBA_NEIGHBOURS", 5, minimum=0, maximum=100),
            dba_alpha=env_float("LOUPE_DBA_ALPHA", 3.0, minimum=0.0, maximum=100.0),
            dba_refresh_seconds=env_float(
                "LOUPE_DBA_REFRESH_SECONDS", 5.0, minimum=0.0, maximum=86400.0
            ),
            dba_refresh_growth=env_float(
                "LOUPE_DBA_REFRESH_GROWTH", 0.05, minimum=0.0, maximum=100.0
            ),
            dba_batch_max_items=env_int(
                "LOUPE_DBA_BATCH_MAX_ITEMS", 20000, minimum=0, maximum=10_000_000
            ),
        )


def _collection_prefix() -> str:
    prefix = env_str("LOUPE_MILVUS_COLLECTION_PREFIX", "loupe")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,120}", prefix):
        raise ConfigError(
            f"LOUPE_MILVUS_COLLECTION_PREFIX={prefix!r}: expected letters, digits and "
            "underscores, not starting with a digit"
        )
    return prefix


def is_lite_uri(uri: str) -> bool:
    return urlparse(uri).scheme.lower() not in SERVER_SCHEMES


def _json_object(name: str) -> dict[str, Any]:
    raw = env_str(name, "{}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{name}={raw!r}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ConfigError(f'{name}={raw!r}: expected a JSON object such as {{"nprobe": 16}}')
    return value
