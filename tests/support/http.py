"""HTTP servers for tests: an aiohttp app on 127.0.0.1, on a free port."""

from __future__ import annotations

from aiohttp import web


async def serve_on_loopback(app: web.Application) -> tuple[web.AppRunner, int]:
    """Start `app` on 127.0.0.1 on a port the system picks; the runner (its `cleanup()`
    stops the server) and the port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = int(runner.addresses[0][1])
    return runner, port
