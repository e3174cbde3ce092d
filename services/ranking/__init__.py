"""Ranking: re-score candidates with full-precision vectors and metadata signals."""
