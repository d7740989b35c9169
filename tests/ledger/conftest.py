"""Fixtures of the ledger tests: a namespaced Redis, a budget store, ledger processes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from aos_cli.embedded import InfraUrls
from aos_ledger.store import BudgetStore
from tests.ledger.harness import LedgerFactory, wipe
from tests.support.processes import ServiceProcess


@pytest.fixture
async def redis(infra: InfraUrls, namespace: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(infra.redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await wipe(client, namespace)
        await client.aclose()


@pytest.fixture
async def store(redis: Redis, namespace: str) -> BudgetStore:
    """A store on an empty namespace, marked as a complete (empty) fold of the log."""
    budget_store = BudgetStore(redis, namespace)
    await budget_store.mark_rebuilt(0)
    return budget_store


@pytest.fixture
def ledger_process(infra: InfraUrls, namespace: str, log_dir: Path) -> Iterator[LedgerFactory]:
    """Makes (not starts) ledger processes of this test's namespace; stops them after."""
    made: list[ServiceProcess] = []

    def make(replica: int = 0, **extra_env: str) -> ServiceProcess:
        folder = log_dir / f"replica{replica}"
        folder.mkdir(exist_ok=True)
        env = {
            "AOS_NATS_URL": infra.nats_url,
            "AOS_NAMESPACE": namespace,
            "REDIS_URL": infra.redis_url,
            **extra_env,
        }
        process = ServiceProcess("ledger", env, log_dir=folder)
        made.append(process)
        return process

    yield make
    for process in made:
        process.stop()
