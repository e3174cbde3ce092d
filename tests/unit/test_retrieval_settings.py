import os

import pytest

from services.common.config import ConfigError
from services.ranking.settings import RankingSettings
from services.retrieval.settings import RetrievalSettings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in os.environ:
        if name.startswith("LOUPE_"):
            monkeypatch.delenv(name)


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOUPE_DATA_DIR", "/tmp/loupe-data")
    monkeypatch.setenv("LOUPE_MILVUS_TOKEN", "root:secret")
    settings = RetrievalSettings.from_env()
    assert settings.milvus_uri == "/tmp/loupe-data/milvus.db" and settings.is_lite
    assert (settings.collection_prefix, settings.dim) == ("loupe", 1280)
    assert (settings.candidate_code, settings.index_type) == ("binary", "BIN_FLAT")
    assert (settings.dba_neighbours, settings.dba_alpha) == (5, 3.0)
    assert settings.index_params == settings.search_params == {}
    assert settings.max_limit == 2000
    assert settings.milvus_token == "root:secret"
    assert "secret" not in repr(settings)


def test_server_uri_allows_server_index_types(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOUPE_MILVUS_URI", "http://milvus:19530")
    monkeypatch.setenv("LOUPE_RETRIEVAL_CANDIDATE_CODE", "float")
    monkeypatch.setenv("LOUPE_MILVUS_INDEX_TYPE", "HNSW")
    monkeypatch.setenv("LOUPE_MILVUS_INDEX_PARAMS", '{"M": 16, "efConstruction": 200}')
    monkeypatch.setenv("LOUPE_MILVUS_SEARCH_PARAMS", '{"ef": 64}')
    settings = RetrievalSettings.from_env()
    assert not settings.is_lite
    assert settings.index_params == {"M": 16, "efConstruction": 200}
    assert settings.search_params == {"ef": 64}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"LOUPE_RETRIEVAL_CANDIDATE_CODE": "float", "LOUPE_MILVUS_INDEX_TYPE": "HNSW"},
            "milvus-lite .* only supports BIN_FLAT, FLAT, IVF_FLAT",
        ),
        ({"LOUPE_MILVUS_INDEX_TYPE": "BIN_IVF_FLAT"}, "milvus-lite .* only supports"),
        ({"LOUPE_MILVUS_INDEX_TYPE": "HNSW"}, "expected one of BIN_FLAT, BIN_IVF_FLAT"),
        ({"LOUPE_RETRIEVAL_CANDIDATE_CODE": "pq"}, "expected one of binary, float"),
        ({"LOUPE_MILVUS_COLLECTION_PREFIX": "9x-y"}, "LOUPE_MILVUS_COLLECTION_PREFIX"),
        ({"LOUPE_DBA_NEIGHBOURS": "-1"}, "LOUPE_DBA_NEIGHBOURS"),
        ({"LOUPE_MILVUS_INDEX_PARAMS": "{nlist: 1}"}, "LOUPE_MILVUS_INDEX_PARAMS.*not valid JSON"),
        ({"LOUPE_MILVUS_SEARCH_PARAMS": "[16]"}, "LOUPE_MILVUS_SEARCH_PARAMS.*a JSON object"),
        ({"LOUPE_MILVUS_URI": "/data/milvus"}, "ending in .db"),
        ({"LOUPE_RETRIEVAL_MAX_LIMIT": "20000"}, "at most 16384"),
    ],
)
def test_invalid_settings(monkeypatch: pytest.MonkeyPatch, env: dict, message: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        RetrievalSettings.from_env()


def test_ranking_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = RankingSettings.from_env()
    assert (settings.popularity_field, settings.category_field) == ("popularity", "category")
    assert (settings.popularity_weight, settings.category_weight) == (0.05, 0.05)
    assert settings.popularity_scale == 1000.0
    monkeypatch.setenv("LOUPE_RANKING_POPULARITY_SCALE", "0")
    with pytest.raises(ConfigError, match="positive"):
        RankingSettings.from_env()
