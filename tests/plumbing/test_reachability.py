"""The Anthropic reachability probe behind /readyz: any HTTP answer below 500 is
reachable, a refused connection or a 5xx is not, and answers are cached."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from aiohttp import web

from aos_plumbing.http import ServiceHttp
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
    ("status", "reachable"), [(200, True), (401, True), (404, True), (501, False), (503, False)]
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


async def test_an_unreachable_endpoint_is_degraded_never_not_ready(
    endpoint: ModelsEndpoint,
) -> None:
    """A Messages API server without a models endpoint answers 501: the service says
    Claude is degraded, and why, and stays ready for the work that does not need it."""
    endpoint.status = 501
    probe = AnthropicProbe("sk-test", f"http://127.0.0.1:{endpoint.port}", ttl_s=0)
    http = ServiceHttp("executor", "127.0.0.1", free_port())

    async def nats_up() -> bool:
        return True

    http.add_check("nats", nats_up)
    http.add_advisory("anthropic", probe.problem)
    await http.start()
    try:
        async with httpx.AsyncClient() as client:
            answer = await client.get(f"http://127.0.0.1:{http.port}/readyz")
            assert answer.status_code == 200
            body = answer.json()
            assert body["ready"] is True
            assert body["checks"] == {"nats": True}
            assert body["advisories"] == {"anthropic": False}
            assert body["degraded"] == {
                "anthropic": f"GET http://127.0.0.1:{endpoint.port}/v1/models answered 501"
            }
            endpoint.status = 401  # a key it does not know: but it is there
            body = (await client.get(f"http://127.0.0.1:{http.port}/readyz")).json()
            assert body["advisories"] == {"anthropic": True} and body["degraded"] == {}
    finally:
        await http.stop()
