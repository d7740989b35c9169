"""http_call connects to the address the SSRF guard checked, not to a second DNS answer."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpcore
import pytest
from aiohttp import web

from aos_contracts.skills import HttpCallParams
from aos_executor.skills import HttpCallSkill, SkillContext
from aos_executor.skills.guard import HostPolicy
from tests.support.http import serve_on_loopback


@pytest.fixture
async def origin() -> AsyncIterator[tuple[int, list[str]]]:
    """An HTTP server on 127.0.0.1 that answers with the Host header it received."""
    hosts: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        hosts.append(request.headers.get("Host", ""))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/", handle)
    runner, port = await serve_on_loopback(app)
    try:
        yield port, hosts
    finally:
        await runner.cleanup()


async def test_the_connection_goes_to_the_checked_address_with_the_name_as_host(
    origin: tuple[int, list[str]],
) -> None:
    port, hosts = origin
    lookups: list[str] = []

    async def dns(host: str, _port: int) -> list[str]:
        # What the guard is told. The system resolver knows no such name, so the call
        # succeeds only if it connects to this answer instead of resolving again.
        lookups.append(host)
        return ["127.0.0.1"]

    skill = HttpCallSkill(policy=HostPolicy(False, ("127.0.0.0/8",), resolver=dns))
    try:
        params = HttpCallParams(url=f"http://service.invalid:{port}/")
        result = await skill.run(params, SkillContext.detached("http_call"))
    finally:
        await skill.aclose()
    assert result.output["status"] == 200 and result.output["body"] == {"ok": True}
    assert result.output["url"] == f"http://service.invalid:{port}/"
    assert lookups == ["service.invalid"]  # resolved once, by the guard
    assert hosts == [f"service.invalid:{port}"]


async def test_a_host_the_guard_never_checked_is_not_connected_to() -> None:
    skill = HttpCallSkill()
    try:
        stream = skill.backend_pins.connect_tcp("unchecked.invalid", 80)
        with pytest.raises(httpcore.ConnectError, match="not checked by the SSRF guard"):
            await stream
    finally:
        await skill.aclose()
