"""The ledger's query API while Redis is behind the log: 503 "rebuilding", never numbers
from a partial fold; then the right numbers once the rebuild is done."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import httpx
from redis.asyncio import Redis

from aos_cli.embedded import InfraUrls
from aos_contracts import EventEnvelope
from aos_ledger.service import LedgerService
from aos_ledger.settings import LedgerSettings
from tests.ledger.harness import TENANT, eventually, executor, ledger_idle, wipe
from tests.support.processes import free_port


def settings(infra: InfraUrls, namespace: str) -> LedgerSettings:
    return LedgerSettings.model_validate(
        {
            "AOS_NATS_URL": infra.nats_url,
            "AOS_NAMESPACE": namespace,
            "REDIS_URL": infra.redis_url,
            "AOS_HTTP_HOST": "127.0.0.1",
            "AOS_HTTP_PORT": free_port(),
            # The sweeper would notice a wipe too; here the query must be the first to.
            "AOS_RESERVATION_SWEEP_S": 3600,
        }
    )


async def answers(url: str, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=5.0) as client:
        return await client.get(path)


async def test_queries_answer_503_while_rebuilding_then_the_rebuilt_numbers(
    infra: InfraUrls, namespace: str, redis: Redis
) -> None:
    run_id = uuid.uuid4()
    first = LedgerService(settings(infra, namespace))
    await first.start()
    try:
        async with executor(infra.nats_url, namespace) as ex:
            await ex.goal(run_id, budget_cents=100)
            await ex.request(run_id, "a", 80)
            await eventually(lambda: ledger_idle(infra.nats_url, namespace), what="ledger idle")
    finally:
        await first.stop()
    assert await wipe(redis, namespace) > 0

    # A ledger starting on the wiped Redis, its rebuild held until the test lets it go.
    ledger = LedgerService(settings(infra, namespace))
    url = f"http://127.0.0.1:{ledger.settings.http_port}"
    release = asyncio.Event()
    replay = ledger.store.replay

    async def held_replay(events: Sequence[EventEnvelope]) -> int:
        await release.wait()
        return await replay(events)

    ledger.store.replay = held_replay  # type: ignore[method-assign]
    starting = asyncio.create_task(ledger.start())
    try:

        async def reachable() -> bool:
            try:
                await answers(url, "/readyz")
            except httpx.HTTPError:
                return False
            return True

        await eventually(reachable, what="the ledger's HTTP server")
        for path in (f"/budgets/runs/{run_id}", f"/budgets/tenants/{TENANT}"):
            response = await answers(url, path)
            assert response.status_code == 503, response.text
            assert response.json()["error"] == "rebuilding"
            assert response.headers["Retry-After"] == "1"
        ready = await answers(url, "/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["budget_store"] is False

        release.set()
        await starting
        run = await answers(url, f"/budgets/runs/{run_id}")
        assert run.status_code == 200, run.text
        assert (run.json()["cap_cents"], run.json()["reserved_cents"]) == (100, 80)

        # Redis wiped under the running ledger: the next query notices (no marker),
        # answers 503 and starts the rebuild; the numbers come back once it is done.
        await wipe(redis, namespace)
        wiped = await answers(url, f"/budgets/tenants/{TENANT}")
        assert wiped.status_code == 503 and wiped.json()["error"] == "rebuilding"

        async def rebuilt() -> bool:
            return (await answers(url, f"/budgets/runs/{run_id}")).status_code == 200

        await eventually(rebuilt, what="the rebuild after the wipe")
        tenant = (await answers(url, f"/budgets/tenants/{TENANT}")).json()
        assert (tenant["reserved_cents"], tenant["committed_cents"]) == (80, 0)
    finally:
        release.set()
        if not starting.done():
            await starting
        await ledger.stop()
