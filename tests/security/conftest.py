"""The bus as a trust boundary: forgeries published raw with nats-py, as a hostile tenant
would, against the four services as processes (auth off: the structural checks alone)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from aos_cli.embedded import InfraUrls
from tests.support.http import serving_every_path
from tests.system.conftest import System, make_system, running


class SideEffects:
    """A loopback HTTP server that counts every request: the effect a forged step would
    have. Zero requests is the proof that nothing ran."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(request.path_qs)
        return web.json_response({"ok": True})


@pytest.fixture
async def effects() -> AsyncIterator[SideEffects]:
    server = SideEffects()
    async with serving_every_path(server.handle) as port:
        server.url = f"http://127.0.0.1:{port}"
        yield server


@pytest.fixture
def open_system(infra: InfraUrls, namespace: str, database: str, log_dir: Path) -> Iterator[System]:
    """The four services with auth off (the embedded default), and http_call allowed to
    reach loopback, so that a forged step *could* reach `effects` if the bus let it."""
    services = make_system(
        infra, namespace, database, log_dir, {"AOS_HTTP_ALLOW_HOSTS": "127.0.0.1"}
    )
    with running(services):
        yield services
