"""The embedded stack's secrets: mutual TLS between its processes and Redis's password.

`loupe up` makes, once, under DIR/tls: a throwaway CA (ca.crt) and a certificate and key per
service (gateway, detection, embedding, retrieval, ranking) plus one for local clients
(client.crt: `loupe up`'s health checks, `loupe status`, tests and tools that call a backend).
Every certificate names localhost, 127.0.0.1 and ::1, and serves and calls. Keys are readable
by the owner only; the CA's key is not kept (nothing can sign another certificate later), so
a set that is incomplete, no longer matches its CA or expires within RENEW_DAYS is made
again, whole, at the next `loupe up`. The backends require a client certificate from this CA,
so a local process without one cannot call them around the gateway; the gateway serves TLS
and takes callers by API key. LOUPE_TLS=off in the environment of `loupe up` runs the stack
in plaintext (for debugging with grpcurl and the like).

Redis gets a random password (DIR/auth/redis.password, owner-only), handed to redis-server in
a config file (not its command line, which every local user can read) and to the services in
LOUPE_REDIS_PASSWORD.
"""

from __future__ import annotations

import datetime
import secrets
from pathlib import Path

from services.common import certs
from services.common.channels import TLSSettings
from services.common.config import ConfigError, env_str

# The names of the certificates: the five services and the local client.
CLIENT = "client"
NAMES = ("gateway", "detection", "embedding", "retrieval", "ranking", CLIENT)
# Certificates expiring within this many days are made again (with the whole set) on `up`.
RENEW_DAYS = 30


def tls_dir(data_dir: Path) -> Path:
    return data_dir / "tls"


def ca_path(data_dir: Path) -> Path:
    return tls_dir(data_dir) / "ca.crt"


def cert_path(data_dir: Path, name: str) -> Path:
    return tls_dir(data_dir) / f"{name}.crt"


def key_path(data_dir: Path, name: str) -> Path:
    return tls_dir(data_dir) / f"{name}.key"


def enabled() -> bool:
    """Whether `loupe up` runs its stack with mutual TLS: unless LOUPE_TLS=off."""
    return env_str("LOUPE_TLS", "auto", choices=("auto", "on", "off")) != "off"


def _usable(data_dir: Path) -> bool:
    ca = ca_path(data_dir)
    if not ca.is_file():
        return False
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=RENEW_DAYS)
    for name in NAMES:
        cert, key = cert_path(data_dir, name), key_path(data_dir, name)
        try:
            TLSSettings(True, str(cert), str(key), str(ca)).check()
            if certs.expires(cert) < soon or not certs.signed_by(cert, ca):
                return False
        except (ConfigError, OSError, ValueError):
            return False
    return True


def ensure_certificates(data_dir: Path) -> bool:
    """The CA and every certificate, made if any is missing, unusable or expiring soon.
    True when they were made now."""
    if _usable(data_dir):
        return False
    directory = tls_dir(data_dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    authority = certs.make_authority(f"Loupe local CA {secrets.token_hex(4)}")
    # The leaves first: a CA that is written last never stands beside certificates it did
    # not sign, whatever interrupts this.
    for name in NAMES:
        certs.write_issued(
            certs.issue(authority, f"loupe-{name}"),
            cert_path(data_dir, name),
            key_path(data_dir, name),
        )
    ca_path(data_dir).write_bytes(authority.pem)
    return True


def service_env(data_dir: Path, name: str) -> dict[str, str]:
    """The LOUPE_TLS_* of one service of the stack: its certificate, the CA, and client
    certificates required by every backend (the gateway takes API keys instead)."""
    return {
        "LOUPE_TLS": "on",
        "LOUPE_TLS_CERT": str(cert_path(data_dir, name)),
        "LOUPE_TLS_KEY": str(key_path(data_dir, name)),
        "LOUPE_TLS_CA": str(ca_path(data_dir)),
        "LOUPE_TLS_CLIENT_AUTH": "none" if name == "gateway" else "require",
        "LOUPE_TLS_SERVER_NAME": "",
    }


def plaintext_env() -> dict[str, str]:
    """LOUPE_TLS_* for the services of a stack that runs without TLS (LOUPE_TLS=off): off,
    whatever the environment of `loupe up` holds for its own client use."""
    return {
        "LOUPE_TLS": "off",
        "LOUPE_TLS_CERT": "",
        "LOUPE_TLS_KEY": "",
        "LOUPE_TLS_CA": "",
        "LOUPE_TLS_CLIENT_AUTH": "",
        "LOUPE_TLS_SERVER_NAME": "",
    }


def client_settings(data_dir: Path) -> TLSSettings:
    """How a local client reaches any process of the stack in `data_dir` that runs with TLS:
    the stack's CA and its client certificate."""
    return TLSSettings(
        enabled=True,
        cert=str(cert_path(data_dir, CLIENT)),
        key=str(key_path(data_dir, CLIENT)),
        ca=str(ca_path(data_dir)),
    )


def redis_password_path(data_dir: Path) -> Path:
    return data_dir / "auth" / "redis.password"


def redis_password(data_dir: Path) -> str:
    """The password of the stack's Redis; '' if none was made."""
    try:
        return redis_password_path(data_dir).read_text().strip()
    except OSError:
        return ""


def ensure_redis_password(data_dir: Path) -> str:
    """The stack's Redis password, made on first start and kept."""
    password = redis_password(data_dir)
    if password:
        return password
    path = redis_password_path(data_dir)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    password = secrets.token_urlsafe(32)
    certs.write_private(path, (password + "\n").encode())
    return password


def redis_config(data_dir: Path, password: str) -> Path:
    """A config file for redis-server holding the password (owner-only), rewritten on `up`."""
    path = data_dir / "redis" / "redis.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    certs.write_private(path, f"requirepass {password}\n".encode())
    return path
