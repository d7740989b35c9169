"""Idempotency claims for unsafe steps: a side effect happens at most once per step.

Before an unsafe skill is called, the executor claims the step's key (run id + step id,
the same for every attempt) in Redis with a TTL:

- `claimed`: nobody has called it; this executor calls it now, then records the result.
- `done`: it was called and its result recorded; the result is returned, nothing is
  called again (a resumed run, a redelivered decision, a second replica).
- `in_flight`: another attempt holds the claim — or held it and died mid-call, and
  nobody can know whether the effect happened. The step fails retryably; once the
  claim's TTL has passed, a later attempt may call again (the TTL is the bound on how
  long an unknown outcome blocks a run).

A call that fails with a known outcome releases its claim, so a retry may call again.
A step whose executor died mid-call is settled by `lookup` (never by a new claim): its
recorded result if there is one, else the step fails STEP_INTERRUPTED (see service.py).

Retry-safe calls (pure and idempotent skills, an http_call GET) take no claim: calling
them again is harmless, and a claim left by a dead executor would only delay them.
The checkpoint and the log stay the durable record; an expired key only means a resumed
run cannot find a result that the log, if it got that far, already has.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from redis.asyncio import Redis

ClaimState = Literal["claimed", "done", "in_flight"]


@dataclass(frozen=True)
class Claim:
    state: ClaimState
    result: dict[str, Any] | None = None


class IdempotencyStore(Protocol):
    name: str

    async def claim(self, key: str, ttl_s: float) -> Claim: ...

    async def complete(self, key: str, result: dict[str, Any], ttl_s: float) -> None: ...

    async def lookup(self, key: str) -> Claim | None:
        """What the key holds, claiming nothing: `done` with the result, `in_flight`, or
        None (never claimed, released, or expired)."""
        ...

    async def release(self, key: str) -> None: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


# KEYS[1] = the step's key. ARGV[1] = TTL in milliseconds.
# Returns {'done', result} | {'in_flight'} | {'claimed'}.
_CLAIM = """
local value = redis.call('GET', KEYS[1])
if value then
  if string.sub(value, 1, 5) == 'done:' then return {'done', string.sub(value, 6)} end
  return {'in_flight'}
end
redis.call('SET', KEYS[1], 'claim', 'PX', tonumber(ARGV[1]))
return {'claimed'}
"""


class RedisIdempotencyStore:
    name = "redis"

    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self._claim = redis.register_script(_CLAIM)

    @classmethod
    def from_url(cls, url: str, namespace: str) -> RedisIdempotencyStore:
        return cls(Redis.from_url(url), f"{namespace}:executor:idempotency:")

    async def claim(self, key: str, ttl_s: float) -> Claim:
        reply = await self._claim(keys=[self.prefix + key], args=[int(ttl_s * 1000)])
        state = _text(reply[0])
        if state == "done":
            return Claim("done", json.loads(_text(reply[1])))
        return Claim("in_flight" if state == "in_flight" else "claimed")

    async def complete(self, key: str, result: dict[str, Any], ttl_s: float) -> None:
        await self.redis.set(self.prefix + key, "done:" + json.dumps(result), px=int(ttl_s * 1000))

    async def lookup(self, key: str) -> Claim | None:
        value = await self.redis.get(self.prefix + key)
        return None if value is None else _claim_of(_text(value))

    async def release(self, key: str) -> None:
        # Only a claim is released; a recorded result stays.
        value = await self.redis.get(self.prefix + key)
        if value is not None and not _text(value).startswith("done:"):
            await self.redis.delete(self.prefix + key)

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def close(self) -> None:
        await self.redis.aclose()


class InMemoryIdempotencyStore:
    """For unit tests and a single process without Redis: claims die with the process."""

    name = "memory"

    def __init__(self) -> None:
        self._values: dict[str, tuple[str, float]] = {}

    def _get(self, key: str) -> str | None:
        item = self._values.get(key)
        if item is None or item[1] < time.monotonic():
            self._values.pop(key, None)
            return None
        return item[0]

    async def claim(self, key: str, ttl_s: float) -> Claim:
        value = self._get(key)
        if value is not None:
            if value.startswith("done:"):
                return Claim("done", json.loads(value[5:]))
            return Claim("in_flight")
        self._values[key] = ("claim", time.monotonic() + ttl_s)
        return Claim("claimed")

    async def complete(self, key: str, result: dict[str, Any], ttl_s: float) -> None:
        self._values[key] = ("done:" + json.dumps(result), time.monotonic() + ttl_s)

    async def lookup(self, key: str) -> Claim | None:
        value = self._get(key)
        return None if value is None else _claim_of(value)

    async def release(self, key: str) -> None:
        value = self._get(key)
        if value is not None and not value.startswith("done:"):
            del self._values[key]

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


def _claim_of(value: str) -> Claim:
    if value.startswith("done:"):
        return Claim("done", json.loads(value[5:]))
    return Claim("in_flight")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
