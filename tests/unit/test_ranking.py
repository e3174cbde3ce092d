import math

import numpy as np
import pytest

from loupe.v1 import common_pb2 as c
from loupe.v1 import ranking_pb2, retrieval_pb2
from services.common.vectors import as_array
from services.ranking import scoring
from services.ranking.service import InvalidRequest, RankingService
from services.ranking.settings import RankingSettings

QUERY = [1.0, 0.0, 0.0]


def ranker(
    popularity: float = 0.0, category: float = 0.0, scale: float = 1000.0, qe: int = 0
) -> RankingService:
    return RankingService(
        RankingSettings("popularity", popularity, scale, "category", category, qe, 3.0)
    )


def candidate(
    item_id: str,
    vector: list[float] | None,
    object_index: int = 0,
    ann_score: float = 0.0,
    **metadata: c.Value,
) -> retrieval_pb2.Candidate:
    result = retrieval_pb2.Candidate(
        item_id=item_id, object_index=object_index, ann_score=ann_score, metadata=metadata
    )
    if vector is not None:
        result.vector.values.extend(vector)
    if object_index > 0:
        result.label = f"label{object_index}"
        result.box.CopyFrom(c.Box(x0=object_index, y0=0, x1=object_index + 10, y1=10))
    return result


def rank(
    service: RankingService,
    candidates: list[retrieval_pb2.Candidate],
    top_k: int = 10,
    query: list[float] = QUERY,
    **query_metadata: c.Value,
) -> list[c.Hit]:
    return service.rank(
        ranking_pb2.RankRequest(
            query=c.Vector(values=query),
            candidates=candidates,
            top_k=top_k,
            query_metadata=query_metadata,
        )
    )


def test_orders_by_cosine_similarity_of_full_vectors() -> None:
    hits = rank(
        ranker(),
        [
            # ann_score disagrees on purpose: full-precision vectors decide.
            candidate("far", [0.0, 1.0, 0.0], ann_score=0.99),
            candidate("near", [2.0, 0.1, 0.0], ann_score=0.1),
            candidate("middle", [1.0, 1.0, 0.0], ann_score=0.5),
        ],
    )
    assert [h.item_id for h in hits] == ["near", "middle", "far"]
    assert hits[1].score == pytest.approx(1 / math.sqrt(2))
    assert hits[1].parts.similarity == pytest.approx(1 / math.sqrt(2))


def test_ann_score_is_used_when_a_candidate_has_no_vector() -> None:
    hits = rank(ranker(), [candidate("a", [0.0, 1.0, 0.0]), candidate("b", None, ann_score=0.4)])
    assert [(h.item_id, round(h.score, 6)) for h in hits] == [("b", 0.4), ("a", 0.0)]


def test_one_hit_per_item_and_its_best_object_carries_its_box() -> None:
    hits = rank(
        ranker(),
        [
            candidate("bag", [0.5, 0.5, 0.0], object_index=0),
            candidate("bag", [1.0, 0.0, 0.0], object_index=2),
            candidate("bag", [0.0, 1.0, 0.0], object_index=1),
            candidate("shoe", [0.9, 0.1, 0.0], object_index=0),
        ],
    )
    assert [(h.item_id, h.object_index) for h in hits] == [("bag", 2), ("shoe", 0)]
    assert hits[0].label == "label2"
    assert (hits[0].box.x0, hits[0].box.x1) == (2.0, 12.0)
    assert not hits[1].HasField("box") and hits[1].label == ""


def test_popularity_part_saturates_at_scale() -> None:
    service = ranker(popularity=0.1, scale=1000)
    hits = rank(
        service,
        [
            candidate("none", QUERY),
            candidate("some", QUERY, popularity=c.Value(number_value=9)),
            candidate("huge", QUERY, popularity=c.Value(number_value=1e9)),
            candidate("negative", QUERY, popularity=c.Value(number_value=-5)),
            candidate("text", QUERY, popularity=c.Value(string_value="1000")),
        ],
    )
    parts = {h.item_id: h.parts.popularity for h in hits}
    assert parts["huge"] == pytest.approx(0.1)
    assert parts["some"] == pytest.approx(0.1 * math.log(10) / math.log(1001))
    assert parts["none"] == parts["negative"] == parts["text"] == 0.0
    assert [h.item_id for h in hits][:2] == ["huge", "some"]
    assert hits[0].score == pytest.approx(1.1)


def test_category_part_needs_equal_values_on_both_sides() -> None:
    service = ranker(category=0.2)
    shoes = c.Value(string_value="shoes")
    candidates = [
        candidate("a", [0.9, 0.1, 0.0], category=c.Value(string_value="bags")),
        candidate("b", [0.8, 0.2, 0.0], category=shoes),
        candidate("c", [0.7, 0.3, 0.0]),
    ]
    hits = rank(service, candidates, category=shoes)
    assert [h.item_id for h in hits] == ["b", "a", "c"]
    assert [h.parts.category for h in hits] == pytest.approx([0.2, 0.0, 0.0])
    assert hits[0].metadata["category"] == shoes
    # Without query metadata nobody gets the boost.
    assert [h.item_id for h in rank(service, candidates)] == ["a", "b", "c"]


def test_zero_weights_leave_similarity_alone() -> None:
    hits = rank(
        ranker(),
        [
            candidate("a", [0.9, 0.1, 0.0], popularity=c.Value(number_value=1e6)),
            candidate("b", QUERY, category=c.Value(string_value="x")),
        ],
        category=c.Value(string_value="x"),
    )
    assert [h.item_id for h in hits] == ["b", "a"]
    assert all(h.parts.popularity == h.parts.category == 0.0 for h in hits)


def test_ties_are_broken_by_item_id_whatever_the_input_order() -> None:
    candidates = [candidate(i, [0.5, 0.5, 0.0]) for i in ("c", "a", "b")]
    assert [h.item_id for h in rank(ranker(), candidates)] == ["a", "b", "c"]
    assert [h.item_id for h in rank(ranker(), candidates[::-1])] == ["a", "b", "c"]


def test_top_k_counts_items() -> None:
    candidates = [candidate(f"i{k}", [1.0, k / 10, 0.0]) for k in range(5)]
    candidates += [candidate("i0", [1.0, 0.0, 0.0], object_index=1)]
    hits = rank(ranker(), candidates, top_k=2)
    assert [(h.item_id, h.object_index) for h in hits] == [("i0", 0), ("i1", 0)]


def test_no_candidates_no_hits() -> None:
    assert rank(ranker(), []) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_k": 0}, "top_k=0"),
        ({"top_k": 1001}, "top_k=1001"),
        ({"query": []}, "query vector"),
        ({"query": [0.0, 0.0, 0.0]}, "query vector"),
        ({"query": [float("nan"), 0.0, 0.0]}, "query vector"),
    ],
)
def test_invalid_requests(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        rank(ranker(), [candidate("a", QUERY)], **kwargs)


def test_dimension_mismatch() -> None:
    with pytest.raises(InvalidRequest, match="4-d vector; the query is 3-d"):
        rank(ranker(), [candidate("a", QUERY), candidate("b", [1.0, 0.0, 0.0, 0.0])])


def test_cosine_is_float64_and_zero_for_zero_vectors() -> None:
    sims = scoring.cosine(np.array([3.0, 4.0]), np.array([[3.0, 4.0], [0.0, 0.0], [-4.0, 3.0]]))
    assert sims.dtype == np.float64
    assert sims.tolist() == pytest.approx([1.0, 0.0, 0.0])


@pytest.mark.parametrize("size", [1, 2, 31, 32, 33, 1280, 5000])
def test_as_array_matches_the_values(size: int) -> None:
    values = np.random.default_rng(size).standard_normal(size).astype(np.float32)
    vector = c.Vector(values=values.tolist())
    assert as_array(vector).tolist() == values.tolist()


def test_as_array_with_unknown_fields_takes_the_slow_path() -> None:
    data = c.Vector(values=[1.5, -2.0]).SerializeToString() + bytes([0x78, 0x01])  # field 15 = 1
    vector = c.Vector.FromString(data)
    assert as_array(vector).tolist() == [1.5, -2.0]
    assert as_array(c.Vector()).tolist() == []


def test_query_expansion_reorders_by_the_best_neighbours() -> None:
    # C resembles the best hit A more than the query does; D resembles only the query.
    candidates = [
        candidate("a", [0.8, 0.6, 0.0]),
        candidate("c", [0.5, 0.866, 0.0]),
        candidate("d", [0.55, 0.0, 0.835]),
    ]
    request = ranking_pb2.RankRequest(query=c.Vector(values=QUERY), candidates=candidates, top_k=3)
    plain = ranker().rank(request)
    assert [h.item_id for h in plain] == ["a", "d", "c"]
    assert all(h.parts.expanded_similarity == 0.0 for h in plain)
    service = ranker(qe=1)
    # alpha 0: the neighbour counts fully, q' = normalise(q + a).
    service.settings = RankingSettings("popularity", 0.0, 1000.0, "category", 0.0, 1, 0.0)
    expanded = service.rank(request)
    assert [h.item_id for h in expanded] == ["a", "c", "d"]
    by_id = {h.item_id: h for h in expanded}
    assert by_id["c"].parts.similarity == pytest.approx(0.5, abs=1e-3)
    assert by_id["c"].parts.expanded_similarity == pytest.approx(0.748, abs=1e-3)
    assert by_id["c"].score == pytest.approx(by_id["c"].parts.expanded_similarity)


def test_query_expansion_counts_an_item_once() -> None:
    """An item's objects are not several neighbours: only its best row expands the query."""
    vectors = np.array([[0.8, 0.6, 0.0], [0.79, 0.61, 0.0]])
    expanded = scoring.expand_query(
        np.array(QUERY), vectors, np.array([0.8, 0.79]), ["a", "a"], [0, 1], 2, 0.0
    )
    once = scoring.expand_query(np.array(QUERY), vectors[:1], np.array([0.8]), ["a"], [0], 2, 0.0)
    assert np.allclose(expanded, once)


def labelled(
    service: RankingService, candidates: list[retrieval_pb2.Candidate], query_label: str
) -> list[c.Hit]:
    return service.rank(
        ranking_pb2.RankRequest(
            query=c.Vector(values=QUERY), candidates=candidates, top_k=10, query_label=query_label
        )
    )


def test_same_label_bonus_lifts_items_holding_the_querys_label() -> None:
    service = ranker()
    service.settings = RankingSettings("popularity", 0.0, 1000.0, "category", 0.0, 0, 3.0, 0.2)
    # "lamp" holds a lamp among its objects but wins with its whole image; "room" is closer.
    lamp = candidate("lamp", [0.8, 0.6, 0.0])
    lamp.item_labels.extend(["chair", "lamp"])
    by_row = candidate("by-row", [0.75, 0.66, 0.0], object_index=1)
    by_row.label = "lamp"
    room = candidate("room", [0.9, 0.43, 0.0])
    room.item_labels.append("sofa")
    hits = labelled(service, [room, lamp, by_row], "lamp")
    assert [h.item_id for h in hits] == ["lamp", "by-row", "room"]
    parts = {h.item_id: h.parts for h in hits}
    assert parts["lamp"].label == pytest.approx(0.2)
    assert parts["by-row"].label == pytest.approx(0.2)
    assert parts["room"].label == 0.0
    for hit in hits:
        assert hit.score == pytest.approx(hit.parts.similarity + hit.parts.label, abs=1e-6)
    # No query label, or a zero weight: similarity alone.
    assert [h.item_id for h in labelled(service, [room, lamp, by_row], "")][0] == "room"
    service.settings = RankingSettings("popularity", 0.0, 1000.0, "category", 0.0, 0, 3.0, 0.0)
    hits = labelled(service, [room, lamp, by_row], "lamp")
    assert [h.item_id for h in hits][0] == "room"
    assert all(h.parts.label == 0.0 for h in hits)


def test_label_weight_is_read_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.common.config import ConfigError

    monkeypatch.setenv("LOUPE_RANKING_LABEL_WEIGHT", "0.5")
    assert RankingSettings.from_env().label_weight == 0.5
    monkeypatch.delenv("LOUPE_RANKING_LABEL_WEIGHT")
    assert RankingSettings.from_env().label_weight == RankingSettings.label_weight
    monkeypatch.setenv("LOUPE_RANKING_LABEL_WEIGHT", "-1")
    with pytest.raises(ConfigError, match="LOUPE_RANKING_LABEL_WEIGHT"):
        RankingSettings.from_env()
