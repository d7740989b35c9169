"""The Anthropic reachability probe behind /readyz: any HTTP answer below 500 is
reachable, a refused connection or a 5xx is not, and answers are cached."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from aos_plumbing.reachability import AnthropicProbe
from tests.support.http import serve_on_loopback
from tests.support.processes import free_port


class ModelsEndpoint:
    def __init__(self) -> None:
        self.status = 401
        self.keys: list[str] = []
        self.port = 0

    async def models(self, request: web.Request) -> web.Response:
        self.keys.append(request.headers.get("x-api-key", ""))
        return web.json_response({"type": "error"}, status=self.status)


@pytest.fixture
async def endpoint() -> AsyncIterator[ModelsEndpoint]:
    served = ModelsEndpoint()
    app = web.Application()
    app.router.add_get("/v1/models", served.models)
    runner, served.port = await serve_on_loopback(app)
    yield served
    await runner.cleanup()


@pytest.mark.parametrize(
    ("status", "reachable"), [(200, True), (401, True), (404, True), (503, False)]
)
async def test_an_answer_below_500_is_reachable(
    endpoint: ModelsEndpoint, status: int, reachable: bool
) -> None:
    endpoint.status = status
    probe = AnthropicProbe("sk-test", f"http://127.0.0.1:{endpoint.port}", ttl_s=0)
    assert await probe.check() is reachable
    assert endpoint.keys == ["sk-test"]


async def test_a_refused_connection_is_unreachable() -> None:
    probe = AnthropicProbe("sk-test", f"http://127.0.0.1:{free_port()}", ttl_s=0)
    assert await probe.check() is False


async def test_answers_are_cached_for_the_ttl(endpoint: ModelsEndpoint) -> None:
    probe = AnthropicProbe("sk-test", f"http://127.0.0.1:{endpoint.port}/")
    assert await probe.check() and await probe.check() and await probe.check()
    assert probe.requests == 1 and len(endpoint.keys) == 1
    probe.ttl_s = 0  # expired: the next check asks again
    endpoint.status = 500
    assert await probe.check() is False
    assert probe.requests == 2
