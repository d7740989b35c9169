"""Run a service until SIGTERM/SIGINT, then shut it down in order.

A service is an object with `start()` and `stop()`; `stop()` stops fetching, lets the
batches in hand finish and be acknowledged, closes stores, and returns. The process exits
0 after a clean stop, so Kubernetes sees a graceful termination.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Protocol


class Service(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request URL at INFO; URLs may carry secrets in query strings.
    logging.getLogger("httpx").setLevel(logging.WARNING)


async def serve(service: Service) -> None:
    log = logging.getLogger(service.name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    log.info("%s started", service.name)
    await stop.wait()
    log.info("%s stopping", service.name)
    await service.stop()
    log.info("%s stopped", service.name)


def run(service: Service) -> None:
    # uvloop's event loop does the socket and scheduling work of every event (publish,
    # ack, fetch, Redis and Postgres round trips) in C; on the bench it is the largest
    # single saving. Without it (a platform it does not build on) asyncio's own runs.
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        asyncio.run(serve(service))
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(service))
