"""Each service's HTTP side: /healthz, /readyz, /metrics (and whatever routes it adds).

/healthz says only that the event loop turns (a NATS blip must not restart every pod);
/readyz runs the service's checks (NATS, its stores) and lists its backends. A dependency
only some of the work needs (Claude: a plan of json_transform steps never calls it) is an
advisory: when it fails, /readyz lists it under `degraded` with why, and stays ready, so
a third party's outage never takes every replica out of rotation or stops `aos up`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from aos_plumbing import metrics

log = logging.getLogger(__name__)

ReadinessCheck = Callable[[], Awaitable[bool]]
# None when the dependency is fine, else what is wrong with it.
AdvisoryCheck = Callable[[], Awaitable[str | None]]
CHECK_TIMEOUT_S = 2.0

HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_STALE_S = 10.0


class ServiceHttp:
    def __init__(self, service: str, host: str, port: int) -> None:
        self.service = service
        self.host = host
        self.port = port
        self.checks: dict[str, ReadinessCheck] = {}
        self.advisories: dict[str, AdvisoryCheck] = {}
        self.backends: dict[str, str] = {}
        self.app = web.Application()
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        self.app.router.add_get("/metrics", self._metrics)
        self._runner: web.AppRunner | None = None
        self._beat = time.monotonic()
        self._heartbeat_task: asyncio.Task[None] | None = None

    def add_check(self, name: str, check: ReadinessCheck) -> None:
        self.checks[name] = check

    def add_advisory(self, name: str, check: AdvisoryCheck) -> None:
        """A dependency reported in /readyz (`advisories`, and `degraded` when it fails)
        that never makes the service not ready."""
        self.advisories[name] = check

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self._heartbeat_task = asyncio.create_task(self._heartbeat())
        for role, backend in self.backends.items():
            metrics.BACKEND_INFO.labels(self.service, role, backend).set(1)
        log.info("%s serving http on %s:%d", self.service, self.host, self.port)

    async def stop(self) -> None:
        if self._heartbeat_task:
            self._heartbeat_task.cancel()
        if self._runner:
            await self._runner.cleanup()

    async def _heartbeat(self) -> None:
        while True:
            self._beat = time.monotonic()
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def _healthz(self, request: web.Request) -> web.Response:
        age = time.monotonic() - self._beat
        alive = age < HEARTBEAT_STALE_S
        return web.json_response(
            {"service": self.service, "alive": alive, "heartbeat_age_s": round(age, 3)},
            status=200 if alive else 503,
        )

    async def _readyz(self, request: web.Request) -> web.Response:
        results: dict[str, Any] = {}
        for name, check in self.checks.items():
            try:
                results[name] = bool(await asyncio.wait_for(check(), timeout=CHECK_TIMEOUT_S))
            except Exception as exc:  # noqa: BLE001 - a failing check is a result
                results[name] = False
                results[f"{name}_error"] = type(exc).__name__
        ready = all(value for key, value in results.items() if not key.endswith("_error"))
        advisories: dict[str, bool] = {}
        degraded: dict[str, str] = {}
        for name, advisory in self.advisories.items():
            try:
                problem = await asyncio.wait_for(advisory(), timeout=CHECK_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - a failing check is a result
                problem = f"check failed: {type(exc).__name__}"
            advisories[name] = problem is None
            if problem is not None:
                degraded[name] = problem
        return web.json_response(
            {
                "service": self.service,
                "ready": ready,
                "checks": results,
                "advisories": advisories,
                "degraded": degraded,
                "backends": self.backends,
            },
            status=200 if ready else 503,
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = metrics.render()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response
