"""API keys at the gateway: a real gRPC server on loopback with the gateway's interceptors
(metrics, then authentication) in front of a stand-in servicer, so that what is tested is who
gets through, not what the backends answer."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import REGISTRY

from loupe.v1 import detection_pb2, gateway_pb2, gateway_pb2_grpc
from services.cli import main as cli
from services.cli.client import with_key
from services.cli.stack import (
    StackState,
    ensure_local_key,
    keys_file_path,
    local_api_key,
    local_key_path,
)
from services.common.config import ConfigError
from services.gateway import api_keys, auth
from services.gateway.api_keys import ApiKey, KeyFileError
from services.gateway.settings import GatewaySettings
from tests.support import free_ports, serving

# Long enough to be sure the poller ran several times on a loaded machine.
RELOAD_SECONDS = 0.1
ROTATION_DEADLINE_SECONDS = 10.0


class StandIn(gateway_pb2_grpc.GatewayServicer):
    """Answers every gateway RPC at once with an empty reply."""

    async def Index(self, request, context):  # type: ignore[no-untyped-def]
        return gateway_pb2.IndexResponse(item_id=request.item_id, indexed=True)

    async def IndexStream(self, request_iterator, context):  # type: ignore[no-untyped-def]
        results = [
            gateway_pb2.IndexResult(
                item_id=request.item_id,
                response=gateway_pb2.IndexResponse(item_id=request.item_id, indexed=True),
            )
            async for request in request_iterator
        ]
        return gateway_pb2.IndexStreamResponse(results=results, indexed=len(results))

    async def Delete(self, request, context):  # type: ignore[no-untyped-def]
        return gateway_pb2.DeleteResponse(deleted=True)

    async def Get(self, request, context):  # type: ignore[no-untyped-def]
        return gateway_pb2.GetResponse(item_id=request.item_id)

    async def Search(self, request, context):  # type: ignore[no-untyped-def]
        return gateway_pb2.SearchResponse()

    async def Detect(self, request, context):  # type: ignore[no-untyped-def]
        return detection_pb2.DetectResponse()

    async def ListCatalogs(self, request, context):  # type: ignore[no-untyped-def]
        return gateway_pb2.ListCatalogsResponse()

    async def DropCatalog(self, request, context):  # type: ignore[no-untyped-def]
        return gateway_pb2.DropCatalogResponse(dropped=True)

    async def AugmentCatalog(self, request, context):  # type: ignore[no-untyped-def]
        return gateway_pb2.AugmentCatalogResponse(items=1, seconds=1.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class StandInGateway:
    """The Service protocol, as GatewayService has it: the auth interceptor from the settings."""

    name = "gateway"
    grpc_services = [auth.GATEWAY]

    def __init__(self, keys_file: Path, clock: Callable[[], float]) -> None:
        self.auth = auth.AuthInterceptor(
            auth.KeyFile(keys_file, RELOAD_SECONDS), auth.RateLimits(clock)
        )

    def register(self, server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_GatewayServicer_to_server(StandIn(), server)
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [self.auth]

    async def start(self) -> None:
        self.auth.start()

    async def close(self) -> None:
        await self.auth.close()


@dataclass
class Gateway:
    channel: grpc.Channel
    address: str
    keys_file: Path
    clock: Clock
    keys: dict[str, str]  # name -> key

    def stub(self, key: str | None = None) -> gateway_pb2_grpc.GatewayStub:
        return gateway_pb2_grpc.GatewayStub(with_key(self.channel, key or ""))


def make_keys(*specs: tuple[str, str, float]) -> tuple[list[ApiKey], dict[str, str]]:
    keys, secrets = [], {}
    for name, role, rate in specs:
        secrets[name] = api_keys.new_key()
        keys.append(ApiKey(name, role, api_keys.hash_key(secrets[name]), rate=rate))
    return keys, secrets


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    keys, secrets = make_keys(
        ("reader", "read", 0), ("writer", "write", 0), ("root", "admin", 0), ("slow", "read", 1)
    )
    keys_file = tmp_path / "api-keys.jsonl"
    api_keys.write(keys_file, keys)
    clock = Clock()
    (port,) = free_ports(1)
    with serving(StandInGateway(keys_file, clock), port) as channel:
        yield Gateway(channel, f"127.0.0.1:{port}", keys_file, clock, secrets)


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def auth_count(key: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "loupe_gateway_auth_requests_total", {"key": key, "outcome": outcome}
    )
    return value or 0.0


def wait_until(condition: Callable[[], bool], seconds: float = ROTATION_DEADLINE_SECONDS) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


# ---- roles ------------------------------------------------------------------------------


def test_every_gateway_method_has_a_role() -> None:
    methods = {m.name for m in gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].methods}
    assert set(auth.METHOD_ROLES) == methods
    assert set(auth.METHOD_ROLES.values()) <= set(api_keys.ROLES)


def test_a_call_without_a_key_is_unauthenticated(gateway: Gateway) -> None:
    before = auth_count("-", "no_key")
    code, message = code_of(lambda: gateway.stub().Search(gateway_pb2.SearchRequest()))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "no API key" in message and "authorization: Bearer" in message
    assert auth_count("-", "no_key") == before + 1


def test_an_unknown_or_malformed_key_is_unauthenticated(gateway: Gateway) -> None:
    before = auth_count("-", "unknown_key")
    code, message = code_of(lambda: gateway.stub("loupe_nope").Search(gateway_pb2.SearchRequest()))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "not recognised" in message and "loupe_nope" not in message
    assert auth_count("-", "unknown_key") == before + 1
    basic = (("authorization", f"Basic {gateway.keys['reader']}"),)
    code, message = code_of(
        lambda: gateway.stub().Search(gateway_pb2.SearchRequest(), metadata=basic)
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in message


def test_x_api_key_metadata_is_accepted(gateway: Gateway) -> None:
    metadata = (("x-api-key", gateway.keys["reader"]),)
    gateway.stub().Search(gateway_pb2.SearchRequest(), metadata=metadata)


def test_health_needs_no_key(gateway: Gateway) -> None:
    reply = health_pb2_grpc.HealthStub(gateway.channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_read_key_reads_and_is_refused_writes(gateway: Gateway) -> None:
    stub = gateway.stub(gateway.keys["reader"])
    before = auth_count("reader", "ok")
    stub.Search(gateway_pb2.SearchRequest())
    stub.Get(gateway_pb2.GetRequest(item_id="a"))
    stub.Detect(detection_pb2.DetectRequest())
    stub.ListCatalogs(gateway_pb2.ListCatalogsRequest())
    assert auth_count("reader", "ok") == before + 4

    denied = auth_count("reader", "permission_denied")
    code, message = code_of(lambda: stub.Index(gateway_pb2.IndexRequest(item_id="a")))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert message == "Index needs role write or above; key 'reader' has role read"
    code, _ = code_of(lambda: stub.Delete(gateway_pb2.DeleteRequest(item_id="a")))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    code, _ = code_of(lambda: stub.IndexStream(iter([gateway_pb2.IndexRequest(item_id="a")])))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert auth_count("reader", "permission_denied") == denied + 3


def test_write_key_writes_and_is_refused_catalogue_admin(gateway: Gateway) -> None:
    stub = gateway.stub(gateway.keys["writer"])
    assert stub.Index(gateway_pb2.IndexRequest(item_id="a")).indexed
    requests = [gateway_pb2.IndexRequest(item_id=str(i)) for i in range(3)]
    assert stub.IndexStream(iter(requests)).indexed == 3
    assert stub.Delete(gateway_pb2.DeleteRequest(item_id="a")).deleted
    stub.Search(gateway_pb2.SearchRequest())
    code, message = code_of(lambda: stub.DropCatalog(gateway_pb2.DropCatalogRequest(catalog="x")))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "needs role admin" in message and "'writer' has role write" in message
    code, _ = code_of(lambda: stub.AugmentCatalog(gateway_pb2.AugmentCatalogRequest(catalog="x")))
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_admin_key_may_do_everything(gateway: Gateway) -> None:
    stub = gateway.stub(gateway.keys["root"])
    assert stub.DropCatalog(gateway_pb2.DropCatalogRequest(catalog="x")).dropped
    assert stub.AugmentCatalog(gateway_pb2.AugmentCatalogRequest(catalog="x")).items == 1
    assert stub.Index(gateway_pb2.IndexRequest(item_id="a")).indexed
    stub.Search(gateway_pb2.SearchRequest())


def test_a_refused_call_is_counted_with_its_code_by_the_metrics_interceptor(
    gateway: Gateway,
) -> None:
    labels = {"service": "gateway", "method": "DropCatalog", "code": "PERMISSION_DENIED"}
    before = REGISTRY.get_sample_value("loupe_grpc_requests_total", labels) or 0.0
    stub = gateway.stub(gateway.keys["reader"])
    code_of(lambda: stub.DropCatalog(gateway_pb2.DropCatalogRequest(catalog="x")))
    # abort() sends the status before the interceptor's bookkeeping runs: a moment later.
    assert wait_until(
        lambda: REGISTRY.get_sample_value("loupe_grpc_requests_total", labels) == before + 1
    )


# ---- rate limits --------------------------------------------------------------------------


def test_a_key_over_its_rate_is_told_when_to_retry(gateway: Gateway) -> None:
    stub = gateway.stub(gateway.keys["slow"])
    # 1 request/s, burst 1; the clock stands still until the test moves it.
    stub.Search(gateway_pb2.SearchRequest())
    before = auth_count("slow", "rate_limited")
    with pytest.raises(grpc.RpcError) as refused:
        stub.Search(gateway_pb2.SearchRequest())
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over its rate limit (1 requests/s, burst 1): retry in 1.000 s" in (
        refused.value.details() or ""
    )
    assert dict(refused.value.trailing_metadata() or ())[auth.RETRY_AFTER] == "1000"
    assert auth_count("slow", "rate_limited") == before + 1
    # Other keys are not held back by it.
    gateway.stub(gateway.keys["reader"]).Search(gateway_pb2.SearchRequest())
    gateway.clock.now += 0.5
    code, message = code_of(lambda: stub.Search(gateway_pb2.SearchRequest()))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry in 0.500 s" in message
    gateway.clock.now += 0.5
    stub.Search(gateway_pb2.SearchRequest())


def test_token_bucket_allows_its_burst_then_its_rate() -> None:
    clock = Clock()
    limits = auth.RateLimits(clock)
    key = ApiKey("k", "read", "0" * 64, rate=10, burst=3)
    assert [limits.wait(key) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limits.wait(key) == pytest.approx(0.1)
    clock.now += 0.1
    assert limits.wait(key) == 0.0
    assert limits.wait(ApiKey("free", "read", "1" * 64)) == 0.0
    # A lower limit from a reloaded file takes effect at once, within its burst.
    clock.now += 10
    slower = ApiKey("k", "read", "0" * 64, rate=1, burst=1)
    assert limits.wait(slower) == 0.0
    assert limits.wait(slower) == pytest.approx(1.0)


# ---- rotation -----------------------------------------------------------------------------


def test_rewritten_file_takes_effect_without_restart(gateway: Gateway) -> None:
    old = gateway.keys["reader"]
    gateway.stub(old).Search(gateway_pb2.SearchRequest())
    keys, secrets = make_keys(("reader-2", "read", 0))
    reloads = REGISTRY.get_sample_value("loupe_gateway_api_key_reloads_total", {"outcome": "ok"})
    api_keys.write(gateway.keys_file, keys)

    def new_works() -> bool:
        request = gateway_pb2.SearchRequest()
        return code_of(lambda: gateway.stub(secrets["reader-2"]).Search(request))[0] == (
            grpc.StatusCode.OK
        )

    started = time.monotonic()
    assert wait_until(new_works), "the new key was not accepted in time"
    assert time.monotonic() - started < ROTATION_DEADLINE_SECONDS
    code, _ = code_of(lambda: gateway.stub(old).Search(gateway_pb2.SearchRequest()))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    after = REGISTRY.get_sample_value("loupe_gateway_api_key_reloads_total", {"outcome": "ok"})
    assert after == (reloads or 0) + 1
    assert REGISTRY.get_sample_value("loupe_gateway_api_keys") == 1


def test_a_bad_file_on_reload_keeps_the_previous_keys(gateway: Gateway) -> None:
    errors = (
        REGISTRY.get_sample_value("loupe_gateway_api_key_reloads_total", {"outcome": "error"})
        or 0.0
    )
    gateway.keys_file.write_text('{"name": "half-writ')
    assert wait_until(
        lambda: (
            (
                REGISTRY.get_sample_value(
                    "loupe_gateway_api_key_reloads_total", {"outcome": "error"}
                )
                or 0.0
            )
            > errors
        )
    )
    gateway.stub(gateway.keys["reader"]).Search(gateway_pb2.SearchRequest())
    gateway.keys_file.write_text("")  # truncated: refused too
    time.sleep(5 * RELOAD_SECONDS)
    gateway.stub(gateway.keys["root"]).DropCatalog(gateway_pb2.DropCatalogRequest(catalog="x"))


def test_kubernetes_secret_volume_update_is_picked_up(tmp_path: Path) -> None:
    """A Secret volume: FILE -> ..data/FILE, ..data -> a timestamped directory; an update
    writes a new directory and swaps ..data in one rename."""
    volume = tmp_path / "secret"
    first, second = volume / "..2024_01_01", volume / "..2024_01_02"
    first.mkdir(parents=True)
    second.mkdir()
    keys, secrets = make_keys(("old", "read", 0))
    api_keys.write(first / "api-keys.jsonl", keys)
    (volume / "..data").symlink_to(first.name)
    (volume / "api-keys.jsonl").symlink_to("..data/api-keys.jsonl")
    new_keys, new_secrets = make_keys(("new", "read", 0))
    api_keys.write(second / "api-keys.jsonl", new_keys)
    (port,) = free_ports(1)
    service = StandInGateway(volume / "api-keys.jsonl", Clock())
    with serving(service, port) as channel:
        stub = gateway_pb2_grpc.GatewayStub(with_key(channel, secrets["old"]))
        stub.Search(gateway_pb2.SearchRequest())
        (volume / "..data_tmp").symlink_to(second.name)
        os.replace(volume / "..data_tmp", volume / "..data")
        new = gateway_pb2_grpc.GatewayStub(with_key(channel, new_secrets["new"]))
        assert wait_until(
            lambda: (
                code_of(lambda: new.Search(gateway_pb2.SearchRequest()))[0] == grpc.StatusCode.OK
            )
        )
        code, _ = code_of(lambda: stub.Search(gateway_pb2.SearchRequest()))
        assert code == grpc.StatusCode.UNAUTHENTICATED


# ---- start-up -----------------------------------------------------------------------------


def gateway_env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for name in [n for n in os.environ if n.startswith("LOUPE_")]:
        monkeypatch.delenv(name)
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_keys_are_required_unless_open_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    gateway_env(monkeypatch)
    with pytest.raises(ConfigError, match="LOUPE_API_KEYS_FILE is not set.*LOUPE_AUTH=open"):
        GatewaySettings.from_env()
    gateway_env(monkeypatch, LOUPE_AUTH="none")
    with pytest.raises(ConfigError, match="LOUPE_AUTH='none': expected one of keys, open"):
        GatewaySettings.from_env()
    gateway_env(monkeypatch, LOUPE_AUTH="open")
    settings = GatewaySettings.from_env()
    assert auth.from_settings(settings) is None


def test_a_missing_or_bad_keys_file_stops_start_up(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "nope.jsonl"
    gateway_env(monkeypatch, LOUPE_API_KEYS_FILE=str(missing))
    settings = GatewaySettings.from_env()
    with pytest.raises(ConfigError, match="no such file"):
        auth.from_settings(settings)
    missing.write_text('# keys\n{"name": "a", "role": "reader", "sha256": "' + "0" * 64 + '"}\n')
    with pytest.raises(ConfigError, match=r"line 2: key 'a': role 'reader': expected one of"):
        auth.from_settings(settings)


def test_the_gateway_service_returns_the_auth_interceptor(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from services.gateway.service import GatewayService

    keys, _ = make_keys(("a", "read", 0))
    api_keys.write(tmp_path / "keys.jsonl", keys)

    async def interceptors(**env: str) -> list[grpc.aio.ServerInterceptor]:
        gateway_env(monkeypatch, LOUPE_REDIS_URL="", **env)
        service = GatewayService(GatewaySettings.from_env())
        try:
            return service.interceptors()
        finally:
            await service.close()

    guarded = asyncio.run(interceptors(LOUPE_API_KEYS_FILE=str(tmp_path / "keys.jsonl")))
    assert [type(i) for i in guarded] == [auth.AuthInterceptor]
    assert asyncio.run(interceptors(LOUPE_AUTH="open")) == []


# ---- the keys file ------------------------------------------------------------------------


def test_keys_file_parsing() -> None:
    digest = "a" * 64
    good = (
        "# a comment\n\n"
        + json.dumps({"name": "ci", "role": "write", "sha256": digest, "rate": 5})
        + "\n"
    )
    (key,) = api_keys.parse(good, "f")
    assert (key.name, key.role, key.rate, key.limit_burst) == ("ci", "write", 5.0, 5)
    assert api_keys.parse("# nothing yet\n", "f") == []
    cases = {
        "": "empty",
        "not json": "line 1: not JSON",
        json.dumps({"name": "x", "role": "read", "sha256": "A" * 64}): "64 lower-case hex",
        json.dumps({"name": "x", "role": "read", "sha256": digest, "rte": 1}): "unknown field",
        json.dumps({"name": "a b", "role": "read", "sha256": digest}): "key name 'a b'",
        json.dumps({"name": "x", "role": "read", "sha256": digest, "burst": 2}): "burst without",
        json.dumps({"name": "x", "role": "read", "sha256": digest, "rate": -1}): "rate -1",
        json.dumps({"role": "read", "sha256": digest}): "missing 'name'",
    }
    for text, problem in cases.items():
        with pytest.raises(KeyFileError, match=problem):
            api_keys.parse(text, "f")
    line = json.dumps({"name": "x", "role": "read", "sha256": digest})
    with pytest.raises(KeyFileError, match="line 2: a second key named 'x'"):
        api_keys.parse(line + "\n" + line, "f")
    other = json.dumps({"name": "y", "role": "read", "sha256": digest})
    with pytest.raises(KeyFileError, match="same sha256"):
        api_keys.parse(line + "\n" + other, "f")


def test_presented_key() -> None:
    assert auth.presented_key((("authorization", "Bearer abc"),)) == "abc"
    assert auth.presented_key((("authorization", "bearer  abc "),)) == "abc"
    assert auth.presented_key((("authorization", "Basic abc"),)) == ""
    assert auth.presented_key((("x-api-key", "abc"),)) == "abc"
    assert auth.presented_key((("user-agent", "x"),)) is None
    assert auth.presented_key(None) is None


# ---- the CLI ------------------------------------------------------------------------------


def test_loupe_up_makes_an_owner_only_admin_key_once(tmp_path: Path) -> None:
    keys_path = ensure_local_key(tmp_path)
    key = local_api_key(tmp_path)
    assert key.startswith(api_keys.KEY_PREFIX) and len(key) > 40
    for path in (keys_path, local_key_path(tmp_path)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    (local,) = api_keys.load(keys_path)
    assert (local.name, local.role, local.sha256) == ("local", "admin", api_keys.hash_key(key))
    assert key not in keys_path.read_text()
    # Again (every `loupe up`): the same key; a lost keys file gets the same key back.
    ensure_local_key(tmp_path)
    assert local_api_key(tmp_path) == key
    keys_path.unlink()
    ensure_local_key(tmp_path)
    assert api_keys.load(keys_path)[0].sha256 == api_keys.hash_key(key)


def test_loupe_keys_create_list_rotate_revoke(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys_file = tmp_path / "k.jsonl"
    assert cli.main(["keys", "create", "ci", "--role", "write", "--rate", "5", "--keys-file",
                     str(keys_file)]) == 0  # fmt: skip
    out = capsys.readouterr()
    key = out.out.strip()
    assert key.startswith("loupe_") and "only time the key is shown" in out.err
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    (ci,) = api_keys.load(keys_file)
    assert (ci.name, ci.role, ci.rate, ci.sha256) == ("ci", "write", 5.0, api_keys.hash_key(key))
    assert key not in keys_file.read_text()

    assert cli.main(["keys", "create", "ci", "--role", "read", "--keys-file", str(keys_file)]) == 1
    assert "exists" in capsys.readouterr().err
    assert cli.main(["keys", "create", "x", "--keys-file", str(keys_file)]) == 1
    assert "needs --role" in capsys.readouterr().err

    assert cli.main(["keys", "list", "--json", "--keys-file", str(keys_file)]) == 0
    (listed,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert listed["name"] == "ci" and listed["role"] == "write" and key not in json.dumps(listed)

    assert cli.main(["keys", "rotate", "ci", "--keys-file", str(keys_file)]) == 0
    rotated = capsys.readouterr().out.strip()
    assert rotated != key
    (ci,) = api_keys.load(keys_file)
    assert (ci.role, ci.rate, ci.sha256) == ("write", 5.0, api_keys.hash_key(rotated))

    assert cli.main(["keys", "revoke", "ci", "--keys-file", str(keys_file)]) == 0
    assert api_keys.load(keys_file) == []
    assert cli.main(["keys", "revoke", "ci", "--keys-file", str(keys_file)]) == 1


def test_cli_sends_the_key_from_the_environment_the_flag_or_the_local_stack(
    gateway: Gateway,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("LOUPE_API_KEY", raising=False)
    monkeypatch.delenv("LOUPE_GATEWAY", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./.loupe here
    search = ["search", "--item", "a", "--gateway", gateway.address, "--json"]
    assert cli.main(search) == 1
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["code"] == "UNAUTHENTICATED" and "no API key" in error["message"]

    monkeypatch.setenv("LOUPE_API_KEY", gateway.keys["reader"])
    assert cli.main(search) == 0
    assert json.loads(capsys.readouterr().out)["query"] == "a"
    delete = ["delete", "a", "--gateway", gateway.address]
    assert cli.main(delete) == 1
    assert "PERMISSION_DENIED: Delete needs role write" in capsys.readouterr().err
    # The flag wins over the environment; a stream (IndexStream) carries the key too.
    assert cli.main([*delete, "--api-key", gateway.keys["writer"]]) == 0
    (tmp_path / "a.jpg").write_bytes(b"an image, as far as a stand-in can tell")
    index = ["index", str(tmp_path / "a.jpg"), "--gateway", gateway.address, "--quiet"]
    assert cli.main([*index, "--api-key", gateway.keys["writer"]]) == 0
    assert "indexed 1 of 1 files" in capsys.readouterr().err

    # The local stack's own key, for its gateway only (./.loupe, as `loupe up` leaves it).
    monkeypatch.delenv("LOUPE_API_KEY")
    data_dir = tmp_path / ".loupe"
    ensure_local_key(data_dir)
    keys = api_keys.load(gateway.keys_file)
    local = api_keys.load(keys_file_path(data_dir))
    api_keys.write(gateway.keys_file, [*keys, *local])
    StackState(str(data_dir), gateway.address, []).save()
    listing = ["catalogs", "list", "--gateway", gateway.address]
    assert wait_until(lambda: cli.main(listing) == 0)
    capsys.readouterr()
    port = gateway.address.rpartition(":")[2]
    elsewhere = ["catalogs", "list", "--gateway", f"localhost:{port}"]
    assert cli.main(elsewhere) == 0  # the same gateway by another name
    StackState(str(data_dir), "127.0.0.1:1", []).save()
    assert cli.main(listing) == 1  # another gateway: the local key is not sent
    assert "no API key" in capsys.readouterr().err
