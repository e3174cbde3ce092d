"""RankingService through real gRPC."""

from __future__ import annotations

import grpc
import pytest

from loupe.v1 import common_pb2 as c
from loupe.v1 import ranking_pb2, ranking_pb2_grpc, retrieval_pb2
from services.ranking.service import RankingService
from services.ranking.settings import RankingSettings
from tests.support import serving


@pytest.fixture(scope="module")
def stub():
    settings = RankingSettings("popularity", 0.05, 1000.0, "category", 0.05, 0, 3.0)
    with serving(RankingService(settings)) as channel:
        yield ranking_pb2_grpc.RankingServiceStub(channel)


def test_rank_round_trip(stub) -> None:
    shoes = c.Value(string_value="shoes")
    request = ranking_pb2.RankRequest(
        query=c.Vector(values=[1.0, 0.0]),
        top_k=5,
        query_metadata={"category": shoes},
        candidates=[
            retrieval_pb2.Candidate(item_id="a", vector=c.Vector(values=[0.0, 1.0])),
            retrieval_pb2.Candidate(
                item_id="b",
                object_index=1,
                label="shoe",
                box=c.Box(x0=1, y0=2, x1=3, y1=4),
                vector=c.Vector(values=[1.0, 0.0]),
                metadata={"category": shoes, "popularity": c.Value(number_value=1000)},
            ),
            retrieval_pb2.Candidate(item_id="b", vector=c.Vector(values=[1.0, 1.0])),
        ],
    )
    hits = stub.Rank(request).hits
    assert [(h.item_id, h.object_index) for h in hits] == [("b", 1), ("a", 0)]
    best = hits[0]
    assert best.score == pytest.approx(1.1)
    assert (best.parts.similarity, best.parts.popularity, best.parts.category) == pytest.approx(
        (1.0, 0.05, 0.05)
    )
    assert (best.label, best.box.x1) == ("shoe", 3.0)
    assert best.metadata["category"] == shoes


def test_rank_rejects_mismatched_dimensions(stub) -> None:
    request = ranking_pb2.RankRequest(
        query=c.Vector(values=[1.0, 0.0]),
        top_k=5,
        candidates=[retrieval_pb2.Candidate(item_id="a", vector=c.Vector(values=[1.0, 0.0, 0.0]))],
    )
    with pytest.raises(grpc.RpcError) as error:
        stub.Rank(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "3-d vector; the query is 2-d" in error.value.details()


def test_packed_vectors_rank_like_per_candidate_ones(stub) -> None:
    """Candidate vectors as one packed float16 matrix (what the gateway forwards from
    retrieval) give the order per-candidate vectors give."""
    import numpy as np

    from services.common import vectors

    rng = np.random.default_rng(2)
    matrix = vectors.unit_rows(rng.standard_normal((30, 16))).astype(np.float32)
    query = c.Vector(values=matrix[0].tolist())
    ids = [f"item-{k}" for k in range(30)]
    packed = ranking_pb2.RankRequest(
        query=query,
        top_k=10,
        candidates=[retrieval_pb2.Candidate(item_id=i) for i in ids],
        vectors=vectors.pack(matrix, vectors.FLOAT16),
    )
    each = ranking_pb2.RankRequest(
        query=query,
        top_k=10,
        candidates=[
            retrieval_pb2.Candidate(item_id=i, vector=c.Vector(values=row.tolist()))
            for i, row in zip(ids, matrix, strict=True)
        ],
    )
    assert [h.item_id for h in stub.Rank(packed).hits] == [h.item_id for h in stub.Rank(each).hits]
    packed.vectors.data = packed.vectors.data[:-2]
    with pytest.raises(grpc.RpcError) as error:
        stub.Rank(packed)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "for 30 rows of dimension 16" in error.value.details()


def test_describe_names_the_fields_ranking_reads(stub) -> None:
    info = stub.Describe(c.DescribeRequest())
    assert list(info.metadata_fields) == ["popularity", "category"]
