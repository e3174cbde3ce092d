"""Configuration from environment variables, validated at start-up.

Every setting has a documented default (README, "Configuration"). A bad value stops the
process with one line naming the variable, the value and what was expected.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.common.channels import TLSSettings


class ConfigError(ValueError):
    """A setting is malformed; the message names the variable and what it expects."""


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None or value.strip() == "" else value.strip()


def env_str(name: str, default: str, *, choices: Iterable[str] | None = None) -> str:
    value = _raw(name) or default
    if choices is not None:
        allowed = list(choices)
        if value not in allowed:
            raise ConfigError(f"{name}={value!r}: expected one of {', '.join(allowed)}")
    return value


def env_int(
    name: str, default: int, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    raw = _raw(name)
    try:
        value = default if raw is None else int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected an integer") from None
    _check_bounds(name, value, minimum, maximum)
    return value


def env_float(
    name: str, default: float, *, minimum: float | None = None, maximum: float | None = None
) -> float:
    raw = _raw(name)
    try:
        value = default if raw is None else float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a number") from None
    if value != value:  # NaN
        raise ConfigError(f"{name}={raw!r}: expected a number")
    _check_bounds(name, value, minimum, maximum)
    return value


def env_bool(name: str, default: bool) -> bool:
    raw = _raw(name)
    if raw is None:
        return default
    lowered = raw.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name}={raw!r}: expected true or false")


def env_address(name: str, default: str) -> str:
    """A HOST:PORT address of another service."""
    value = _raw(name) or default
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name}={value!r}: expected HOST:PORT")
    return value


def _check_bounds(name: str, value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value}: must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}={value}: must be at most {maximum}")


# Default gRPC and metrics ports of the embedded stack; every one can be overridden.
DEFAULT_PORTS: dict[str, tuple[int, int]] = {
    "gateway": (50051, 9151),
    "detection": (50052, 9152),
    "embedding": (50053, 9153),
    "retrieval": (50054, 9154),
    "ranking": (50055, 9155),
}


@dataclass(frozen=True)
class ServerSettings:
    """What every service's process needs, whatever the service does."""

    service: str
    host: str
    port: int
    metrics_port: int
    max_message_bytes: int
    grace_seconds: float
    log_level: str
    # gRPC server reflection (grpcurl lists and calls methods without the protos): handy on a
    # laptop, a map for an intruder elsewhere; the chart turns it off.
    reflection: bool
    # LOUPE_TLS_*: a TLS port (and client certificates required) instead of a plaintext one.
    tls: TLSSettings = field(default_factory=lambda: _tls_off())
    # A second, plaintext port that serves grpc.health only (0: none): Kubernetes' gRPC probes
    # speak no TLS, and health says nothing a caller could use.
    health_port: int = 0
    # Connections are closed (GOAWAY, calls in flight finish) after about this long (0:
    # never): a client then connects and resolves the name again, so replicas added since
    # get their share of a long-lived client's calls.
    max_connection_age_seconds: float = 300.0

    @classmethod
    def from_env(cls, service: str) -> ServerSettings:
        prefix = f"LOUPE_{service.upper()}"
        grpc_port, metrics_port = DEFAULT_PORTS[service]
        return cls(
            service=service,
            host=env_str("LOUPE_LISTEN_HOST", "127.0.0.1"),
            port=env_int(f"{prefix}_PORT", grpc_port, minimum=0, maximum=65535),
            metrics_port=env_int(f"{prefix}_METRICS_PORT", metrics_port, minimum=0, maximum=65535),
            max_message_bytes=env_int(
                "LOUPE_MAX_MESSAGE_BYTES", 32 * 1024 * 1024, minimum=1024 * 1024, maximum=1 << 30
            ),
            grace_seconds=env_float("LOUPE_SHUTDOWN_GRACE_SECONDS", 10.0, minimum=0.0),
            log_level=env_str(
                "LOUPE_LOG_LEVEL", "INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
            ),
            reflection=env_bool("LOUPE_GRPC_REFLECTION", True),
            tls=server_tls(),
            health_port=env_int("LOUPE_HEALTH_PORT", 0, minimum=0, maximum=65535),
            max_connection_age_seconds=env_float(
                "LOUPE_GRPC_MAX_CONNECTION_AGE_SECONDS", 300.0, minimum=0.0, maximum=86400.0
            ),
        )


# Imported when called: services.common.channels builds on this module.
def _tls_off() -> TLSSettings:
    from services.common.channels import TLSSettings

    return TLSSettings()


def server_tls() -> TLSSettings:
    """LOUPE_TLS_* as a server reads them: TLS on means a certificate of its own."""
    from services.common.channels import TLSSettings

    tls = TLSSettings.from_env()
    tls.check_server()
    return tls
