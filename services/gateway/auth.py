"""Who may call the gateway: API keys with a role, and an optional rate per key.

A caller sends its key as gRPC metadata, `authorization: Bearer <key>` (or `x-api-key:
<key>`). The key's SHA-256 is looked up in the keys file (api_keys.py), which is re-read when
it changes, so keys are added, rotated and revoked without a restart. Each method needs a
role: `read` (Search, Get, Detect, ListCatalogs), `write` (also Index, IndexStream, Delete) or
`admin` (also DropCatalog, AugmentCatalog, MigrateCatalog, ListItems). Health and reflection
stay open: probes and load balancers carry no key.

Outcomes: UNAUTHENTICATED (no key, or one the file does not hold), PERMISSION_DENIED (the
key's role is too low; the message names the role needed), RESOURCE_EXHAUSTED (over the key's
rate; the message and the `retry-after-ms` trailer say when to retry). Each call is counted
by key name and outcome; a key itself is never logged nor used as a label.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from loupe.v1 import gateway_pb2
from services.common.config import ConfigError
from services.gateway import api_keys
from services.gateway.api_keys import ApiKey, KeyFileError
from services.gateway.metrics import API_KEY_RELOADS, API_KEYS, AUTH_REQUESTS
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

GATEWAY = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
# The least role each gateway method needs. A method missing here needs `admin`, so that an
# RPC added later is closed until someone decides otherwise (a test checks every method is
# listed).
METHOD_ROLES: dict[str, str] = {
    "Search": "read",
    "Get": "read",
    "Detect": "read",
    "ListCatalogs": "read",
    "Index": "write",
    "IndexStream": "write",
    "Delete": "write",
    "DropCatalog": "admin",
    "AugmentCatalog": "admin",
    "MigrateCatalog": "admin",
    "ListItems": "admin",
}
OPEN_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
NO_KEY_LABEL = "-"
RETRY_AFTER = "retry-after-ms"
HOW_TO_SEND = (
    "send it as gRPC metadata 'authorization: Bearer <key>' (or 'x-api-key: <key>'); "
    "the loupe CLI takes --api-key or LOUPE_API_KEY"
)


def presented_key(metadata: Iterable[Any] | None) -> str | None:
    """The key a call carries: '' when the authorization metadata is malformed, None when
    there is none."""
    bearer = plain = None
    for item in metadata or ():
        name, value = item[0], item[1]
        if name == "authorization":
            bearer = value
        elif name == "x-api-key":
            plain = value
    if bearer is not None:
        scheme, _, token = str(bearer).strip().partition(" ")
        return token.strip() if scheme.lower() == "bearer" else ""
    if plain is not None:
        return str(plain).strip()
    return None


class KeyFile:
    """The keys in the file at `path`, re-read when its contents change.

    Contents are compared rather than mtimes: a Kubernetes Secret volume swaps a symlink to a
    new directory (new inode, any mtime), an editor may rewrite in place within one mtime
    tick, and the file is small. A file that does not parse on a re-read leaves the keys as
    they were: a half-written file must not lock everybody out or let anybody in.
    """

    def __init__(self, path: Path, interval: float) -> None:
        self.path = path
        self.interval = interval
        try:
            text = path.read_bytes()
            keys = api_keys.parse(text.decode("utf-8"), str(path))
        except FileNotFoundError:
            raise ConfigError(
                f"LOUPE_API_KEYS_FILE={str(path)!r}: no such file (`loupe keys create NAME "
                f"--role ROLE --keys-file {path}` makes one)"
            ) from None
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"LOUPE_API_KEYS_FILE={str(path)!r}: cannot read: {error}") from None
        except KeyFileError as error:
            raise ConfigError(f"LOUPE_API_KEYS_FILE: {error}") from None
        self._seen = hashlib.sha256(text).digest()
        self.by_digest = self._index(keys)
        log.info("API keys loaded", extra=self._summary(keys))

    @staticmethod
    def _index(keys: list[ApiKey]) -> dict[str, ApiKey]:
        API_KEYS.set(len(keys))
        return {key.sha256: key for key in keys}

    def _summary(self, keys: list[ApiKey]) -> dict[str, Any]:
        roles = {role: sum(1 for k in keys if k.role == role) for role in api_keys.ROLES}
        return {"file": str(self.path), "keys": len(keys), "roles": roles}

    def reload(self) -> bool:
        """Read the file again; True when new keys took effect. Blocking (run in a thread)."""
        try:
            text = self.path.read_bytes()
        except OSError as error:
            API_KEY_RELOADS.labels("error").inc()
            log.error(
                "cannot read the API keys file; the previous keys stay in force",
                extra={"file": str(self.path), "error": str(error)},
            )
            return False
        seen = hashlib.sha256(text).digest()
        if seen == self._seen:
            return False
        try:
            keys = api_keys.parse(text.decode("utf-8"), str(self.path))
        except (KeyFileError, UnicodeDecodeError) as error:
            API_KEY_RELOADS.labels("error").inc()
            log.error(
                "the API keys file changed but cannot be used; the previous keys stay in force",
                extra={"file": str(self.path), "error": str(error)},
            )
            # Not remembered as seen: the same bad text is reported again at the next look,
            # so that the error stays visible until the file is fixed.
            return False
        self._seen = seen
        # One assignment: a call on the event loop sees the old keys or the new, never a mix.
        self.by_digest = self._index(keys)
        API_KEY_RELOADS.labels("ok").inc()
        log.info("API keys reloaded", extra=self._summary(keys))
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await asyncio.to_thread(self.reload)
            except Exception:
                # Whatever went wrong this time, rotation must not stop for good.
                log.exception("checking the API keys file failed", extra={"file": str(self.path)})


@dataclass
class _Bucket:
    rate: float
    burst: int
    tokens: float
    stamp: float


class RateLimits:
    """A token bucket per key name (per gateway process: replicas each allow the rate)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def wait(self, key: ApiKey) -> float:
        """0 when the call may go ahead (and is counted), else seconds until it may."""
        if key.rate <= 0:
            return 0.0
        now = self.clock()
        burst = key.limit_burst
        bucket = self._buckets.get(key.name)
        if bucket is None:
            bucket = self._buckets[key.name] = _Bucket(key.rate, burst, burst, now)
        else:
            bucket.tokens = min(bucket.burst, bucket.tokens + (now - bucket.stamp) * bucket.rate)
            bucket.stamp = now
            if (bucket.rate, bucket.burst) != (key.rate, burst):
                # The file changed this key's limit: the new one applies from now on.
                bucket.rate, bucket.burst = key.rate, burst
                bucket.tokens = min(bucket.tokens, burst)
        # A hair under one token counts as one: float sums of small refills fall short.
        if bucket.tokens >= 1.0 - 1e-9:
            bucket.tokens = max(0.0, bucket.tokens - 1.0)
            return 0.0
        return (1.0 - bucket.tokens) / bucket.rate


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks each call's key against the role its method needs, then the key's rate.

    The check runs inside the handler, at every call, from the call's own metadata: the
    metrics interceptor in front of this one keeps the handler it got for a method and does
    not ask again, so a decision made in `intercept_service` would be the first call's for all.
    """

    def __init__(self, keys: KeyFile, limits: RateLimits | None = None) -> None:
        self.keys = keys
        self.limits = limits or RateLimits()
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._counters: dict[tuple[str, str], Any] = {}
        self._watching: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin watching the keys file (on the running event loop)."""
        if self._watching is None:
            self._watching = asyncio.create_task(self.keys.watch())

    async def close(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
            self._watching = None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        guarded = self._handlers.get(details.method)
        if guarded is None:
            guarded = self._handlers[details.method] = self._guard(details.method, handler)
        return guarded

    def _count(self, key: str, outcome: str) -> None:
        counter = self._counters.get((key, outcome))
        if counter is None:
            counter = self._counters[(key, outcome)] = AUTH_REQUESTS.labels(key, outcome)
        counter.inc()

    async def admit(self, method: str, needed: str, context: grpc.aio.ServicerContext) -> None:
        """Return when the call may proceed; abort it with the reason otherwise."""
        token = presented_key(context.invocation_metadata())
        if not token:
            self._count(NO_KEY_LABEL, "no_key")
            problem = (
                "no API key"
                if token is None
                else "the authorization metadata is not 'Bearer <key>'"
            )
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, f"{problem}: {method} needs one; {HOW_TO_SEND}"
            )
        # A dictionary lookup by the key's SHA-256: its timing depends on a digest the caller
        # cannot steer, so it tells nothing about the stored keys (no compare_digest needed).
        key = self.keys.by_digest.get(api_keys.hash_key(token or ""))
        if key is None:
            self._count(NO_KEY_LABEL, "unknown_key")
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "API key not recognised (mistyped, revoked or rotated): ask whoever manages "
                "the gateway's keys for a valid one",
            )
            return
        if not api_keys.role_allows(key.role, needed):
            self._count(key.name, "permission_denied")
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} needs role {needed} or above; key {key.name!r} has role {key.role}",
            )
        wait = self.limits.wait(key)
        if wait > 0:
            self._count(key.name, "rate_limited")
            milliseconds = max(1, round(wait * 1000))
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"key {key.name!r} is over its rate limit ({key.rate:g} requests/s, burst "
                f"{key.limit_burst}): retry in {milliseconds / 1000:.3f} s",
                trailing_metadata=((RETRY_AFTER, str(milliseconds)),),
            )
        self._count(key.name, "ok")

    def _guard(self, path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        method = path.rsplit("/", 1)[-1]
        needed = METHOD_ROLES.get(method) if path.startswith(f"/{GATEWAY}/") else None
        if needed is None:
            needed = "admin"
            log.warning("no role listed for this method: it needs admin", extra={"method": path})
        admit = self.admit

        if handler.unary_unary:
            unary = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await admit(method, needed, context)
                return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            stream = handler.stream_unary

            async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                # Before the first message is read: a refused stream costs nothing.
                await admit(method, needed, context)
                return await stream(requests, context)

            return grpc.stream_unary_rpc_method_handler(
                stream_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        behaviour = handler.unary_stream or handler.stream_stream
        if inspect.isasyncgenfunction(behaviour):

            async def streaming(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                await admit(method, needed, context)
                async for response in behaviour(request, context):
                    yield response

            guarded: Callable[..., Any] = streaming
        else:

            async def writing(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await admit(method, needed, context)
                return await behaviour(request, context)

            guarded = writing
        make = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream
            else grpc.stream_stream_rpc_method_handler
        )
        return make(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def from_settings(settings: GatewaySettings) -> AuthInterceptor | None:
    """The interceptor the settings ask for; None in open mode. ConfigError when the keys
    file is missing or bad: the gateway does not start on keys it cannot read."""
    if settings.auth == "open":
        log.warning(
            "LOUPE_AUTH=open: no API keys are checked; anyone who reaches the gateway may "
            "search, index, delete and drop catalogues",
            extra={"ignored_keys_file": settings.api_keys_file} if settings.api_keys_file else {},
        )
        return None
    return AuthInterceptor(KeyFile(Path(settings.api_keys_file), settings.auth_reload_seconds))
