"""HTTP servers for tests: an aiohttp app on 127.0.0.1, on a free port."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def serve_on_loopback(app: web.Application) -> tuple[web.AppRunner, int]:
    """Start `app` on 127.0.0.1 on a port the system picks; the runner (its `cleanup()`
    stops the server) and the port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = int(runner.addresses[0][1])
    return runner, port


@contextlib.asynccontextmanager
async def serving_every_path(handle: Handler) -> AsyncIterator[int]:
    """`handle` answering every method on every path, on 127.0.0.1; yields the port and
    stops the server when the block ends."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner, port = await serve_on_loopback(app)
    try:
        yield port
    finally:
        await runner.cleanup()
