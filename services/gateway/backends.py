"""The gateway's view of the four backend services: stubs, deadlines, error mapping, and the
client layer under faults (retries, load balancing, a breaker per backend: resilience.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loupe.v1 import (
    common_pb2,
    detection_pb2_grpc,
    embedding_pb2_grpc,
    ranking_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
)
from services.common.channels import open_channel
from services.gateway.metrics import BACKEND_FAILURES
from services.gateway.resilience import BreakerOpen, CircuitBreaker, channel_options
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)
T = TypeVar("T")

# The caller's fault: passed through with the backend's own message.
LONG_CALL_SECONDS = 3600.0
CALLER_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}
REMEMBER_SECONDS = 30.0
# How long a catalogue's record (its model bindings) is reused. A switch also bumps the
# catalogue's cache generation (read again at once with Redis), and retrieval refuses a model
# it no longer binds with FAILED_PRECONDITION (read again at once, and the call retried), so
# this bounds how long a write may miss a re-index collection begun meanwhile; the re-index
# itself skips items changed since it listed them (if_live_content_hash) and verifies them.
RECORD_SECONDS = 2.0


class RequestError(Exception):
    """Ends a request (or one item of a stream) with this status and message. `backend` names
    the backend that failed (did not answer, or its breaker is open), when that is the cause:
    a search can then go on without it (degraded)."""

    def __init__(self, code: grpc.StatusCode, message: str, *, backend: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.backend = backend


class Backends:
    def __init__(self, settings: GatewaySettings) -> None:
        options = [
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20),
            *channel_options(settings),
        ]
        self.addresses = {
            "detection": settings.detection_address,
            "embedding": settings.embedding_address,
            "retrieval": settings.retrieval_address,
            "retrieval writer": settings.retrieval_writer_address,
            "ranking": settings.ranking_address,
        }
        # One channel per address: the writer is often the same process as the readers.
        by_address = {
            address: open_channel(address, settings.tls, options=options)
            for address in dict.fromkeys(self.addresses.values())
        }
        self._channels = {name: by_address[address] for name, address in self.addresses.items()}
        self.detection = detection_pb2_grpc.DetectionServiceStub(self._channels["detection"])
        self.embedding = embedding_pb2_grpc.EmbeddingServiceStub(self._channels["embedding"])
        self.retrieval = retrieval_pb2_grpc.RetrievalServiceStub(self._channels["retrieval"])
        self.retrieval_writer = retrieval_pb2_grpc.RetrievalServiceStub(
            self._channels["retrieval writer"]
        )
        self.ranking = ranking_pb2_grpc.RankingServiceStub(self._channels["ranking"])
        self._timeout = settings.backend_timeout_seconds
        self._remembered_answers: dict[str, tuple[float, Any]] = {}
        # Catalogue -> (when read, cache generation then, its record or None: no catalogue).
        self._records: dict[str, tuple[float, int | None, retrieval_pb2.CatalogRecord | None]] = {}
        self.breakers = {
            name: CircuitBreaker(
                name,
                settings.breaker_failures,
                settings.breaker_open_seconds,
                settings.breaker_half_open_calls,
            )
            for name in self.addresses
        }

    async def call(
        self,
        service: str,
        method: Callable[..., Awaitable[T]],
        request: Any,
        context: grpc.aio.ServicerContext | None,
        *,
        long: bool = False,
    ) -> T:
        """Call a backend within the caller's deadline; map failures to RequestError.

        `long` calls (batch jobs) are bounded by the caller's deadline alone, or by
        LONG_CALL_SECONDS without one, not by the per-call backend timeout.
        """
        timeout = LONG_CALL_SECONDS if long else self._timeout
        callers_deadline = False
        remaining = context.time_remaining() if context is not None else None
        if remaining is not None and remaining < timeout:
            timeout, callers_deadline = max(remaining, 0.001), True
        breaker = self.breakers[service]
        try:
            trial = breaker.admit()
        except BreakerOpen as error:
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE,
                f"{service} service at {self.addresses[service]}: {error}",
                backend=service,
            ) from None
        try:
            answer = await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            code = error.code()
            # The caller's own deadline passing, or the caller going away, says nothing about
            # the backend; the backend timeout passing does: it did not answer in time.
            if code == grpc.StatusCode.CANCELLED or (
                code == grpc.StatusCode.DEADLINE_EXCEEDED and callers_deadline
            ):
                breaker.released(trial)
                raise RequestError(code, error.details() or code.name) from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                BACKEND_FAILURES.labels(service, code.name).inc()
                breaker.failed(trial, f"{code.name}: {error.details()}")
                raise RequestError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"{service} service at {self.addresses[service]} failed: "
                    f"{code.name}: {error.details()}",
                    backend=service,
                ) from None
            breaker.succeeded(trial)  # it answered: the fault is the request's, or a bug
            if code in CALLER_CODES:
                raise RequestError(code, error.details() or code.name) from None
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE,
                f"{service} service at {self.addresses[service]} failed: "
                f"{code.name}: {error.details()}",
            ) from None
        except BaseException:
            breaker.released(trial)  # cancelled (the caller went away) or a bug of ours
            raise
        breaker.succeeded(trial)
        return answer

    async def model_info(self, service: str, context: grpc.aio.ServicerContext | None) -> str:
        """'name/version' of the model behind detection or embedding (embedding: its default
        model). A rolled-out model changes cache keys within REMEMBER_SECONDS."""
        info = await self.describe(service, context)
        return f"{info.model_name}/{info.model_version}"

    async def describe(
        self, service: str, context: grpc.aio.ServicerContext | None, *, fresh: bool = False
    ) -> common_pb2.ModelInfo:
        stub = self.detection if service == "detection" else self.embedding
        return await self._remembered(
            service,
            lambda: self.call(service, stub.Describe, common_pb2.DescribeRequest(), context),
            fresh=fresh,
        )

    async def served_embedders(
        self, context: grpc.aio.ServicerContext | None, *, fresh: bool = False
    ) -> dict[str, common_pb2.ModelInfo]:
        """Every embedder the embedding service serves, 'name/version' -> its info, the
        default first (an older service that lists none serves its default only)."""
        info = await self.describe("embedding", context, fresh=fresh)
        served = list(info.served) or [info]
        return {f"{m.model_name}/{m.model_version}": m for m in served}

    async def catalog_record(
        self,
        catalog: str,
        generation: int | None,
        context: grpc.aio.ServicerContext | None,
        *,
        fresh: bool = False,
    ) -> retrieval_pb2.CatalogRecord | None:
        """The catalogue's model record from retrieval (None: no such catalogue yet), reused
        for RECORD_SECONDS while the catalogue's cache generation stays the same (a switch
        bumps it)."""
        now = time.monotonic()
        known = self._records.get(catalog)
        if (
            not fresh
            and known is not None
            and now - known[0] < RECORD_SECONDS
            and (generation is None or known[1] is None or generation == known[1])
        ):
            return known[2]
        try:
            record: retrieval_pb2.CatalogRecord | None = await self.call(
                "retrieval",
                self.retrieval.MigrateCatalog,
                retrieval_pb2.MigrateCatalogRequest(
                    catalog=catalog, action=retrieval_pb2.MigrateCatalogRequest.STATUS
                ),
                context,
            )
        except RequestError as error:
            # NOT_FOUND: no such catalogue yet; UNIMPLEMENTED: a retrieval from before
            # records (it binds nothing, so the default embedder is right).
            if error.code != grpc.StatusCode.NOT_FOUND and "UNIMPLEMENTED" not in error.message:
                raise
            record = None
        self._records[catalog] = (now, generation, record)
        return record

    def forget_record(self, catalog: str) -> None:
        self._records.pop(catalog, None)

    async def ranking_fields(self, context: grpc.aio.ServicerContext | None) -> set[str] | None:
        """The metadata fields ranking reads from candidates (None: a ranking that does not
        say, so it gets them all)."""

        async def fetch() -> set[str] | None:
            try:
                info = await self.call(
                    "ranking", self.ranking.Describe, common_pb2.DescribeRequest(), context
                )
            except RequestError as error:
                if "UNIMPLEMENTED" in error.message:
                    return None
                raise
            return set(info.metadata_fields)

        return await self._remembered("ranking", fetch)

    async def _remembered(
        self, key: str, fetch: Callable[[], Awaitable[T]], *, fresh: bool = False
    ) -> T:
        """fetch()'s answer, reused for REMEMBER_SECONDS (`fresh`: asked again now). When a
        refresh fails the last answer stands (searches by item id need no model, so they go
        on while embedding is down); the next refresh is tried REMEMBER_SECONDS later, not
        on every request."""
        now = time.monotonic()
        remembered = self._remembered_answers.get(key)
        if remembered and now - remembered[0] < REMEMBER_SECONDS and not fresh:
            return remembered[1]
        try:
            answer = await fetch()
        except RequestError:
            if remembered is None:
                raise
            log.warning("cannot refresh; using the last answer", extra={"from": key})
            answer = remembered[1]
        self._remembered_answers[key] = (now, answer)
        return answer

    async def wait_until_serving(self) -> None:
        """Block until every backend's health check says SERVING, logging who is missing."""
        # Not the retrieval writer: while it restarts (one writer, replaced not rolled),
        # searches can be served, and a write gets UNAVAILABLE naming it.
        pending = {name: c for name, c in self._channels.items() if name != "retrieval writer"}
        last_report = 0.0
        while pending:
            for name, channel in list(pending.items()):
                try:
                    reply = await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=2
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        del pending[name]
                except grpc.aio.AioRpcError:
                    pass
            if pending:
                if time.monotonic() - last_report > 10:
                    log.info("waiting for backends", extra={"pending": sorted(pending)})
                    last_report = time.monotonic()
                await asyncio.sleep(0.5)

    async def close(self) -> None:
        for channel in dict.fromkeys(self._channels.values()):
            await channel.close()
