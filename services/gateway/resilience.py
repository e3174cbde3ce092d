"""The gateway's client layer under faults: which backend calls are retried, how calls are
spread over a backend's replicas, and a circuit breaker per backend.

Retries and load balancing are gRPC's own, set by a service config on every backend channel
(services/common/balancing.py):

- `round_robin` over every address a backend's target resolves to (`dns:///` a headless
  Service's name returns every ready pod; `ipv4:a:p,b:q` lists them), so a new replica gets
  its share instead of one pinned HTTP/2 connection taking everything. The servers close
  connections after LOUPE_GRPC_MAX_CONNECTION_AGE_SECONDS, so clients reconnect and resolve
  again and pick up replicas added since.
- A retry policy on UNAVAILABLE for the idempotent methods only (IDEMPOTENT_METHODS), with
  gRPC's jittered exponential backoff, within the call's deadline (which is the caller's
  deadline when it is shorter than the backend timeout), and each attempt picked anew, so
  it lands on another replica. gRPC also throttles retries when most recent calls fail.

gRPC, not a loop of our own: it retries below the application, only while the call is not
committed (no answer has begun), and the retried attempt is told apart on the server by its
`grpc-previous-rpc-attempts` header, which is how retries are counted
(loupe_grpc_retried_requests_total on the backend): grpcio shows a client nothing of its
attempts.

RESOURCE_EXHAUSTED is never retried: no Loupe backend sends it to mean "try again soon" (it
means a message over the size limit, or a key over its rate at the gateway), and gRPC's
retry policy would retry every RESOURCE_EXHAUSTED, not only those a server pushes back with a
delay for.

The breaker is ours (gRPC has none): `Backends.call` asks it before each call and tells it
how the call ended.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from services.common import balancing
from services.gateway.metrics import BREAKER_REJECTIONS, BREAKER_STATE, BREAKER_TRANSITIONS
from services.gateway.settings import GatewaySettings

# Methods that may run twice for one call without changing what the caller sees: reads, and
# model inference (an image's vectors and boxes are a function of the image and the model).
#
# Not retried, each for its own reason, although most would leave the same rows behind:
# - Upsert / UpsertItems: writing an item twice stores the same rows (writes.py replaces the
#   item's rows by primary key and leaves the item itself out of its own duplicates and
#   neighbours), but the answer changes (`replaced` and `same_content` become true, so the
#   gateway would report a new item as unchanged), and a retry that arrives after another
#   caller's later write of the same id would silently put the older item back: retrieval
#   orders writes of an id as they arrive, and a late retry arrives last.
# - UpdateItem: the same lost-update race on metadata.
# - Delete: a second delete answers rows_deleted=0 (the gateway would say deleted=false for
#   an item it did delete), and it would delete the item again after a re-index in between.
# - DropCatalog: dropped=false on the second try, and it would drop a catalogue re-created
#   in between.
# - Augment: a whole-catalogue batch job; run again, it costs as much again.
# A caller who sees UNAVAILABLE for one of these may retry it knowing the risk: Index of the
# same item is safe to repeat for one writer of an id.
IDEMPOTENT_METHODS: dict[str, tuple[str, ...]] = {
    "loupe.v1.DetectionService": ("Detect", "Describe"),
    "loupe.v1.EmbeddingService": ("Embed", "Describe"),
    "loupe.v1.RankingService": ("Rank", "Describe"),
    "loupe.v1.RetrievalService": ("Search", "Lookup", "Stats", "ListCatalogs"),
}


def service_config(settings: GatewaySettings) -> dict[str, Any]:
    """The service config of every backend channel: load balancing and retries."""
    return balancing.service_config(
        settings.lb_policy,
        [
            (service, method)
            for service, methods in IDEMPOTENT_METHODS.items()
            for method in methods
        ],
        balancing.RetryPolicy(
            settings.retry_attempts,
            settings.retry_initial_backoff_seconds,
            settings.retry_max_backoff_seconds,
        ),
    )


def channel_options(settings: GatewaySettings) -> list[tuple[str, Any]]:
    """gRPC channel options of a backend channel, beside message sizes and TLS."""
    return balancing.channel_options(service_config(settings))


CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
STATE_VALUES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class BreakerOpen(Exception):
    """The backend's breaker refused the call; the message says why and for how long."""


class CircuitBreaker:
    """Closed: calls go through, and `failures` failed calls in a row open it. Open: calls
    fail at once for `open_seconds`. Half-open (after that): `half_open_calls` trial calls go
    through, the rest fail at once; a trial that succeeds closes it, one that fails opens it
    again for another `open_seconds`.

    A failure is a call the backend did not answer: UNAVAILABLE once gRPC's retries are spent,
    or no answer within the gateway's own backend timeout. Any answer (an error about the
    request included) is a success: the backend is there. With `failures` 0 it never opens.
    Single-threaded: the gateway's event loop is its only caller.
    """

    def __init__(
        self,
        backend: str,
        failures: int,
        open_seconds: float,
        half_open_calls: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.failures = failures
        self.open_seconds = open_seconds
        self.half_open_calls = half_open_calls
        self._clock = clock
        self.state = CLOSED
        self._failed_in_a_row = 0
        self._opened_at = 0.0
        self._trials = 0
        self.last_failure = ""
        self._state_gauge = BREAKER_STATE.labels(backend)
        self._state_gauge.set(STATE_VALUES[CLOSED])

    def admit(self) -> bool:
        """Let a call through, or raise BreakerOpen. True when the call is a half-open trial
        (its outcome decides the state)."""
        if self.state == OPEN:
            left = self._opened_at + self.open_seconds - self._clock()
            if left > 0:
                BREAKER_REJECTIONS.labels(self.backend).inc()
                raise BreakerOpen(
                    f"circuit breaker open after {self._failed_in_a_row} failed calls in a "
                    f"row (last: {self.last_failure}); calls fail at once for {left:.1f} s "
                    "more"
                )
            self._move(HALF_OPEN)
            self._trials = 0
        if self.state == HALF_OPEN:
            if self._trials >= self.half_open_calls:
                BREAKER_REJECTIONS.labels(self.backend).inc()
                raise BreakerOpen(
                    f"circuit breaker half-open: {self._trials} trial call(s) in flight after "
                    f"failures (last: {self.last_failure})"
                )
            self._trials += 1
            return True
        return False

    def succeeded(self, trial: bool) -> None:
        if trial:
            self._trials -= 1
            if self.state == HALF_OPEN:
                self._move(CLOSED)
        if self.state == CLOSED:
            self._failed_in_a_row = 0

    def failed(self, trial: bool, reason: str) -> None:
        self.last_failure = reason
        if trial:
            self._trials -= 1
            if self.state == HALF_OPEN:
                self._failed_in_a_row += 1
                self._open()
            return
        if self.state != CLOSED:
            return  # admitted before it opened: already counted in what opened it
        self._failed_in_a_row += 1
        if self.failures and self._failed_in_a_row >= self.failures:
            self._open()

    def released(self, trial: bool) -> None:
        """The call ended saying nothing about the backend (the caller cancelled it)."""
        if trial:
            self._trials -= 1

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._move(OPEN)

    def _move(self, state: str) -> None:
        if state != self.state:
            BREAKER_TRANSITIONS.labels(self.backend, state).inc()
            self.state = state
            self._state_gauge.set(STATE_VALUES[state])
