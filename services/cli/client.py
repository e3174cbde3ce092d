"""Reaching the gateway from the command line."""

from __future__ import annotations

import collections
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from services.cli.stack import StackState, local_api_key
from services.common.channels import TLSSettings, open_channel
from services.common.config import env_str

DEFAULT_DATA_DIR = Path(".loupe")
MAX_MESSAGE_BYTES = 64 << 20


def gateway_address(flag: str | None, data_dir: Path = DEFAULT_DATA_DIR) -> str:
    """--gateway, else LOUPE_GATEWAY, else the stack `loupe up` started here, else the default."""
    if flag:
        return flag
    if os.environ.get("LOUPE_GATEWAY"):
        return os.environ["LOUPE_GATEWAY"]
    state = StackState.load(data_dir.resolve())
    if state is not None:
        return state.gateway
    return "127.0.0.1:50051"


def api_key(flag: str | None, address: str, data_dir: Path = DEFAULT_DATA_DIR) -> str:
    """--api-key, else LOUPE_API_KEY, else the local user's key of the stack `loupe up`
    started in `data_dir` when `address` is its gateway, else '' (no key is sent).

    The local key goes to that stack's gateway only: pointed elsewhere, the CLI sends nothing
    it was not given.
    """
    if flag:
        return flag.strip()
    if os.environ.get("LOUPE_API_KEY", "").strip():
        return os.environ["LOUPE_API_KEY"].strip()
    state = StackState.load(data_dir.resolve())
    if state is not None and _same_address(state.gateway, address):
        return local_api_key(data_dir)
    return ""


def client_tls(address: str, data_dir: Path = DEFAULT_DATA_DIR) -> TLSSettings:
    """LOUPE_TLS_* when they turn TLS on or off, else, for a process of the stack `loupe up`
    started in `data_dir` (with TLS), its CA and client certificate, else plaintext.

    Like the local key, the local certificates go to that stack only.
    """
    configured = TLSSettings.from_env()
    if configured.enabled or env_str("LOUPE_TLS", "auto") == "off":
        return configured
    state = StackState.load(data_dir.resolve())
    if state is not None and any(
        _same_address(f"127.0.0.1:{p.port}", address) for p in state.processes if p.port
    ):
        return state.client_tls()
    return configured


def _same_address(a: str, b: str) -> bool:
    loopback = {"127.0.0.1", "localhost", "[::1]"}
    (host_a, _, port_a), (host_b, _, port_b) = a.rpartition(":"), b.rpartition(":")
    return port_a == port_b and (host_a == host_b or {host_a, host_b} <= loopback)


def auth_metadata(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),) if key else ()


class _WithKey:
    def __init__(self, key: str) -> None:
        self.metadata = auth_metadata(key)

    def _details(self, details: Any) -> Any:
        return details._replace(
            metadata=grpc.aio.Metadata(*(details.metadata or ()), *self.metadata)
        )


# One class per kind of call: a channel files an interceptor under the first kind it is an
# instance of, so one class of all four would see unary calls only.
class _UnaryUnaryKey(_WithKey, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStreamKey(_WithKey, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnaryKey(_WithKey, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return await continuation(self._details(details), requests)


class _StreamStreamKey(_WithKey, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return await continuation(self._details(details), requests)


def channel(
    address: str,
    key: str = "",
    tls: TLSSettings | None = None,
    data_dir: Path = DEFAULT_DATA_DIR,
) -> grpc.aio.Channel:
    """An asyncio channel to the gateway that sends `key` (when there is one) with each call;
    TLS as `tls` says (None: as `client_tls` finds for `address` and `data_dir`)."""
    return open_channel(
        address,
        client_tls(address, data_dir) if tls is None else tls,
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ],
        interceptors=[
            kind(key)
            for kind in (_UnaryUnaryKey, _UnaryStreamKey, _StreamUnaryKey, _StreamStreamKey)
        ]
        if key
        else None,
    )


class _SyncDetails(
    collections.namedtuple(
        "_SyncDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class _SyncAddKey(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, key: str) -> None:
        self.metadata = auth_metadata(key)

    def _details(self, details: Any) -> _SyncDetails:
        return _SyncDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), *self.metadata],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def with_key(channel: grpc.Channel, key: str) -> grpc.Channel:
    """A blocking channel that sends `key` (when there is one) with each call."""
    return grpc.intercept_channel(channel, _SyncAddKey(key)) if key else channel
