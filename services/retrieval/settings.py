"""Retrieval settings: where Milvus is, how new catalogues are laid out, indexed and searched."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from services.common.config import ConfigError, env_float, env_int, env_str
from services.retrieval import index_params

# What the ANN index of a new catalogue holds. "binary": one sign bit per dimension of a fixed
# random projection (1/32 of the float32 vector, Hamming distance); "float": the full vector.
CANDIDATE_CODES = ("binary", "float")
INDEX_TYPES = {
    "binary": ("BIN_FLAT", "BIN_IVF_FLAT"),
    "float": ("FLAT", "IVF_FLAT", "AUTOINDEX", "HNSW", "IVF_SQ8", "IVF_PQ", "DISKANN", "SCANN"),
}
# milvus-lite's local mode refuses every other index (GUIDE.md section 4).
LITE_INDEX_TYPES = ("BIN_FLAT", "FLAT", "IVF_FLAT", "AUTOINDEX")
DEFAULT_INDEX_TYPE = {"binary": "BIN_FLAT", "float": "FLAT"}
# Indexes whose scores are exact inner products of the full vectors: their candidates need no
# re-scoring.
EXACT_INDEXES = frozenset({"FLAT"})
# Full vectors of catalogues made before layout 2 are base64 text in a VARCHAR, which Milvus
# caps at 65535 characters.
MAX_DIM = 12288
# Milvus refuses a search whose topk is above this.
MILVUS_MAX_TOPK = 16384
# URI schemes pymilvus treats as a Milvus server; anything else is a milvus-lite file.
SERVER_SCHEMES = ("http", "https", "tcp", "grpc", "unix")
CONSISTENCY_LEVELS = ("Strong", "Bounded", "Session", "Eventually")
# "all": reads, writes and whole-catalogue jobs (the embedded stack, and a chart's one
# writer); "reader": searches and lookups only, so that any number of replicas can serve them
# while one writer keeps writes and batch jobs in order (README, "Kubernetes").
ROLES = ("all", "reader")


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
    # New catalogues: what the ANN field holds and how it is indexed and searched (an
    # existing catalogue keeps its own, layout.py).
    candidate_code: str
    index_type: str
    index_params: dict[str, Any]
    search_params: dict[str, Any]
    max_limit: int
    timeout_seconds: int
    # Loading a catalogue into memory (start-up, first use) takes time that grows with its
    # size: about a minute for a million items in milvus-lite.
    load_timeout_seconds: int
    # Consistency of searches and lookups on a Milvus server. Writes check what exists with
    # Strong consistency whatever this says.
    read_consistency: str
    # Candidates the compact index proposes per candidate returned at 1 M items, re-scored
    # with the full vectors (binary codes and approximate float indexes; store.py scales it
    # with the catalogue's size).
    oversampling: int
    # Most items written to Milvus in one batch (concurrent Upserts are coalesced).
    write_batch_items: int
    role: str
    # Database-side augmentation at index time: each new whole image's stored vector is
    # averaged with its nearest neighbours', weighted by similarity ** alpha (0 = off).
    dba_neighbours: int
    dba_alpha: float
    # The batch DBA runs by itself once writes pause this long and at least `growth` x items
    # were written since it last ran (0 s = never by itself).
    dba_refresh_seconds: float
    dba_refresh_growth: float
    # Redis of the gateway's result cache: retrieval tells it when rows change (empty: no
    # cache to tell).
    redis_url: str
    redis_password: str = field(repr=False)
    redis_timeout_seconds: float
    # The watch on Milvus (watch.py): how often it looks, how long a probe may take, and how
    # long a milvus-lite process that is stopped or does not answer is given before it is
    # killed and started again (a dead one is restarted at once). 0 s: no watch.
    milvus_watch_seconds: float = 0.5
    milvus_probe_timeout_seconds: int = 5
    milvus_lite_restart_seconds: float = 10.0
    # How often a replica re-reads the catalogue records (records.py), which the writer
    # changes on a migration; a request naming a model the record does not know re-reads
    # them at once.
    catalog_refresh_seconds: float = 2.0

    @property
    def is_lite(self) -> bool:
        return is_lite_uri(self.milvus_uri)

    @property
    def writes(self) -> bool:
        return self.role == "all"

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
        dim = env_int("LOUPE_EMBEDDING_DIM", 1280, minimum=2, maximum=MAX_DIM)
        build = index_params.build_params(
            index_type, _json_object("LOUPE_MILVUS_INDEX_PARAMS"), dim
        )
        search = index_params.search_params(index_type, _json_object("LOUPE_MILVUS_SEARCH_PARAMS"))
        if search.get("nprobe", 0) > build.get("nlist", 65536):
            raise ConfigError(
                f"LOUPE_MILVUS_SEARCH_PARAMS: nprobe={search['nprobe']} exceeds the index's "
                f"nlist={build['nlist']}"
            )
        redis_url = env_str("LOUPE_REDIS_URL", "")
        if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                f"LOUPE_REDIS_URL={redis_url!r}: expected redis://, rediss:// or unix://"
            )
        return cls(
            data_dir=data_dir,
            milvus_uri=uri,
            milvus_token=os.environ.get("LOUPE_MILVUS_TOKEN", "").strip(),
            db_name=env_str("LOUPE_MILVUS_DB_NAME", ""),
            collection_prefix=_collection_prefix(),
            dim=dim,
            candidate_code=code,
            index_type=index_type,
            index_params=build,
            search_params=search,
            max_limit=env_int(
                "LOUPE_RETRIEVAL_MAX_LIMIT", 2000, minimum=1, maximum=MILVUS_MAX_TOPK
            ),
            # Bounds pymilvus's own retries too: without it a dead Milvus hangs a call for minutes.
            timeout_seconds=env_int("LOUPE_MILVUS_TIMEOUT_SECONDS", 10, minimum=1, maximum=3600),
            load_timeout_seconds=env_int(
                "LOUPE_MILVUS_LOAD_TIMEOUT_SECONDS", 1800, minimum=1, maximum=86400
            ),
            read_consistency=env_str(
                "LOUPE_MILVUS_READ_CONSISTENCY", "Bounded", choices=CONSISTENCY_LEVELS
            ),
            oversampling=env_int("LOUPE_RETRIEVAL_OVERSAMPLING", 10, minimum=1, maximum=100),
            write_batch_items=env_int(
                "LOUPE_RETRIEVAL_WRITE_BATCH_ITEMS", 256, minimum=1, maximum=4096
            ),
            role=env_str("LOUPE_RETRIEVAL_ROLE", "all", choices=ROLES),
            dba_neighbours=env_int("LOUPE_DBA_NEIGHBOURS", 5, minimum=0, maximum=100),
            dba_alpha=env_float("LOUPE_DBA_ALPHA", 3.0, minimum=0.0, maximum=100.0),
            dba_refresh_seconds=env_float(
                "LOUPE_DBA_REFRESH_SECONDS", 5.0, minimum=0.0, maximum=86400.0
            ),
            dba_refresh_growth=env_float(
                "LOUPE_DBA_REFRESH_GROWTH", 0.05, minimum=0.0, maximum=100.0
            ),
            redis_url=redis_url,
            redis_password=env_str("LOUPE_REDIS_PASSWORD", ""),
            redis_timeout_seconds=env_float(
                "LOUPE_REDIS_TIMEOUT_SECONDS", 0.25, minimum=0.001, maximum=60.0
            ),
            milvus_watch_seconds=env_float(
                "LOUPE_MILVUS_WATCH_SECONDS", 0.5, minimum=0.0, maximum=60.0
            ),
            milvus_probe_timeout_seconds=env_int(
                "LOUPE_MILVUS_PROBE_TIMEOUT_SECONDS", 5, minimum=1, maximum=600
            ),
            milvus_lite_restart_seconds=env_float(
                "LOUPE_MILVUS_LITE_RESTART_SECONDS", 10.0, minimum=0.0, maximum=3600.0
            ),
            catalog_refresh_seconds=env_float(
                "LOUPE_RETRIEVAL_CATALOG_REFRESH_SECONDS", 2.0, minimum=0.1, maximum=3600.0
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
