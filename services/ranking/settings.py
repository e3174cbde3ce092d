"""Ranking settings: which metadata fields boost a candidate, and by how much."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import ConfigError, env_float, env_int, env_str


@dataclass(frozen=True)
class RankingSettings:
    popularity_field: str
    popularity_weight: float
    # The popularity at which the signal saturates (reaches the full weight).
    popularity_scale: float
    category_field: str
    category_weight: float
    # alpha-QE: the query is expanded with its best `qe_neighbours` items (0 = off).
    qe_neighbours: int
    qe_alpha: float
    # Added to a candidate whose item holds an object with the query's detected label (crop
    # and object searches; 0 = off). docs/quality.md, "Objects: what each change adds".
    label_weight: float = 0.2

    @classmethod
    def from_env(cls) -> RankingSettings:
        scale = env_float("LOUPE_RANKING_POPULARITY_SCALE", 1000.0)
        # log1p(scale) is the divisor, and infinity would silence the signal.
        if not 0 < scale < float("inf"):
            raise ConfigError(
                f"LOUPE_RANKING_POPULARITY_SCALE={scale}: must be a positive finite number"
            )
        return cls(
            popularity_field=env_str("LOUPE_RANKING_POPULARITY_FIELD", "popularity"),
            popularity_weight=_weight("LOUPE_RANKING_POPULARITY_WEIGHT", 0.05),
            popularity_scale=scale,
            category_field=env_str("LOUPE_RANKING_CATEGORY_FIELD", "category"),
            category_weight=_weight("LOUPE_RANKING_CATEGORY_WEIGHT", 0.05),
            qe_neighbours=env_int("LOUPE_RANKING_QE_NEIGHBOURS", 5, minimum=0, maximum=100),
            qe_alpha=env_float("LOUPE_RANKING_QE_ALPHA", 3.0, minimum=0.0, maximum=100.0),
            label_weight=_weight("LOUPE_RANKING_LABEL_WEIGHT", cls.label_weight),
        )


def _weight(name: str, default: float) -> float:
    return env_float(name, default, minimum=0.0, maximum=1e6)
