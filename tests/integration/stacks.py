"""A whole stack, as users run it (`loupe up` on free loopback ports), for integration tests:
`with running_stack(data_dir) as stack:` yields a Stack, and `loupe down` runs on the way out.
The stack's own admin key (made by `loupe up`) is in LOUPE_API_KEY for every `loupe` command,
and sent by `stub()`; its CA is in LOUPE_TLS_CA, and `channel()` presents its client
certificate, as a backend of the stack requires.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loupe.v1 import gateway_pb2_grpc
from services.cli import local_tls
from services.cli.client import with_key
from services.cli.stack import StackState, local_api_key
from services.common.channels import TLSSettings, open_blocking_channel
from tests.support import free_ports

LOUPE = str(Path(sys.executable).parent / "loupe")
SERVICES = ("gateway", "detection", "embedding", "retrieval", "ranking")


@dataclass
class Stack:
    data_dir: Path
    env: dict[str, str]
    ports: dict[str, int]
    metrics_ports: dict[str, int]
    gateway: str

    def loupe(
        self, *args: str, check: bool = True, timeout: float = 900
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [LOUPE, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"loupe {' '.join(args[:3])} exited {result.returncode}\n"
                f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}"
            )
        return result

    def tls(self) -> TLSSettings:
        """The stack's CA and client certificate (plaintext when it runs with LOUPE_TLS=off)."""
        state = StackState.load(self.data_dir)
        return state.client_tls() if state is not None else TLSSettings()

    def channel(self, service: str) -> grpc.Channel:
        """A channel to one process of the stack, with the stack's client certificate."""
        return open_blocking_channel(
            f"127.0.0.1:{self.ports[service]}",
            self.tls(),
            options=[("grpc.max_receive_message_length", 64 << 20)],
        )

    def stub(self) -> gateway_pb2_grpc.GatewayStub:
        return gateway_pb2_grpc.GatewayStub(
            with_key(self.channel("gateway"), self.env.get("LOUPE_API_KEY", ""))
        )

    def metrics(self, service: str) -> str:
        url = f"http://127.0.0.1:{self.metrics_ports[service]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()

    def health(self, service: str, name: str = "") -> int:
        with self.channel(service) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=name), timeout=5
            )
        return reply.status

    def state(self) -> dict:
        return json.loads((self.data_dir / "run" / "stack.json").read_text())


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        sample, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in sample for k, v in labels.items()):
            total += float(value)
    return total


@contextmanager
def running_stack(data_dir: Path, settings: dict[str, str] | None = None) -> Iterator[Stack]:
    """`loupe up --data-dir data_dir` with every port free and on loopback, and `settings`
    (LOUPE_* variables) in the services' environment; `loupe down` after."""
    ports = free_ports(2 * len(SERVICES) + 1)
    env = {**os.environ, **(settings or {})}
    grpc_ports = dict(zip(SERVICES, ports[: len(SERVICES)], strict=True))
    metrics_ports = dict(zip(SERVICES, ports[len(SERVICES) : 2 * len(SERVICES)], strict=True))
    for name in SERVICES:
        env[f"LOUPE_{name.upper()}_PORT"] = str(grpc_ports[name])
        env[f"LOUPE_{name.upper()}_METRICS_PORT"] = str(metrics_ports[name])
    env["LOUPE_REDIS_PORT"] = str(ports[-1])
    env["LOUPE_GATEWAY"] = f"127.0.0.1:{grpc_ports['gateway']}"
    # Short enough that the Redis-outage test sees the gateway try Redis again.
    env["LOUPE_REDIS_RETRY_SECONDS"] = "1"
    running = Stack(data_dir, env, grpc_ports, metrics_ports, env["LOUPE_GATEWAY"])
    running.loupe("up", "--data-dir", str(data_dir))
    env["LOUPE_API_KEY"] = local_api_key(data_dir)
    if running.tls().enabled:
        # For `loupe` commands, whose own data directory is not this one.
        env["LOUPE_TLS_CA"] = str(local_tls.ca_path(data_dir))
    try:
        yield running
    finally:
        running.loupe("down", "--data-dir", str(data_dir), check=False)
