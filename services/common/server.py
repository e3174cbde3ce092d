"""The process around every Loupe service: gRPC server, health, reflection, metrics, shutdown.

A service is a small object that registers its servicer, loads what it needs (a model, a
collection) in `start`, and releases it in `close`. Health says SERVING only after `start`
returns, and NOT_SERVING as soon as shutdown begins, so load balancers drain it first.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from services.common import cpu, logs
from services.common.channels import TLSSettings
from services.common.config import ConfigError, ServerSettings

log = logging.getLogger(__name__)

REQUESTS = Counter(
    "loupe_grpc_requests_total",
    "gRPC requests handled, by method and status code.",
    ["service", "method", "code"],
)
LATENCY = Histogram(
    "loupe_grpc_request_duration_seconds",
    "Time to handle a gRPC request, by method.",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
IN_FLIGHT = Gauge(
    "loupe_grpc_requests_in_flight", "gRPC requests being handled now.", ["service", "method"]
)
UP = Gauge("loupe_service_serving", "1 while the service reports SERVING.", ["service"])
RETRIED = Counter(
    "loupe_grpc_retried_requests_total",
    "Calls that arrived as a client's retry of an earlier attempt that failed (gRPC's "
    "grpc-previous-rpc-attempts header): the gateway's retries, counted where they landed.",
    ["service", "method"],
)
RETRY_HEADER = "grpc-previous-rpc-attempts"


class Service(Protocol):
    name: str
    # Fully qualified gRPC service names, for health and reflection.
    grpc_services: list[str]

    def register(self, server: grpc.aio.Server) -> None: ...
    # Interceptors of the service's own (the gateway's authentication), run after metrics.
    def interceptors(self) -> list[grpc.aio.ServerInterceptor]: ...
    async def start(self) -> None: ...
    async def close(self) -> None: ...


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every call, and turns an unexpected exception into INTERNAL.

    The INTERNAL message carries no traceback (that goes to the log): callers see that the
    fault is ours, not theirs.
    """

    def __init__(self, service: str) -> None:
        self.service = service
        # gRPC asks for every call: wrapped handlers and labelled metrics are made once per
        # method (a Python gRPC server handles a few thousand calls a second per core, and
        # building them per call cost a third of that).
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._counters: dict[tuple[str, grpc.StatusCode], Any] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        # grpcio tells a client nothing of its retries; the retried attempt says so here.
        if any(key == RETRY_HEADER for key, _ in details.invocation_metadata or ()):
            RETRIED.labels(self.service, details.method.rsplit("/", 1)[-1]).inc()
        known = self._handlers.get(details.method)
        if known is not None:
            return known
        handler = await continuation(details)
        method = details.method.rsplit("/", 1)[-1]
        if handler is None or details.method.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        if handler.unary_unary:
            handler = grpc.unary_unary_rpc_method_handler(
                self._wrap(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        elif handler.stream_unary:
            handler = grpc.stream_unary_rpc_method_handler(
                self._wrap(method, handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        else:
            return handler
        self._handlers[details.method] = handler
        return handler

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        counter = self._counters.get((method, code))
        if counter is None:
            counter = self._counters[(method, code)] = REQUESTS.labels(
                self.service, method, code.name
            )
        counter.inc()

    def _wrap(self, method: str, behaviour: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        service = self.service
        in_flight = IN_FLIGHT.labels(service, method)
        latency = LATENCY.labels(service, method)

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            in_flight.inc()
            code = grpc.StatusCode.OK
            try:
                response = await behaviour(request, context)
                code = _code_of(context) or grpc.StatusCode.OK
                return response
            except grpc.aio.AbortError:
                code = _code_of(context) or grpc.StatusCode.UNKNOWN
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                log.exception("unhandled error", extra={"method": method})
                await context.abort(
                    grpc.StatusCode.INTERNAL, f"{service}: internal error in {method}"
                )
            finally:
                in_flight.dec()
                self._count(method, code)
                latency.observe(time.perf_counter() - started)

        return wrapped


def _code_of(context: grpc.aio.ServicerContext) -> grpc.StatusCode | None:
    code = context.code()
    if code is None or isinstance(code, grpc.StatusCode):
        return code
    # Some grpcio versions return the raw integer.
    return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)


def server_options(settings: ServerSettings) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
    ]
    if settings.max_connection_age_seconds > 0:
        # gRPC spreads it by ±10% so that clients do not all reconnect at once; with no
        # grace set, calls in flight (a catalogue's batch job) run to their end.
        options.append(
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000))
        )
    return options


def add_port(server: grpc.aio.Server, address: str, tls: TLSSettings) -> int:
    """Listen on `address`: TLS (client certificates required when `tls` says so) or, with
    TLS off, plaintext. The bound port; 0 if it could not bind."""
    if not tls.enabled:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.server_credentials())


async def serve_health(
    health: health_aio.HealthServicer, host: str, port: int
) -> grpc.aio.Server | None:
    """The plaintext health-only port (LOUPE_HEALTH_PORT), sharing the main port's health
    statuses; None when `port` is 0."""
    if not port:
        return None
    probes = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health, probes)
    if probes.add_insecure_port(f"{host}:{port}") == 0:
        raise RuntimeError(f"cannot listen on {host}:{port} (LOUPE_HEALTH_PORT)")
    await probes.start()
    return probes


# Health name that is SERVING while the process runs, whatever its dependencies do.
LIVENESS_SERVICE = "loupe.liveness"


async def serve(service: Service, settings: ServerSettings) -> None:
    server = grpc.aio.server(
        interceptors=[MetricsInterceptor(service.name), *service.interceptors()],
        options=server_options(settings),
    )
    service.register(server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = [*service.grpc_services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
    if settings.reflection:
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)

    async def set_health(status: int) -> None:
        for name in ("", *service.grpc_services):
            await health.set(name, status)
        UP.labels(service.name).set(1 if status == health_pb2.HealthCheckResponse.SERVING else 0)

    stopping = asyncio.Event()
    watching: asyncio.Task[None] | None = None

    async def set_serving(serving: bool) -> None:
        if not stopping.is_set():
            await set_health(
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )

    await set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    start_http_server(settings.metrics_port, addr=settings.host)
    probes = await serve_health(health, settings.host, settings.health_port)
    address = f"{settings.host}:{settings.port}"
    if add_port(server, address, settings.tls) == 0:
        raise RuntimeError(f"cannot listen on {address}")
    await server.start()
    # The process is alive even while it cannot serve (loading, or Triton down): a liveness
    # probe asks about this name, so that a dependency's outage takes the pod out of its
    # Service (readiness) without restarting it.
    await health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "listening",
        extra={
            "address": address,
            "metrics_port": settings.metrics_port,
            "health_port": settings.health_port,
            **settings.tls.describe(),
        },
    )

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    started = time.perf_counter()
    loading = asyncio.create_task(service.start())
    waiting = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait({loading, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            loading.result()  # a failed load ends the process with its error
            await set_health(health_pb2.HealthCheckResponse.SERVING)
            log.info("serving", extra={"load_seconds": round(time.perf_counter() - started, 3)})
            # A service that depends on a server of its own (a model on Triton) may report
            # that it cannot serve for a while, and that it can again.
            watch = getattr(service, "watch_readiness", None)
            if watch is not None:
                watching = asyncio.create_task(watch(set_serving))
            await waiting
        else:
            loading.cancel()
        log.info("shutting down", extra={"grace_seconds": settings.grace_seconds})
        await set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    finally:
        waiting.cancel()
        if watching is not None:
            watching.cancel()
        # In-flight calls finish within the grace period; new ones are refused.
        await server.stop(settings.grace_seconds)
        if probes is not None:
            await probes.stop(None)
        await service.close()
    log.info("stopped")


def run(service_name: str, build: Callable[[], Service]) -> None:
    """Entry point of a service process: read settings, then serve until SIGTERM."""
    # First, so that every line the process writes is JSON, a configuration error's too.
    logs.configure(service_name, "INFO")
    try:
        settings = ServerSettings.from_env(service_name)
        threads = cpu.ThreadSettings.from_env()
        logs.set_level(settings.log_level)
    except ConfigError as error:
        log.critical(f"loupe-{service_name}: configuration error: {error}")
        sys.exit(2)

    async def main() -> None:
        cpu.configure(threads, asyncio.get_running_loop())
        # Built inside the event loop: asynchronous clients (grpc.aio, redis) bind to it.
        await serve(build(), settings)

    try:
        asyncio.run(main())
    except ConfigError as error:
        log.critical(f"loupe-{service_name}: configuration error: {error}")
        sys.exit(2)
    except Exception as error:
        log.critical(f"loupe-{service_name}: {error}", exc_info=True)
        sys.exit(1)
