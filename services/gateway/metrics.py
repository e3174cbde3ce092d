"""Gateway metrics beyond the per-RPC ones every service exports."""

from prometheus_client import Counter, Histogram

STAGE_SECONDS = Histogram(
    "loupe_gateway_stage_duration_seconds",
    "Time spent in each stage of a gateway request.",
    ["stage"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CACHE_HITS = Counter("loupe_gateway_cache_hits_total", "Cache lookups that hit.", ["cache"])
CACHE_MISSES = Counter("loupe_gateway_cache_misses_total", "Cache lookups that missed.", ["cache"])
CACHE_ERRORS = Counter(
    "loupe_gateway_cache_errors_total",
    "Redis operations that failed or were skipped after a failure; requests went on uncached.",
    ["operation"],
)
ITEMS_INDEXED = Counter("loupe_gateway_items_indexed_total", "Items written to the index.")
INDEX_FAILURES = Counter(
    "loupe_gateway_index_failures_total", "Items that could not be indexed, by status.", ["code"]
)
DUPLICATES = Counter(
    "loupe_gateway_duplicates_total", "Duplicates found at index time, by kind.", ["kind"]
)
