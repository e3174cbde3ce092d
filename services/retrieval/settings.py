"""Retrieval settings: where Milvus is and how the collection is indexed and searched."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from services.common.config import ConfigError, env_int, env_str

INDEX_TYPES = ("FLAT", "IVF_FLAT", "AUTOINDEX", "HNSW", "IVF_SQ8", "IVF_PQ", "DISKANN", "SCANN")
# milvus-lite's local mode refuses every other float-vector index (GUIDE.md section 4).
LITE_INDEX_TYPES = ("FLAT", "IVF_FLAT", "AUTOINDEX")
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
    collection: str
    dim: int
    index_type: str
    index_params: dict[str, Any]
    search_params: dict[str, Any]
    max_limit: int
    timeout_seconds: int

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
        index_type = env_str("LOUPE_MILVUS_INDEX_TYPE", "FLAT", choices=INDEX_TYPES)
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
            collection=env_str("LOUPE_MILVUS_COLLECTION", "loupe_items"),
            dim=env_int("LOUPE_EMBEDDING_DIM", 1280, minimum=2, maximum=32768),
            index_type=index_type,
            index_params=_json_object("LOUPE_MILVUS_INDEX_PARAMS"),
            search_params=_json_object("LOUPE_MILVUS_SEARCH_PARAMS"),
            max_limit=env_int(
                "LOUPE_RETRIEVAL_MAX_LIMIT", 2000, minimum=1, maximum=MILVUS_MAX_TOPK
            ),
            # Bounds pymilvus's own retries too: without it a dead Milvus hangs a call for minutes.
            timeout_seconds=env_int("LOUPE_MILVUS_TIMEOUT_SECONDS", 10, minimum=1, maximum=3600),
        )


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
