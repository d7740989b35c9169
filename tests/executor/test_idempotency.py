"""Idempotency claims, against real Redis and in memory: same rules for both."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from aos_cli.embedded import InfraUrls
from aos_executor.idempotency import (
    IdempotencyStore,
    InMemoryIdempotencyStore,
    RedisIdempotencyStore,
)


@pytest.fixture(params=["redis", "memory"])
async def store(
    request: pytest.FixtureRequest, infra: InfraUrls, namespace: str
) -> AsyncIterator[IdempotencyStore]:
    if request.param == "memory":
        yield InMemoryIdempotencyStore()
        return
    redis_store = RedisIdempotencyStore.from_url(infra.redis_url, namespace)
    try:
        yield redis_store
    finally:
        keys = [key async for key in redis_store.redis.scan_iter(f"{namespace}:*")]
        if keys:
            await redis_store.redis.delete(*keys)
        await redis_store.close()


async def test_the_first_claim_wins_and_others_see_it_in_flight(store: IdempotencyStore) -> None:
    key = f"{uuid.uuid4()}:fetch"
    claims = await asyncio.gather(*(store.claim(key, ttl_s=30) for _ in range(20)))
    assert sorted(claim.state for claim in claims) == ["claimed"] + ["in_flight"] * 19


async def test_a_completed_step_returns_its_result_instead_of_calling_again(
    store: IdempotencyStore,
) -> None:
    key = f"{uuid.uuid4()}:fetch"
    assert (await store.claim(key, ttl_s=30)).state == "claimed"
    await store.complete(key, {"output": {"status": 201}, "cost_cents": 3}, ttl_s=30)
    again = await store.claim(key, ttl_s=30)
    assert again.state == "done"
    assert again.result == {"output": {"status": 201}, "cost_cents": 3}
    await store.release(key)  # a recorded result is never released
    assert (await store.claim(key, ttl_s=30)).state == "done"


async def test_a_released_claim_can_be_claimed_again(store: IdempotencyStore) -> None:
    key = f"{uuid.uuid4()}:fetch"
    await store.claim(key, ttl_s=30)
    await store.release(key)
    assert (await store.claim(key, ttl_s=30)).state == "claimed"


async def test_a_claim_whose_holder_died_expires_after_its_ttl(store: IdempotencyStore) -> None:
    key = f"{uuid.uuid4()}:fetch"
    await store.claim(key, ttl_s=0.2)
    assert (await store.claim(key, ttl_s=0.2)).state == "in_flight"
    await asyncio.sleep(0.4)
    assert (await store.claim(key, ttl_s=0.2)).state == "claimed"


async def test_keys_live_under_the_namespace(infra: InfraUrls, namespace: str) -> None:
    store = RedisIdempotencyStore.from_url(infra.redis_url, namespace)
    try:
        await store.claim("run:step", ttl_s=30)
        redis: Redis = store.redis
        assert await redis.exists(f"{namespace}:executor:idempotency:run:step") == 1
        await redis.delete(f"{namespace}:executor:idempotency:run:step")
    finally:
        await store.close()
