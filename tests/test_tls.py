"""TLS and mutual TLS on real gRPC ports, with throwaway CAs made here.

A backend with client authentication on (what every backend of the stack and the chart runs)
takes calls only over TLS with a certificate from its CA; the gateway's port serves TLS to
callers without one. Settings are checked at start-up with errors that name the variable; a
rotated server certificate is served without a restart; the Triton client presents the
service's certificate; `loupe up`'s certificates and Redis password are made once, owner-only.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from loupe.v1 import common_pb2, ranking_pb2_grpc
from services.cli import client as cli_client
from services.cli import local_tls
from services.cli.stack import Process, StackState
from services.common import certs, channels
from services.common.channels import TLSSettings, open_blocking_channel, redis_tls_options
from services.common.config import ConfigError, ServerSettings
from services.common.server import add_port
from services.common.triton_backend import triton_client
from services.ranking.service import RankingService
from services.ranking.settings import RankingSettings
from tests.support import free_ports, serving

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Pki:
    ca: str
    server: tuple[str, str]
    client: tuple[str, str]
    # A CA the servers do not trust, and a client certificate it signed.
    other_ca: str
    stranger: tuple[str, str]
    folder: Path


def _write(folder: Path, name: str, issued: certs.Issued) -> tuple[str, str]:
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    certs.write_issued(issued, cert, key)
    return str(cert), str(key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    authority, other = certs.make_authority("test CA"), certs.make_authority("another CA")
    (folder / "ca.crt").write_bytes(authority.pem)
    (folder / "other-ca.crt").write_bytes(other.pem)
    return Pki(
        ca=str(folder / "ca.crt"),
        server=_write(folder, "server", certs.issue(authority, "backend")),
        client=_write(folder, "client", certs.issue(authority, "gateway")),
        other_ca=str(folder / "other-ca.crt"),
        stranger=_write(folder, "stranger", certs.issue(other, "stranger")),
        folder=folder,
    )


def backend_tls(pki: Pki, *, client_auth: bool = True) -> TLSSettings:
    tls = TLSSettings(True, *pki.server, ca=pki.ca, client_auth=client_auth)
    tls.check()
    return tls


def ranking() -> RankingService:
    return RankingService(RankingSettings("popularity", 0.05, 1000.0, "category", 0.05, 0, 3.0))


def describe(port: int, tls: TLSSettings) -> str:
    """'OK', or the status code of a Describe call to the ranking service on `port`."""
    with open_blocking_channel(f"127.0.0.1:{port}", tls) as channel:
        try:
            ranking_pb2_grpc.RankingServiceStub(channel).Describe(
                common_pb2.DescribeRequest(), timeout=10
            )
        except grpc.RpcError as error:
            return str(error.code().name)  # type: ignore[attr-defined]
    return "OK"


@pytest.fixture(scope="module")
def mtls_port(pki: Pki) -> Iterator[int]:
    port = _free_port()
    with serving(ranking(), port, tls=backend_tls(pki)):
        yield port


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- a backend with mutual TLS ------------------------------------------------------------------


def test_a_backend_takes_a_client_certificate_from_its_ca(pki: Pki, mtls_port: int) -> None:
    assert describe(mtls_port, TLSSettings(True, *pki.client, ca=pki.ca)) == "OK"


@pytest.mark.parametrize(
    "caller",
    ["plaintext", "no client certificate", "a certificate from another CA", "its own CA unknown"],
)
def test_a_backend_refuses_callers_without_a_valid_client_certificate(
    pki: Pki, mtls_port: int, caller: str
) -> None:
    tls = {
        "plaintext": TLSSettings(),
        "no client certificate": TLSSettings(True, ca=pki.ca),
        "a certificate from another CA": TLSSettings(True, *pki.stranger, ca=pki.ca),
        # A client that checks the server: a backend whose CA it does not know is refused.
        "its own CA unknown": TLSSettings(True, *pki.client, ca=pki.other_ca),
    }[caller]
    assert describe(mtls_port, tls) == "UNAVAILABLE"


def first_bytes(port: int, ca: str, client: tuple[str, str] | None) -> bytes:
    """What the server sends after the HTTP/2 preface over raw TLS; b'' if it hangs up."""
    context = ssl.create_default_context(cafile=ca)
    if client:
        context.load_cert_chain(*client)
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            return tls.recv(9)
    except (ssl.SSLError, ConnectionError):
        return b""


def test_the_server_itself_ends_a_handshake_without_a_client_certificate(
    pki: Pki, mtls_port: int
) -> None:
    # Below gRPC, so that it is the server that refuses, not only the client that gives up.
    assert first_bytes(mtls_port, pki.ca, pki.client) != b""  # an HTTP/2 SETTINGS frame
    assert first_bytes(mtls_port, pki.ca, None) == b""


# --- the gateway's port: TLS, callers authenticate by API key ------------------------------------


def test_the_gateway_port_serves_tls_to_callers_without_a_certificate(pki: Pki) -> None:
    port = _free_port()
    with serving(ranking(), port, tls=backend_tls(pki, client_auth=False)):
        assert describe(port, TLSSettings(True, ca=pki.ca)) == "OK"
        assert describe(port, TLSSettings(True, *pki.client, ca=pki.ca)) == "OK"
        assert describe(port, TLSSettings()) == "UNAVAILABLE"
        # A caller that does not trust the server's CA does not talk to it.
        assert describe(port, TLSSettings(True, ca=pki.other_ca)) == "UNAVAILABLE"


def test_a_server_name_override_checks_the_certificate_against_that_name(pki: Pki) -> None:
    authority = certs.make_authority("named CA")
    (pki.folder / "named-ca.crt").write_bytes(authority.pem)
    named = _write(pki.folder, "named", certs.issue(authority, "svc", ["retrieval.loupe.svc"]))
    port = _free_port()
    server_tls = TLSSettings(True, *named, ca=str(pki.folder / "named-ca.crt"))
    with serving(ranking(), port, tls=server_tls):
        ca = str(pki.folder / "named-ca.crt")
        assert describe(port, TLSSettings(True, ca=ca)) == "UNAVAILABLE"
        assert describe(port, TLSSettings(True, ca=ca, server_name="retrieval.loupe.svc")) == "OK"


# --- rotation ------------------------------------------------------------------------------------


def served_subject(port: int, pki: Pki, ca: Path) -> str:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(*pki.client)
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


def test_a_rotated_server_certificate_is_served_without_a_restart(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(channels, "RELOAD_CHECK_SECONDS", 0.0)
    authority = certs.make_authority("rotating CA")
    ca = tmp_path / "ca.crt"
    # Both CAs in the bundle, as while a CA rolls over.
    ca.write_bytes(authority.pem + Path(pki.ca).read_bytes())
    cert, key = _write(tmp_path, "server", certs.issue(authority, "before"))
    port = _free_port()
    with serving(ranking(), port, tls=TLSSettings(True, cert, key, str(ca), client_auth=True)):
        assert served_subject(port, pki, ca) == "CN=before"
        # A half-done rotation (a new certificate, the old key) is not served.
        Path(cert).write_bytes(certs.issue(authority, "mismatched").cert_pem)
        assert served_subject(port, pki, ca) == "CN=before"
        _write(tmp_path, "server", certs.issue(authority, "after"))
        assert served_subject(port, pki, ca) == "CN=after"
        assert describe(port, TLSSettings(True, *pki.client, ca=str(ca))) == "OK"


# --- a service process, as the chart and `loupe up` run it ---------------------------------------


def service_env(pki: Pki, ports: list[int], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOUPE_TLS")}
    env.update(
        LOUPE_RANKING_PORT=str(ports[0]),
        LOUPE_RANKING_METRICS_PORT=str(ports[1]),
        LOUPE_HEALTH_PORT=str(ports[2]),
        LOUPE_TLS_CERT=pki.server[0],
        LOUPE_TLS_KEY=pki.server[1],
        LOUPE_TLS_CA=pki.ca,
    )
    return {**env, **extra}


def health(port: int, tls: TLSSettings) -> str:
    with open_blocking_channel(f"127.0.0.1:{port}", tls) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        except grpc.RpcError as error:
            return str(error.code().name)  # type: ignore[attr-defined]
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def test_a_service_serves_mutual_tls_and_plaintext_health_for_probes(pki: Pki) -> None:
    ports = free_ports(3)
    process = subprocess.Popen(
        [sys.executable, "-m", "services.ranking"],
        cwd=ROOT,
        env=service_env(pki, ports),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while health(ports[2], TLSSettings()) != "SERVING":
            assert process.poll() is None, process.communicate()[0].decode()[-2000:]
            assert time.monotonic() < deadline, "no SERVING on the health port"
            time.sleep(0.3)
        # The health port serves health only.
        assert describe(ports[2], TLSSettings()) == "UNIMPLEMENTED"
        assert describe(ports[0], TLSSettings()) == "UNAVAILABLE"
        assert describe(ports[0], TLSSettings(True, ca=pki.ca)) == "UNAVAILABLE"
        assert describe(ports[0], TLSSettings(True, *pki.client, ca=pki.ca)) == "OK"
        assert health(ports[0], TLSSettings(True, *pki.client, ca=pki.ca)) == "SERVING"
    finally:
        process.terminate()
        output = process.communicate(timeout=60)[0].decode()
    listening = next(json.loads(line) for line in output.splitlines() if '"listening"' in line)
    assert (listening["tls"], listening["client_auth"]) == ("on", "require")


def test_a_service_with_a_bad_key_stops_at_start_up_naming_it(pki: Pki) -> None:
    env = service_env(pki, free_ports(3), LOUPE_TLS_KEY=pki.client[1])
    result = subprocess.run(
        [sys.executable, "-m", "services.ranking"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert f"LOUPE_TLS_KEY={pki.client[1]} is not the key of the certificate" in result.stderr


# --- settings, checked at start-up ---------------------------------------------------------------


def tls_env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for name in ("", "_CERT", "_KEY", "_CA", "_CLIENT_AUTH", "_SERVER_NAME"):
        monkeypatch.delenv(f"LOUPE_TLS{name}", raising=False)
    for name, value in values.items():
        monkeypatch.setenv(f"LOUPE_TLS{name}", value)


def test_tls_is_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch, pki: Pki) -> None:
    tls_env(monkeypatch)
    assert not TLSSettings.from_env().enabled
    tls_env(monkeypatch, _CERT=pki.server[0], _KEY=pki.server[1], _CA=pki.ca)
    on = TLSSettings.from_env()
    # A CA means callers must present a certificate from it, unless told otherwise.
    assert on.enabled and on.client_auth
    tls_env(monkeypatch, _CERT=pki.server[0], _KEY=pki.server[1], _CA=pki.ca, _CLIENT_AUTH="none")
    assert not TLSSettings.from_env().client_auth
    # off wins over every file.
    tls_env(monkeypatch, **{"": "off", "_CERT": "/nowhere", "_CA": "/nowhere"})
    assert not TLSSettings.from_env().enabled
    # on without files: a client that trusts the system's roots.
    tls_env(monkeypatch, **{"": "on"})
    assert TLSSettings.from_env() == TLSSettings(enabled=True)


def test_a_server_started_with_tls_settings_serves_them(
    monkeypatch: pytest.MonkeyPatch, pki: Pki
) -> None:
    tls_env(monkeypatch, _CERT=pki.server[0], _KEY=pki.server[1], _CA=pki.ca)
    settings = ServerSettings.from_env("ranking")
    assert settings.tls == backend_tls(pki)

    async def bind() -> int:
        server = grpc.aio.server()
        port = add_port(server, "127.0.0.1:0", settings.tls)
        await server.stop(None)
        return port

    assert asyncio.run(bind()) > 0


def test_bad_tls_settings_stop_a_server_with_the_variable_named(
    monkeypatch: pytest.MonkeyPatch, pki: Pki, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    expired_authority = certs.make_authority("expired CA")
    expired = certs.issue(expired_authority, "old", days=0)
    expired_cert, expired_key = _write(tmp_path, "expired", expired)
    encrypted = tmp_path / "encrypted.key"
    from cryptography.hazmat.primitives import serialization

    encrypted.write_bytes(
        certs.issue(expired_authority, "x").key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    cert, key = pki.server
    cases = [
        ({"_CERT": "/nowhere.crt", "_KEY": key}, "LOUPE_TLS_CERT=/nowhere.crt: cannot read it"),
        ({"_CERT": cert, "_KEY": "/nowhere.key"}, "LOUPE_TLS_KEY=/nowhere.key: cannot read it"),
        ({"_CERT": cert, "_KEY": key, "_CA": str(garbage)}, "no PEM certificate in it"),
        ({"_CERT": str(garbage), "_KEY": key}, "LOUPE_TLS_CERT="),
        ({"_CERT": cert, "_KEY": str(garbage)}, "not a PEM private key"),
        ({"_CERT": cert, "_KEY": pki.client[1]}, "is not the key of the certificate"),
        ({"_CERT": cert, "_KEY": str(encrypted)}, "the key is encrypted"),
        ({"_CERT": cert}, "LOUPE_TLS_CERT and LOUPE_TLS_KEY go together"),
        ({"_CERT": expired_cert, "_KEY": expired_key}, "expired on"),
        ({"_CERT": cert, "_KEY": key, "_CLIENT_AUTH": "require"}, "needs LOUPE_TLS_CA"),
        ({"_CERT": cert, "_KEY": key, "_CLIENT_AUTH": "maybe"}, "expected one of require, none"),
        ({"_CA": pki.ca}, "a server needs its certificate and key"),
        ({"": "on"}, "a server needs its certificate and key"),
        ({"": "sometimes"}, "LOUPE_TLS='sometimes': expected one of auto, on, off"),
    ]
    for values, message in cases:
        tls_env(monkeypatch, **values)
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            ServerSettings.from_env("retrieval")


# --- Redis over TLS ------------------------------------------------------------------------------


def test_rediss_urls_get_the_process_certificates(pki: Pki) -> None:
    tls = TLSSettings(True, *pki.client, ca=pki.ca)
    assert redis_tls_options("redis://r:6379/0", tls) == {}
    assert redis_tls_options("rediss://r:6379/0", TLSSettings()) == {}
    assert redis_tls_options("rediss://r:6379/0", tls) == {
        "ssl_cert_reqs": "required",
        "ssl_ca_certs": pki.ca,
        "ssl_certfile": pki.client[0],
        "ssl_keyfile": pki.client[1],
    }
    # What the URL says wins.
    assert "ssl_ca_certs" not in redis_tls_options("rediss://r/0?ssl_ca_certs=/etc/x.pem", tls)


# --- Triton --------------------------------------------------------------------------------------


class _Live(service_pb2_grpc.GRPCInferenceServiceServicer):
    async def ServerLive(self, request: object, context: object) -> service_pb2.ServerLiveResponse:
        return service_pb2.ServerLiveResponse(live=True)


def test_the_triton_client_presents_the_service_certificate(pki: Pki) -> None:
    """Triton with --grpc-use-ssl-mutual, stood in for by a server with the same TLS."""

    async def run() -> dict[str, str]:
        server = grpc.aio.server()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_Live(), server)
        port = add_port(server, "127.0.0.1:0", backend_tls(pki))
        await server.start()
        outcomes = {}
        try:
            for name, tls in {
                "certificate": TLSSettings(True, *pki.client, ca=pki.ca),
                "none": TLSSettings(True, ca=pki.ca),
                "plaintext": TLSSettings(),
            }.items():
                client = triton_client(f"127.0.0.1:{port}", tls)
                try:
                    outcomes[name] = str(await client.is_server_live(client_timeout=10))
                except Exception as error:  # tritonclient's own exception type
                    outcomes[name] = type(error).__name__
                finally:
                    await client.close()
        finally:
            await server.stop(None)
        return outcomes

    outcomes = asyncio.run(run())
    assert outcomes["certificate"] == "True"
    assert outcomes["none"] != "True" and outcomes["plaintext"] != "True"


# --- what `loupe up` makes -----------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_loupe_up_makes_its_certificates_once_and_owner_only(tmp_path: Path) -> None:
    assert local_tls.ensure_certificates(tmp_path) is True
    assert mode(local_tls.tls_dir(tmp_path)) == 0o700
    ca = local_tls.ca_path(tmp_path)
    for name in local_tls.NAMES:
        cert, key = local_tls.cert_path(tmp_path, name), local_tls.key_path(tmp_path, name)
        assert mode(key) == 0o600, name
        assert certs.signed_by(cert, ca), name
        issued = x509.load_pem_x509_certificate(cert.read_bytes())
        names = issued.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "localhost" in names.get_values_for_type(x509.DNSName)
        assert "127.0.0.1" in {str(a) for a in names.get_values_for_type(x509.IPAddress)}
    assert not list(tmp_path.rglob("ca.key")), "the CA's key is not kept"
    before = {p.name: p.read_bytes() for p in local_tls.tls_dir(tmp_path).iterdir()}
    # A restart reuses them.
    assert local_tls.ensure_certificates(tmp_path) is False
    assert before == {p.name: p.read_bytes() for p in local_tls.tls_dir(tmp_path).iterdir()}
    # One missing: the whole set is made again (the CA's key is gone, so is the old CA).
    local_tls.key_path(tmp_path, "retrieval").unlink()
    assert local_tls.ensure_certificates(tmp_path) is True
    assert ca.read_bytes() != before["ca.crt"]
    for name in local_tls.NAMES:
        assert certs.signed_by(local_tls.cert_path(tmp_path, name), ca), name


def test_certificates_about_to_expire_are_made_again(tmp_path: Path) -> None:
    local_tls.ensure_certificates(tmp_path)
    authority = certs.make_authority("old")
    local_tls.ca_path(tmp_path).write_bytes(authority.pem)
    for name in local_tls.NAMES:
        certs.write_issued(
            certs.issue(authority, name, days=local_tls.RENEW_DAYS - 1),
            local_tls.cert_path(tmp_path, name),
            local_tls.key_path(tmp_path, name),
        )
    assert local_tls.ensure_certificates(tmp_path) is True
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=60)
    assert certs.expires(local_tls.cert_path(tmp_path, "gateway")) > soon


def test_each_service_of_the_stack_gets_its_own_certificate(tmp_path: Path) -> None:
    for name in ("detection", "embedding", "retrieval", "ranking"):
        env = local_tls.service_env(tmp_path, name)
        assert env["LOUPE_TLS_CERT"].endswith(f"tls/{name}.crt")
        assert env["LOUPE_TLS_CLIENT_AUTH"] == "require", name
    assert local_tls.service_env(tmp_path, "gateway")["LOUPE_TLS_CLIENT_AUTH"] == "none"
    assert local_tls.plaintext_env()["LOUPE_TLS"] == "off"


def test_the_redis_password_is_made_once_and_owner_only(tmp_path: Path) -> None:
    password = local_tls.ensure_redis_password(tmp_path)
    assert len(password) >= 32
    assert local_tls.ensure_redis_password(tmp_path) == password
    assert mode(local_tls.redis_password_path(tmp_path)) == 0o600
    config = local_tls.redis_config(tmp_path, password)
    assert mode(config) == 0o600 and password in config.read_text()


def test_the_cli_trusts_the_local_ca_for_that_stack_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls_env(monkeypatch)
    StackState(
        str(tmp_path), "127.0.0.1:7001", [Process("gateway", os.getpid(), 7001, 0)], tls=True
    ).save()
    local = cli_client.client_tls("localhost:7001", tmp_path)
    assert local == local_tls.client_settings(tmp_path)
    assert not cli_client.client_tls("example.com:7001", tmp_path).enabled
    assert not cli_client.client_tls("127.0.0.1:7002", tmp_path).enabled
    # LOUPE_TLS_* of one's own win, and LOUPE_TLS=off is plaintext even to the local stack.
    monkeypatch.setenv("LOUPE_TLS", "off")
    assert not cli_client.client_tls("127.0.0.1:7001", tmp_path).enabled
    monkeypatch.setenv("LOUPE_TLS", "on")
    assert cli_client.client_tls("127.0.0.1:7001", tmp_path) == TLSSettings(enabled=True)
    # A stack started with LOUPE_TLS=off is called in plaintext.
    monkeypatch.delenv("LOUPE_TLS")
    StackState(str(tmp_path), "127.0.0.1:7001", [Process("gateway", os.getpid(), 7001, 0)]).save()
    assert not cli_client.client_tls("127.0.0.1:7001", tmp_path).enabled
