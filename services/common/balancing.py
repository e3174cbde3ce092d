"""gRPC's own load balancing and retries for a client channel, set by a service config: used by
the gateway for its backends (services/gateway/resilience.py) and by detection and embedding
for Triton (services/common/triton_backend.py).

`round_robin` spreads calls over every address the target resolves to (`dns:///` a headless
Service's name: every ready pod; `ipv4:a:p,b:q`: the listed ones). The retry policy retries
the named methods on UNAVAILABLE after a jittered exponential backoff, within the call's
deadline, each attempt picked anew (so on another replica), and only while the call is not
committed (no answer has begun); gRPC throttles retries while most recent attempts fail.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# Tokens of gRPC's retry throttling per channel: each failed attempt takes one, each success
# gives back 0.1, and retries stop while fewer than half are left. 100 lets every call in
# flight on a replica that dies be retried; a whole backend down stops being retried after
# about 50 failures.
RETRY_TOKENS = 100
RETRY_TOKEN_RATIO = 0.1
# gRPC keeps a request for its retries only up to this size, else it commits the call at
# once and never retries it: the default (256 KiB) is smaller than an image, a ranking call's
# vectors or a model's input tensor.
RETRY_BUFFER_BYTES = 64 << 20
# gRPC's reconnect backoff grows to two minutes by default: a server that restarts would get
# no calls for that long after it is back. Capped, a restarted replica is called again within
# seconds.
RECONNECT_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


@dataclass(frozen=True)
class RetryPolicy:
    # Attempts per call (1: no retries; gRPC takes at most 5).
    attempts: int = 3
    initial_backoff_seconds: float = 0.05
    max_backoff_seconds: float = 1.0


def _seconds(value: float) -> str:
    """A protobuf Duration in JSON, as a service config wants it."""
    return f"{value:.3f}s"


def service_config(
    lb_policy: str, retried: Iterable[tuple[str, str | None]], retry: RetryPolicy
) -> dict[str, Any]:
    """Load balancing, and retries on UNAVAILABLE of the `retried` (service, method) pairs
    (method None: every method of the service)."""
    config: dict[str, Any] = {"loadBalancingConfig": [{lb_policy: {}}]}
    names = [
        {"service": service, **({"method": method} if method else {})}
        for service, method in retried
    ]
    if retry.attempts > 1 and names:
        config["methodConfig"] = [
            {
                "name": names,
                "retryPolicy": {
                    "maxAttempts": retry.attempts,
                    "initialBackoff": _seconds(retry.initial_backoff_seconds),
                    "maxBackoff": _seconds(retry.max_backoff_seconds),
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
        config["retryThrottling"] = {"maxTokens": RETRY_TOKENS, "tokenRatio": RETRY_TOKEN_RATIO}
    return config


def channel_options(config: dict[str, Any]) -> list[tuple[str, Any]]:
    """Channel options that apply `config` (service_config's), beside message sizes and TLS."""
    return [
        ("grpc.service_config", json.dumps(config)),
        ("grpc.enable_retries", 1),
        ("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES),
        *RECONNECT_OPTIONS,
    ]
