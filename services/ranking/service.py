"""RankingService: the final order of candidates, one hit per item."""

from __future__ import annotations

from collections.abc import Mapping

import grpc
import numpy as np

from loupe.v1 import common_pb2, ranking_pb2, ranking_pb2_grpc
from services.common import vectors
from services.ranking import scoring
from services.ranking.settings import RankingSettings

MAX_TOP_K = 1000


class InvalidRequest(ValueError):
    """The caller's request is malformed; the message says what to fix."""


class RankingService(ranking_pb2_grpc.RankingServiceServicer):
    name = "ranking"
    grpc_services = [ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name]

    def __init__(self, settings: RankingSettings) -> None:
        self.settings = settings

    def register(self, server: grpc.aio.Server) -> None:
        ranking_pb2_grpc.add_RankingServiceServicer_to_server(self, server)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return []

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def Rank(
        self, request: ranking_pb2.RankRequest, context: grpc.aio.ServicerContext
    ) -> ranking_pb2.RankResponse:
        try:
            hits = self.rank(request)
        except (InvalidRequest, vectors.InvalidVectors) as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return ranking_pb2.RankResponse(hits=hits)

    async def Describe(
        self, request: common_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> ranking_pb2.RankingInfo:
        return ranking_pb2.RankingInfo(
            metadata_fields=[self.settings.popularity_field, self.settings.category_field]
        )

    @staticmethod
    def _vectors(request: ranking_pb2.RankRequest, dim: int) -> tuple[np.ndarray | None, list[int]]:
        """The candidates' vectors [with vector, dim] and which candidates they belong to:
        the packed matrix (every candidate), or, from callers before it, each candidate's own
        vector where it has one."""
        candidates = request.candidates
        if request.HasField("vectors"):
            matrix = vectors.unpack(request.vectors, len(candidates))
            if matrix.shape[1] != dim:
                raise InvalidRequest(
                    f"candidate vectors are {matrix.shape[1]}-d; the query is {dim}-d"
                )
            return matrix, list(range(len(candidates)))
        with_vector = [i for i, c in enumerate(candidates) if c.vector.values]
        for i in with_vector:
            if len(candidates[i].vector.values) != dim:
                raise InvalidRequest(
                    f"candidate {i} ({candidates[i].item_id!r}) has a "
                    f"{len(candidates[i].vector.values)}-d vector; the query is {dim}-d"
                )
        if not with_vector:
            return None, []
        return np.stack([vectors.as_array(candidates[i].vector) for i in with_vector]), with_vector

    def rank(self, request: ranking_pb2.RankRequest) -> list[common_pb2.Hit]:
        """Score every candidate, keep each item's best row, and return the top_k."""
        s = self.settings
        if not 0 < request.top_k <= MAX_TOP_K:
            raise InvalidRequest(f"top_k={request.top_k}: expected 1 to {MAX_TOP_K}")
        query = vectors.as_array(request.query).astype(np.float64)
        if query.size == 0 or not np.isfinite(query).all() or not query.any():
            raise InvalidRequest("query vector must be non-empty, finite and not all zeros")
        candidates = request.candidates
        if not candidates:
            return []

        similarity = np.array([c.ann_score for c in candidates], dtype=np.float64)
        matrix, with_vector = self._vectors(request, query.size)
        unit_query = (query / np.linalg.norm(query)).astype(np.float32)
        if matrix is not None:
            if not np.isfinite(matrix).all():
                raise InvalidRequest("candidate vectors must be finite")
            # Normalised once, in float32: every cosine below is then one product (a
            # hundred 1280-d rows: float64 copies of them cost more than the arithmetic).
            matrix = vectors.unit_rows(matrix.astype(np.float32))
            similarity[with_vector] = matrix @ unit_query
        if not np.isfinite(similarity).all():
            raise InvalidRequest("candidate ann_score values must be finite")
        # Query expansion needs every candidate's vector: without them (an index whose
        # scores are already exact was asked for none) the plain similarity ranks.
        expanded = None
        if s.qe_neighbours > 0 and matrix is not None and len(with_vector) == len(candidates):
            expanded_query = scoring.expand_query(
                query,
                matrix,
                similarity,
                [c.item_id for c in candidates],
                [c.object_index for c in candidates],
                s.qe_neighbours,
                s.qe_alpha,
            )
            expanded = (matrix @ expanded_query.astype(np.float32)).astype(np.float64)

        popularity = scoring.popularity(
            np.array([_number(c.metadata, s.popularity_field) for c in candidates]),
            s.popularity_weight,
            s.popularity_scale,
        )
        query_category = request.query_metadata.get(s.category_field)
        category = np.array(
            [
                s.category_weight
                if query_category is not None and c.metadata.get(s.category_field) == query_category
                else 0.0
                for c in candidates
            ]
        )
        label = scoring.same_label(
            request.query_label,
            [c.label for c in candidates],
            [c.item_labels for c in candidates],
            s.label_weight,
        )
        score = (similarity if expanded is None else expanded) + popularity + category + label

        chosen = scoring.best_per_item(
            score,
            [c.item_id for c in candidates],
            [c.object_index for c in candidates],
            request.top_k,
        )
        hits = []
        for i in chosen:
            c = candidates[i]
            hit = common_pb2.Hit(
                item_id=c.item_id,
                score=score[i],
                object_index=c.object_index,
                parts=common_pb2.ScoreParts(
                    similarity=similarity[i],
                    popularity=popularity[i],
                    category=category[i],
                    label=label[i],
                    expanded_similarity=0.0 if expanded is None else expanded[i],
                ),
            )
            if c.object_index > 0:
                hit.label = c.label
                if c.HasField("box"):
                    hit.box.CopyFrom(c.box)
            for key, value in c.metadata.items():
                hit.metadata[key].CopyFrom(value)
            hits.append(hit)
        return hits


def _number(metadata: Mapping[str, common_pb2.Value], field: str) -> float:
    """The field's numeric value, NaN when missing or not a number."""
    value = metadata.get(field)
    if value is not None and value.WhichOneof("kind") == "number_value":
        return float(value.number_value)
    return float("nan")


def build() -> RankingService:
    return RankingService(RankingSettings.from_env())
