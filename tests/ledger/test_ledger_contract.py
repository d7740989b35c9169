"""The ledger as a real process: feed it what the executor publishes, check every event it
emits against the contracts, with the expected types and numbers."""

from __future__ import annotations

import uuid

import httpx
import pytest

from aos_cli.embedded import InfraUrls
from aos_contracts import (
    BudgetCommitted,
    BudgetDenied,
    BudgetOpened,
    BudgetReleased,
    BudgetReserved,
    FailureCode,
)
from tests.ledger.harness import (
    TENANT,
    LedgerFactory,
    decisions_in,
    eventually,
    executor,
    get_budget,
    read_budget_stream,
)

pytestmark = pytest.mark.integration


async def test_ledger_answers_the_executor_with_contract_events(
    infra: InfraUrls, namespace: str, ledger_process: LedgerFactory
) -> None:
    ledger = ledger_process().start()
    run_id = uuid.uuid4()

    async with executor(infra.nats_url, namespace) as ex:
        goal = await ex.goal(run_id, budget_cents=100)
        fetch = await ex.request(run_id, "fetch", 60)
        too_big = await ex.request(run_id, "summarize", 50)
        # The executor asks again for the same reservation (a restart that lost its
        # publish ack): the ledger must answer with the same decision, not a second one.
        await ex.request(run_id, "fetch", 60, reservation_id=fetch.reservation_id)
        fetched = await ex.succeeded(fetch, cost_cents=45)
        store = await ex.request(run_id, "store", 30)
        completed = await ex.completed(run_id)

        async def all_answered() -> bool:
            return len(await read_budget_stream(infra.nats_url, namespace)) >= 6

        await eventually(all_answered, what="the ledger's six answers")
        stream = await read_budget_stream(infra.nats_url, namespace)

    events = [event for _seq, event in stream]
    assert [event.type for event in events] == [
        "budget.opened",
        "budget.reserved",
        "budget.denied",
        "budget.committed",
        "budget.reserved",
        "budget.released",
    ]
    opened, reserved, denied, committed, reserved_store, released = events
    assert all(event.run_id == run_id and event.tenant == "acme" for event in events)
    assert all(event.correlation_id == goal.event_id for event in (opened,))

    assert isinstance(opened, BudgetOpened)
    assert opened.cap_cents == 100
    assert opened.causation_id == goal.event_id

    assert isinstance(reserved, BudgetReserved)
    assert (reserved.reservation_id, reserved.step_id, reserved.attempt) == (
        fetch.reservation_id,
        "fetch",
        1,
    )
    assert (reserved.amount_cents, reserved.remaining_cents) == (60, 40)
    assert reserved.causation_id == fetch.event_id

    assert isinstance(denied, BudgetDenied)
    assert denied.reservation_id == too_big.reservation_id
    assert (denied.amount_cents, denied.remaining_cents) == (50, 40)
    assert denied.error.code == FailureCode.BUDGET_EXCEEDED
    assert not denied.error.retryable
    assert "50" in denied.error.message and "40" in denied.error.message

    assert isinstance(committed, BudgetCommitted)
    assert committed.reservation_id == fetch.reservation_id
    assert committed.causation_id == fetched.event_id
    assert (committed.reserved_cents, committed.committed_cents, committed.released_cents) == (
        60,
        45,
        15,
    )

    assert isinstance(reserved_store, BudgetReserved)
    assert reserved_store.reservation_id == store.reservation_id
    assert reserved_store.remaining_cents == 100 - 45 - 30

    assert isinstance(released, BudgetReleased)
    assert released.reservation_id == store.reservation_id
    assert released.released_cents == 30
    assert released.reason == "run.completed"
    assert released.causation_id == completed.event_id

    response = get_budget(ledger.url, run_id)
    assert response.status_code == 200
    assert response.json() == {
        "run_id": str(run_id),
        "tenant": TENANT,
        "cap_cents": 100,
        "reserved_cents": 0,
        "committed_cents": 45,
        "remaining_cents": 55,
    }
    # Spend is counted per tenant, for the burn-rate alert (AosTenantSpendBurnRateHigh).
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(f"{ledger.url}/metrics")).text
    assert f'aos_budget_cents_total{{kind="committed",tenant="{TENANT}"}} 45.0' in metrics


async def test_a_request_ahead_of_its_goal_is_not_denied(
    infra: InfraUrls, namespace: str, ledger_process: LedgerFactory
) -> None:
    ledger_process().start()
    run_id = uuid.uuid4()

    async with executor(infra.nats_url, namespace) as ex:
        request = await ex.request(run_id, "early", 20)
        await ex.goal(run_id, budget_cents=25)

        async def decided() -> bool:
            stream = await read_budget_stream(infra.nats_url, namespace)
            return bool(decisions_in(stream))

        await eventually(decided, what="a decision on the early request")
        stream = await read_budget_stream(infra.nats_url, namespace)

    decisions = decisions_in(stream)
    assert len(decisions) == 1
    assert isinstance(decisions[0], BudgetReserved)
    assert decisions[0].reservation_id == request.reservation_id
    assert decisions[0].remaining_cents == 5
    assert [event.type for _seq, event in stream].count("budget.opened") == 1


def test_http_reports_readiness_backends_and_unknown_runs(
    namespace: str, ledger_process: LedgerFactory
) -> None:
    ledger = ledger_process().start()

    ready = httpx.get(f"{ledger.url}/readyz", timeout=5.0).json()
    assert ready["ready"] is True
    # budget_store: not rebuilding (a rebuild answers queries 503 and is not ready)
    assert ready["checks"] == {"nats": True, "redis": True, "budget_store": True}
    assert ready["backends"] == {"budget_store": "redis", "auth": "stub", "rbac": "off"}

    unknown = get_budget(ledger.url, uuid.uuid4())
    assert unknown.status_code == 404
    assert "error" in unknown.json()

    metrics = httpx.get(f"{ledger.url}/metrics", timeout=5.0).text
    assert "aos_budget_decisions_total" in metrics
