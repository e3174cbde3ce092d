"""What the gateway remembers about its backends (model versions, index kind)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.gateway import backends as backends_module
from services.gateway.backends import Backends, RequestError
from services.gateway.settings import GatewaySettings


def run_with_backends(scenario):  # type: ignore[no-untyped-def]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LOUPE_AUTH", "open")  # the keys file is no concern here
        settings = GatewaySettings.from_env()

    async def wrapper() -> None:
        backends = Backends(settings)
        try:
            await scenario(backends)
        finally:
            await backends.close()

    asyncio.run(wrapper())


class Answers:
    """Stands in for a backend call: answers in turn, or fails when told to."""

    def __init__(self) -> None:
        self.calls = 0
        self.failing = False

    async def __call__(self) -> int:
        self.calls += 1
        if self.failing:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "down")
        return self.calls


def test_an_answer_is_reused_within_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(backends: Backends) -> None:
        fetch = Answers()
        assert await backends._remembered("x", fetch) == 1
        assert await backends._remembered("x", fetch) == 1
        assert fetch.calls == 1
        monkeypatch.setattr(backends_module, "REMEMBER_SECONDS", 0.0)
        assert await backends._remembered("x", fetch) == 2

    run_with_backends(scenario)


def test_a_failed_refresh_keeps_the_last_answer_and_waits_before_retrying(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def scenario(backends: Backends) -> None:
        fetch = Answers()
        assert await backends._remembered("x", fetch) == 1
        monkeypatch.setattr(backends_module, "REMEMBER_SECONDS", 0.0)
        fetch.failing = True
        assert await backends._remembered("x", fetch) == 1
        monkeypatch.setattr(backends_module, "REMEMBER_SECONDS", 60.0)
        assert await backends._remembered("x", fetch) == 1
        assert fetch.calls == 2  # the failure was remembered too: no retry per request

    run_with_backends(scenario)


def test_with_nothing_remembered_a_failure_is_the_callers_error() -> None:
    async def scenario(backends: Backends) -> None:
        fetch = Answers()
        fetch.failing = True
        with pytest.raises(RequestError) as error:
            await backends._remembered("x", fetch)
        assert error.value.code == grpc.StatusCode.UNAVAILABLE

    run_with_backends(scenario)
