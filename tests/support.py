"""Running a real service in-process on loopback, for tests that talk gRPC to it."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from services.common.server import MetricsInterceptor, Service


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
def serving(service: Service) -> Iterator[grpc.Channel]:
    """Start `service` on a free loopback port in a background event loop; yield a channel.

    The same servicer code, interceptor and `start`/`close` as in production; only the
    process wrapper (signals, health, metrics port) is left out.
    """
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(
            interceptors=[MetricsInterceptor(service.name)],
            options=[("grpc.max_receive_message_length", 64 << 20)],
        )
        service.register(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await service.start()
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=120)
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]
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
