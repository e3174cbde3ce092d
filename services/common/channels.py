"""TLS on every hop, in one place: the LOUPE_TLS_* settings, a server's credentials, and the
gRPC channels that the services, the CLI, the tests and the tools open.

One certificate and key per process do both jobs: the server presents them to its callers, and
the same process presents them as its client certificate when it calls another service (or
Triton). LOUPE_TLS_CA verifies both ways: the servers a process calls, and, when client
authentication is on, the certificates of its callers.

TLS is on when LOUPE_TLS=on, or (LOUPE_TLS=auto, the default) when LOUPE_TLS_CERT or
LOUPE_TLS_CA is set; LOUPE_TLS=off turns it off whatever else is set. Files are checked when the
settings are read (a missing or unreadable file, no PEM in it, a key that is not the
certificate's, an expired certificate: a ConfigError naming the variable), so a bad mount
stops the process at start-up instead of failing every handshake later.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from services.common.config import ConfigError, env_str

log = logging.getLogger(__name__)

TLS_MODES = ("auto", "on", "off")
CLIENT_AUTH_MODES = ("require", "none")
# A server looks at its certificate files at most this often (on a new connection): a
# rotated certificate (cert-manager renewing a Secret) is served without a restart.
RELOAD_CHECK_SECONDS = 5.0


@dataclass(frozen=True)
class TLSSettings:
    enabled: bool = False
    # PEM certificate (chain) and its unencrypted PEM key: served, and presented when calling.
    cert: str = ""
    key: str = ""
    # PEM CA bundle: verifies the servers called (empty: the system's roots) and, with
    # client_auth, the callers' certificates.
    ca: str = ""
    # Refuse callers without a certificate signed by `ca` (the backends); the gateway's
    # public port authenticates callers by API key instead.
    client_auth: bool = False
    # The name a server's certificate is checked against, when it is not the host called.
    server_name: str = ""

    @classmethod
    def from_env(cls) -> TLSSettings:
        mode = env_str("LOUPE_TLS", "auto", choices=TLS_MODES)
        cert = env_str("LOUPE_TLS_CERT", "")
        key = env_str("LOUPE_TLS_KEY", "")
        ca = env_str("LOUPE_TLS_CA", "")
        if mode == "off" or (mode == "auto" and not (cert or key or ca)):
            return cls()
        client_auth = env_str(
            "LOUPE_TLS_CLIENT_AUTH", "require" if ca else "none", choices=CLIENT_AUTH_MODES
        )
        settings = cls(
            enabled=True,
            cert=cert,
            key=key,
            ca=ca,
            client_auth=client_auth == "require",
            server_name=env_str("LOUPE_TLS_SERVER_NAME", ""),
        )
        settings.check()
        return settings

    def check(self) -> None:
        """The files are there, readable, PEM, and the key is the certificate's."""
        if not self.enabled:
            return
        if bool(self.cert) != bool(self.key):
            raise ConfigError(
                "LOUPE_TLS_CERT and LOUPE_TLS_KEY go together: set both (a certificate and "
                "its key) or neither"
            )
        if self.client_auth and not self.ca:
            raise ConfigError(
                "LOUPE_TLS_CLIENT_AUTH=require needs LOUPE_TLS_CA, the CA whose certificates "
                "callers must present"
            )
        if self.ca:
            _certificates("LOUPE_TLS_CA", self.ca)
        if self.cert:
            chain = _certificates("LOUPE_TLS_CERT", self.cert)
            _check_current("LOUPE_TLS_CERT", self.cert, chain[0])
            _check_pair(chain[0], _private_key(self.key), self.cert, self.key)

    def check_server(self) -> None:
        """What a server needs on top: its own certificate."""
        if self.enabled and not self.cert:
            raise ConfigError(
                "TLS is on (LOUPE_TLS=on or LOUPE_TLS_CA is set) but LOUPE_TLS_CERT and "
                "LOUPE_TLS_KEY are not: a server needs its certificate and key (or set "
                "LOUPE_TLS=off to serve plaintext)"
            )

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials that serve the files as they are now, and as they are after a rotation."""
        key, cert = _read(self.key), _read(self.cert)
        initial = grpc.ssl_server_certificate_configuration([(key, cert)], self._ca_bytes())
        return grpc.dynamic_ssl_server_credentials(
            initial, _Reloader(self), require_client_authentication=self.client_auth
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self._ca_bytes(),
            private_key=_read(self.key) if self.key else None,
            certificate_chain=_read(self.cert) if self.cert else None,
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def _ca_bytes(self) -> bytes | None:
        return _read(self.ca) if self.ca else None

    def describe(self) -> dict[str, Any]:
        """For the start-up log line."""
        if not self.enabled:
            return {"tls": "off"}
        return {"tls": "on", "client_auth": "require" if self.client_auth else "none"}


def open_channel(
    address: str,
    tls: TLSSettings | None = None,
    *,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[Any] | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel to `address`: TLS as `tls` says (None: LOUPE_TLS_* of this process),
    with `options` (message sizes, backoff) as the caller needs."""
    tls = TLSSettings.from_env() if tls is None else tls
    merged = [*options, *tls.channel_options()]
    if not tls.enabled:
        return grpc.aio.insecure_channel(address, options=merged, interceptors=interceptors)
    return grpc.aio.secure_channel(
        address, tls.channel_credentials(), options=merged, interceptors=interceptors
    )


def open_blocking_channel(
    address: str, tls: TLSSettings | None = None, *, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """A blocking channel to `address`, as `open_channel` makes an asyncio one."""
    tls = TLSSettings.from_env() if tls is None else tls
    merged = [*options, *tls.channel_options()]
    if not tls.enabled:
        return grpc.insecure_channel(address, options=merged)
    return grpc.secure_channel(address, tls.channel_credentials(), options=merged)


def redis_tls_options(url: str, tls: TLSSettings | None) -> dict[str, Any]:
    """redis-py's TLS arguments for a rediss:// URL: the process's CA verifies Redis, and its
    certificate is the client certificate (Redis asks for one unless tls-auth-clients is no).
    Nothing for other URLs; ssl_* query parameters in the URL win."""
    if not url.startswith("rediss://") or tls is None or not tls.enabled:
        return {}
    options: dict[str, Any] = {"ssl_cert_reqs": "required"}
    if tls.ca:
        options["ssl_ca_certs"] = tls.ca
    if tls.cert:
        options["ssl_certfile"] = tls.cert
        options["ssl_keyfile"] = tls.key
    query = url.partition("?")[2]
    return {k: v for k, v in options.items() if f"{k}=" not in query}


class _Reloader:
    """gRPC asks before every handshake whether the certificate changed; the files are looked
    at every RELOAD_CHECK_SECONDS at most, and a new pair is served only once it checks out
    (a key that is not yet the new certificate's keeps the old pair)."""

    def __init__(self, tls: TLSSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._tls = tls
        self._clock = clock
        self._lock = threading.Lock()
        self._seen = self._stamp()
        self._next_check = clock() + RELOAD_CHECK_SECONDS

    def _stamp(self) -> tuple[tuple[int, int], ...]:
        stamps = []
        for path in (self._tls.cert, self._tls.key, self._tls.ca):
            try:
                info = os.stat(path) if path else None
            except OSError:
                info = None
            stamps.append((info.st_mtime_ns, info.st_size) if info else (0, 0))
        return tuple(stamps)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        # Called from gRPC's threads: never raise (a failed fetch fails the handshake).
        try:
            with self._lock:
                now = self._clock()
                if now < self._next_check:
                    return None
                self._next_check = now + RELOAD_CHECK_SECONDS
                stamp = self._stamp()
                if stamp == self._seen:
                    return None
                try:
                    self._tls.check()
                    key, cert = _read(self._tls.key), _read(self._tls.cert)
                    ca = _read(self._tls.ca) if self._tls.ca else None
                except (ConfigError, OSError) as error:
                    log.warning("TLS files changed but cannot be served yet: %s", error)
                    return None
                self._seen = stamp
                log.info("TLS certificate reloaded", extra={"cert": self._tls.cert})
                return grpc.ssl_server_certificate_configuration([(key, cert)], ca)
        except Exception:
            log.exception("TLS certificate reload failed")
            return None


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def _read_setting(name: str, path: str) -> bytes:
    try:
        return _read(path)
    except OSError as error:
        raise ConfigError(f"{name}={path}: cannot read it ({error.strerror or error})") from None


def _certificates(name: str, path: str) -> list[x509.Certificate]:
    data = _read_setting(name, path)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(f"{name}={path}: no PEM certificate in it") from None


def _check_current(name: str, path: str, certificate: x509.Certificate) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = certificate.subject.rfc4514_string()
    if certificate.not_valid_after_utc < now:
        raise ConfigError(
            f"{name}={path}: the certificate of {subject} expired on "
            f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )
    if certificate.not_valid_before_utc > now:
        raise ConfigError(
            f"{name}={path}: the certificate of {subject} is not valid before "
            f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (is the clock right?)"
        )


def _private_key(path: str) -> Any:
    data = _read_setting("LOUPE_TLS_KEY", path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            f"LOUPE_TLS_KEY={path}: the key is encrypted; Loupe reads unencrypted PEM keys "
            "(keep the file readable by the service's user only)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as error:
        raise ConfigError(f"LOUPE_TLS_KEY={path}: not a PEM private key ({error})") from None


def _check_pair(cert: x509.Certificate, key: Any, cert_path: str, key_path: str) -> None:
    def spki(public: Any) -> bytes:
        return bytes(
            public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    if spki(cert.public_key()) != spki(key.public_key()):
        raise ConfigError(
            f"LOUPE_TLS_KEY={key_path} is not the key of the certificate in "
            f"LOUPE_TLS_CERT={cert_path}"
        )
