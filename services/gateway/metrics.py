"""Gateway metrics beyond the per-RPC ones every service exports."""

from prometheus_client import Counter, Gauge, Histogram

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
AUTH_REQUESTS = Counter(
    "loupe_gateway_auth_requests_total",
    "Calls checked for an API key, by key name ('-' when there is none or it is unknown) and "
    "outcome: ok, no_key, unknown_key, permission_denied, rate_limited.",
    ["key", "outcome"],
)
API_KEYS = Gauge("loupe_gateway_api_keys", "API keys in force, from the keys file.")
API_KEY_RELOADS = Counter(
    "loupe_gateway_api_key_reloads_total",
    "Reads of a changed keys file, by outcome (error: the previous keys stay in force).",
    ["outcome"],
)
BREAKER_STATE = Gauge(
    "loupe_gateway_backend_breaker_state",
    "Each backend's circuit breaker: 0 closed (calls go through), 1 half-open (trial calls "
    "only), 2 open (calls fail at once with UNAVAILABLE).",
    ["backend"],
)
BREAKER_TRANSITIONS = Counter(
    "loupe_gateway_backend_breaker_transitions_total",
    "Changes of a backend's circuit breaker, by the state it moved to.",
    ["backend", "state"],
)
BREAKER_REJECTIONS = Counter(
    "loupe_gateway_backend_breaker_rejections_total",
    "Backend calls failed at once because the backend's circuit breaker was open or "
    "half-open with its trial calls in flight.",
    ["backend"],
)
BACKEND_FAILURES = Counter(
    "loupe_gateway_backend_failures_total",
    "Backend calls the backend did not answer once gRPC's retries were spent: UNAVAILABLE, or "
    "DEADLINE_EXCEEDED at the gateway's own backend timeout. They count towards the breaker.",
    ["backend", "code"],
)
DEGRADED_RESPONSES = Counter(
    "loupe_gateway_degraded_responses_total",
    "Searches answered without a failing backend (SearchResponse.degraded), by what was left "
    "out: detection (no objects searched) or ranking (retrieval's order).",
    ["reason"],
)
