"""Connecting a service to its PostgreSQL database."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg

log = logging.getLogger(__name__)


async def connect_pool(
    url: str,
    *,
    max_size: int,
    timeout_s: float = 30.0,
    init: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
) -> asyncpg.Pool:
    """A small pool on `url`, waiting up to `timeout_s` for the server: Postgres may
    come up after the service (an embedded start, a pod scheduled before its database)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            pool: asyncpg.Pool = await asyncpg.create_pool(
                url, min_size=1, max_size=max_size, init=init
            )
            return pool
        except (OSError, asyncpg.CannotConnectNowError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            log.warning("postgres not reachable yet; retrying")
            await asyncio.sleep(0.5)
