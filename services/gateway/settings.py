"""Gateway configuration (LOUPE_* environment variables; defaults in the README)."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.channels import TLSSettings
from services.common.config import (
    ConfigError,
    env_address,
    env_bool,
    env_float,
    env_int,
    env_str,
)

AUTH_MODES = ("keys", "open")
LB_POLICIES = ("round_robin", "pick_first")
ORIGINALS_KEEP = ("request", "unsourced", "always")
# gRPC refuses a retry policy of more than 5 attempts (it would cap it silently).
MAX_RETRY_ATTEMPTS = 5


@dataclass(frozen=True)
class GatewaySettings:
    detection_address: str
    embedding_address: str
    retrieval_address: str
    # Where writes and whole-catalogue jobs go: the one retrieval replica that writes (the
    # same address when every replica may write, as in the embedded stack).
    retrieval_writer_address: str
    ranking_address: str
    # Empty disables caching.
    redis_url: str
    redis_password: str
    redis_timeout_seconds: float
    # After a Redis failure, skip Redis for this long rather than pay a timeout per request.
    redis_retry_seconds: float
    embedding_cache_ttl_seconds: int
    search_cache_ttl_seconds: int
    backend_timeout_seconds: float
    default_top_k: int
    max_top_k: int
    # Rows fetched from retrieval per query (K'): at least this many, and 2 x top_k.
    min_candidates: int
    max_candidates: int
    duplicate_threshold: float
    max_query_objects: int
    max_index_objects: int
    min_object_pixels: int
    index_concurrency: int
    max_stream_items: int
    # `keys`: every call but health and reflection needs an API key from `api_keys_file`;
    # `open`: anyone who reaches the port may do anything (only when asked for by name).
    auth: str
    api_keys_file: str
    # How often the keys file is checked for changes (rotation without a restart).
    auth_reload_seconds: float
    # LOUPE_TLS_*: how the gateway reaches the backends (its CA, and the certificate it
    # presents to them).
    tls: TLSSettings = field(default_factory=TLSSettings)
    # The client layer (services/gateway/resilience.py): attempts per idempotent backend call
    # on UNAVAILABLE (1 = no retries) and the bounds of gRPC's jittered exponential backoff.
    retry_attempts: int = 3
    retry_initial_backoff_seconds: float = 0.05
    retry_max_backoff_seconds: float = 1.0
    # round_robin spreads calls over every address a backend's name resolves to (a headless
    # Service's pods); pick_first pins one connection.
    lb_policy: str = "round_robin"
    # Consecutive failed calls that open a backend's breaker (0: no breaker), how long it
    # stays open, and the trial calls let through when it half-opens.
    breaker_failures: int = 5
    breaker_open_seconds: float = 5.0
    breaker_half_open_calls: int = 1
    # LOUPE_ORIGINALS_URI: where IndexRequest.keep_original keeps image bytes (a folder or an
    # fsspec URI such as s3://bucket/prefix, services/gateway/originals.py); empty: no store,
    # and keep_original is refused.
    originals_uri: str = ""
    # LOUPE_ORIGINALS_KEEP: which items' bytes are kept there. "request": those indexed with
    # keep_original; "unsourced": those too, and every item indexed without a source_uri (so
    # that every item can be embedded again by another model); "always": every item.
    originals_keep: str = "request"
    # Crop and object searches (docs/quality.md, "Objects: what each change adds"): the
    # query's detected label goes to ranking's same-label bonus (a crop's label: the
    # detection of its image overlapping it with IoU >= query_label_iou), and candidates are
    # re-scored with their vectors as embedded, not as DBA rewrote them (DBA averages a whole
    # image with its neighbours: fine for whole-image queries, blurring for an object's).
    query_labels: bool = True
    query_label_iou: float = 0.5
    # A crop that no detection of its image overlaps so: detect within the crop itself.
    crop_detection: bool = True
    object_search_raw_vectors: bool = True

    @classmethod
    def from_env(cls) -> GatewaySettings:
        settings = cls(
            detection_address=env_address("LOUPE_DETECTION_ADDR", "127.0.0.1:50052"),
            embedding_address=env_address("LOUPE_EMBEDDING_ADDR", "127.0.0.1:50053"),
            retrieval_address=env_address("LOUPE_RETRIEVAL_ADDR", "127.0.0.1:50054"),
            retrieval_writer_address=env_address(
                "LOUPE_RETRIEVAL_WRITER_ADDR",
                env_address("LOUPE_RETRIEVAL_ADDR", "127.0.0.1:50054"),
            ),
            ranking_address=env_address("LOUPE_RANKING_ADDR", "127.0.0.1:50055"),
            redis_url=env_str("LOUPE_REDIS_URL", "redis://127.0.0.1:6379/0"),
            redis_password=env_str("LOUPE_REDIS_PASSWORD", ""),
            redis_timeout_seconds=env_float("LOUPE_REDIS_TIMEOUT_SECONDS", 0.25, minimum=0.001),
            redis_retry_seconds=env_float("LOUPE_REDIS_RETRY_SECONDS", 5.0, minimum=0.0),
            embedding_cache_ttl_seconds=env_int(
                "LOUPE_CACHE_EMBEDDING_TTL_SECONDS", 7 * 24 * 3600, minimum=1
            ),
            search_cache_ttl_seconds=env_int("LOUPE_CACHE_SEARCH_TTL_SECONDS", 600, minimum=1),
            backend_timeout_seconds=env_float(
                "LOUPE_GATEWAY_BACKEND_TIMEOUT_SECONDS", 30.0, minimum=0.1
            ),
            default_top_k=env_int("LOUPE_GATEWAY_DEFAULT_TOP_K", 10, minimum=1),
            max_top_k=env_int("LOUPE_GATEWAY_MAX_TOP_K", 500, minimum=1, maximum=1000),
            min_candidates=env_int("LOUPE_GATEWAY_MIN_CANDIDATES", 100, minimum=1),
            max_candidates=env_int("LOUPE_GATEWAY_MAX_CANDIDATES", 2000, minimum=1),
            duplicate_threshold=env_float(
                "LOUPE_DUPLICATE_THRESHOLD", 0.95, minimum=0.0, maximum=1.0
            ),
            max_query_objects=env_int("LOUPE_GATEWAY_MAX_QUERY_OBJECTS", 8, minimum=1),
            max_index_objects=env_int("LOUPE_GATEWAY_MAX_INDEX_OBJECTS", 10, minimum=0),
            min_object_pixels=env_int("LOUPE_GATEWAY_MIN_OBJECT_PIXELS", 32, minimum=2),
            query_labels=env_bool("LOUPE_GATEWAY_QUERY_LABELS", True),
            query_label_iou=env_float(
                "LOUPE_GATEWAY_QUERY_LABEL_IOU", 0.5, minimum=0.01, maximum=1.0
            ),
            object_search_raw_vectors=env_bool("LOUPE_GATEWAY_OBJECT_SEARCH_RAW_VECTORS", True),
            crop_detection=env_bool("LOUPE_GATEWAY_CROP_DETECTION", True),
            index_concurrency=env_int(
                "LOUPE_GATEWAY_INDEX_CONCURRENCY", 16, minimum=1, maximum=256
            ),
            max_stream_items=env_int("LOUPE_GATEWAY_MAX_STREAM_ITEMS", 10_000, minimum=1),
            auth=env_str("LOUPE_AUTH", "keys", choices=AUTH_MODES),
            api_keys_file=env_str("LOUPE_API_KEYS_FILE", ""),
            auth_reload_seconds=env_float(
                "LOUPE_AUTH_RELOAD_SECONDS", 5.0, minimum=0.1, maximum=3600.0
            ),
            tls=TLSSettings.from_env(),
            retry_attempts=env_int(
                "LOUPE_GATEWAY_RETRY_ATTEMPTS", 3, minimum=1, maximum=MAX_RETRY_ATTEMPTS
            ),
            retry_initial_backoff_seconds=env_float(
                "LOUPE_GATEWAY_RETRY_INITIAL_BACKOFF_SECONDS", 0.05, minimum=0.001, maximum=60.0
            ),
            retry_max_backoff_seconds=env_float(
                "LOUPE_GATEWAY_RETRY_MAX_BACKOFF_SECONDS", 1.0, minimum=0.001, maximum=300.0
            ),
            lb_policy=env_str("LOUPE_GATEWAY_LB_POLICY", "round_robin", choices=LB_POLICIES),
            breaker_failures=env_int(
                "LOUPE_GATEWAY_BREAKER_FAILURES", 5, minimum=0, maximum=10_000
            ),
            breaker_open_seconds=env_float(
                "LOUPE_GATEWAY_BREAKER_OPEN_SECONDS", 5.0, minimum=0.01, maximum=3600.0
            ),
            breaker_half_open_calls=env_int(
                "LOUPE_GATEWAY_BREAKER_HALF_OPEN_CALLS", 1, minimum=1, maximum=1000
            ),
            originals_uri=env_str("LOUPE_ORIGINALS_URI", ""),
            originals_keep=env_str("LOUPE_ORIGINALS_KEEP", "request", choices=ORIGINALS_KEEP),
        )
        if settings.originals_keep != "request" and not settings.originals_uri:
            raise ConfigError(
                f"LOUPE_ORIGINALS_KEEP={settings.originals_keep} needs an originals store: set "
                "LOUPE_ORIGINALS_URI (a folder, or s3://bucket/prefix), or "
                "LOUPE_ORIGINALS_KEEP=request"
            )
        if settings.originals_uri:
            from services.gateway.originals import OriginalsError, OriginalsStore

            try:
                OriginalsStore(settings.originals_uri)
            except OriginalsError as error:
                raise ConfigError(f"LOUPE_ORIGINALS_URI: {error}") from None
        if settings.auth == "keys" and not settings.api_keys_file:
            raise ConfigError(
                "LOUPE_API_KEYS_FILE is not set, and the gateway takes calls with an API key "
                "only: point it at a keys file (`loupe keys create NAME --role ROLE --keys-file "
                "FILE` makes one; `loupe up` makes its own), or set LOUPE_AUTH=open to let "
                "anyone who reaches the port search, index and drop catalogues"
            )
        if settings.retry_initial_backoff_seconds > settings.retry_max_backoff_seconds:
            raise ConfigError(
                "LOUPE_GATEWAY_RETRY_INITIAL_BACKOFF_SECONDS="
                f"{settings.retry_initial_backoff_seconds} exceeds "
                f"LOUPE_GATEWAY_RETRY_MAX_BACKOFF_SECONDS={settings.retry_max_backoff_seconds}"
            )
        if settings.default_top_k > settings.max_top_k:
            raise ConfigError(
                f"LOUPE_GATEWAY_DEFAULT_TOP_K={settings.default_top_k} exceeds "
                f"LOUPE_GATEWAY_MAX_TOP_K={settings.max_top_k}"
            )
        if settings.redis_url and not settings.redis_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ConfigError(
                f"LOUPE_REDIS_URL={settings.redis_url!r}: expected redis://, rediss:// or unix://"
            )
        return settings
