"""Running a real service in-process on loopback, for tests that talk gRPC to it."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

from services.common.channels import TLSSettings, open_blocking_channel
from services.common.server import MetricsInterceptor, Service, add_port


def free_ports(count: int) -> list[int]:
    """Loopback ports free now, for processes a test starts (a race no test here loses)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@contextmanager
def s3_server(bucket: str) -> Iterator[Any]:
    """A boto3 client of `bucket` on moto's S3 server: a real S3-compatible HTTP endpoint on
    loopback. While it runs, AWS_* variables (dummy credentials, the endpoint) point botocore,
    and so s3fs, at it."""
    import boto3
    import pytest
    from moto.server import ThreadedMotoServer

    (port,) = free_ports(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        with pytest.MonkeyPatch.context() as env:
            for name, value in {
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL_S3": endpoint,
            }.items():
                env.setenv(name, value)
            client = boto3.client("s3", endpoint_url=endpoint)
            client.create_bucket(Bucket=bucket)
            yield client
    finally:
        server.stop()


@contextmanager
def running_redis(data_dir: Path) -> Iterator[int]:
    """A real redis-server on a free loopback port (the one `loupe up` would start); its port."""
    from services.cli.stack import redis_server_binary

    (port,) = free_ports(1)
    process = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--dir", str(data_dir)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield port
    finally:
        process.kill()
        process.wait()


@contextmanager
def serving(
    service: Service,
    port: int = 0,
    *,
    tls: TLSSettings | None = None,
    client_tls: TLSSettings | None = None,
) -> Iterator[grpc.Channel]:
    """Start `service` on loopback (`port`, else a free one) in a background event loop; yield
    a channel. With `tls`, the port serves TLS as a service's does; the channel then uses
    `client_tls` (else plaintext).

    The same servicer code, interceptors and `start`/`close` as in production; only the
    process wrapper (signals, health, metrics port) is left out.
    """
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(
            interceptors=[MetricsInterceptor(service.name), *service.interceptors()],
            options=[("grpc.max_receive_message_length", 64 << 20)],
        )
        service.register(server)
        bound = add_port(server, f"127.0.0.1:{port}", tls or TLSSettings())
        await service.start()
        await server.start()
        return server, bound

    server, bound = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=120)
    channel = open_blocking_channel(
        f"127.0.0.1:{bound}",
        client_tls or TLSSettings(),
        options=[("grpc.max_send_message_length", 64 << 20)],
    )
    try:
        yield channel
    finally:
        channel.close()

        async def stop() -> None:
            await server.stop(None)
            await service.close()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
