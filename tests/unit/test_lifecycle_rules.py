"""Pure rules of the model lifecycle: catalogue names, served-model lists, record routing."""

from __future__ import annotations

import pytest

from services.common.catalogs import InvalidCatalog, resolve_catalog
from services.common.config import ConfigError
from services.embedding.settings import parse_models
from services.retrieval.records import Binding, Record, catalog_of, generation_key


def test_catalogue_names_may_not_hold_a_double_underscore() -> None:
    assert resolve_catalog("shoes_2024") == "shoes_2024"
    for name in ("shoes__g1", "a__", "x___y"):
        with pytest.raises(InvalidCatalog, match="no two underscores"):
            resolve_catalog(name)
    assert catalog_of(generation_key("shoes_2024", 3)) == "shoes_2024"
    assert catalog_of("shoes_2024") == "shoes_2024"


def test_extra_models_are_names_with_optional_versions() -> None:
    assert parse_models("") == ()
    assert parse_models("embedder_gem3, embedder_int8:2") == (
        ("embedder_gem3", ""),
        ("embedder_int8", "2"),
    )
    for bad in ("embedder:v2", "a/b", "x:1:2"):
        with pytest.raises(ConfigError, match="NAME or NAME:VERSION"):
            parse_models(bad)


def test_a_record_routes_by_model_and_survives_json() -> None:
    live = Binding("embedder/1", 1280, "RGB", "detector/1", "shop")
    nxt = Binding("embedder_gem3/1", 1280, "RGB", "", "shop__g1")
    record = Record("shop", live, next=nxt, generation=1)
    assert record.for_model("") is live and record.for_model("embedder/1") is live
    assert record.for_model("embedder_gem3/1") is nxt
    assert record.for_model("other/1") is None
    assert "re-indexing to embedder_gem3/1" in record.describe()
    assert Record.from_json(record.to_json()) == record
    unbound = Record("new", Binding("", 1280, key="new"))
    assert unbound.for_model("anything/1") is unbound.live
