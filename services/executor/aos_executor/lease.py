"""One active executor at a time: a lease in Redis, renewed while held.

The executor keeps each run's state in memory, folded from the log; two executors
consuming the same durable consumers would each see part of every run. So replicas
take turns: one holds the lease and runs everything, the others stand by (serving
/healthz, /readyz and /replay) and take over when the holder stops renewing — it
stopped, crashed or lost Redis. A holder that fails to renew for a whole TTL gives up
and stops, so two holders overlap by at most one TTL; in that window deterministic
event ids (JetStream drops the duplicates) and the idempotency claims of unsafe steps
keep every effect single.

Scaling out — several active executors, each owning a partition of the runs — is the
next step (see the closing notes); this lease is what makes more than one replica safe
today.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

# KEYS[1] = lease key; ARGV[1] = holder, ARGV[2] = TTL in ms. 1 when still held by holder.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease(Protocol):
    name: str
    holder: str

    async def acquire(self) -> None:
        """Return once this process holds the lease."""
        ...

    async def hold(self) -> None:
        """Keep the lease; return when it is lost."""
        ...

    async def release(self) -> None: ...

    async def close(self) -> None: ...


class NoLease:
    """A single executor without Redis (tests, demos): always the holder."""

    name = "none (single replica)"

    def __init__(self) -> None:
        self.holder = "only"

    async def acquire(self) -> None:
        return None

    async def hold(self) -> None:
        await asyncio.Event().wait()

    async def release(self) -> None:
        return None

    async def close(self) -> None:
        return None


class RedisLease:
    name = "redis"

    def __init__(self, redis: Redis, key: str, ttl_s: float) -> None:
        self.redis = redis
        self.key = key
        self.ttl_ms = int(ttl_s * 1000)
        self.ttl_s = ttl_s
        self.holder = uuid.uuid4().hex
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    async def acquire(self) -> None:
        announced = False
        while True:
            try:
                if await self.redis.set(self.key, self.holder, nx=True, px=self.ttl_ms):
                    log.info("executor %s holds the lease: active", self.holder[:8])
                    return
            except RedisError as exc:
                log.warning("lease: Redis unavailable (%s); retrying", exc)
            if not announced:
                log.info("another executor is active: standing by")
                announced = True
            await asyncio.sleep(self.ttl_s / 5)

    async def hold(self) -> None:
        renewed_at = time.monotonic()
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                if not await self._renew(keys=[self.key], args=[self.holder, self.ttl_ms]):
                    log.error("executor %s lost the lease", self.holder[:8])
                    return
                renewed_at = time.monotonic()
            except RedisError as exc:
                # Not renewed for a whole TTL: another replica may hold it by now.
                if time.monotonic() - renewed_at >= self.ttl_s:
                    log.error("lease not renewed for %.1fs (%s): giving it up", self.ttl_s, exc)
                    return

    async def release(self) -> None:
        with contextlib.suppress(RedisError):  # if not, it expires by itself
            await self._release(keys=[self.key], args=[self.holder])

    async def close(self) -> None:
        await self.redis.aclose()


def open_lease(redis_url: str | None, namespace: str, ttl_s: float) -> Lease:
    if not redis_url:
        return NoLease()
    return RedisLease(Redis.from_url(redis_url), f"{namespace}:executor:lease", ttl_s)
