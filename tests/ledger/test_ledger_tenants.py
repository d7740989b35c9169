"""Tenant caps per period and reservation expiry: in the store's Lua, and in ledger
processes hammered by many runs of one tenant, proved from the ledger's own log."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import httpx
import nats
import pytest
from redis.asyncio import Redis

from aos_cli.embedded import InfraUrls
from aos_cli.main import main as aos
from aos_contracts import AnyEvent, BudgetOpened, BudgetReservationRequested, BudgetReserved
from aos_contracts.events import GoalSubmitted
from aos_contracts.subjects import goal_subject
from aos_ledger.service import LedgerService
from aos_ledger.settings import LedgerSettings
from aos_ledger.store import BudgetStore, epoch_ms, period_of
from aos_plumbing.bus import Delivery, EventBus
from tests.ledger.harness import (
    DECISIONS,
    TENANT,
    BudgetLog,
    Executor,
    LedgerFactory,
    budget_events,
    distinct_ids_per_reservation,
    eventually,
    executor,
    fold,
    fold_tenants,
    ledger_idle,
    read_budget_stream,
)
from tests.ledger.test_ledger_faults import CausalExecutor, assert_redis_is_the_fold_of_the_log

pytestmark = pytest.mark.integration

DAY = "day:2025-06-01"


async def reserve(
    store: BudgetStore,
    run_id: uuid.UUID,
    amount: int,
    *,
    cap: int | None = 100,
    period: str = DAY,
    expires_at_ms: int | None = None,
) -> tuple[uuid.UUID, str, str | None]:
    """Reserve; returns (reservation id, decision, which cap a denial crossed)."""
    rid = uuid.uuid4()
    change = await store.reserve(
        run_id,
        rid,
        "s",
        1,
        amount,
        uuid.uuid4(),
        tenant_period=period,
        tenant_cap_cents=cap,
        expires_at_ms=expires_at_ms,
    )
    assert change.reservation.decision is not None
    return rid, change.reservation.decision, change.reservation.exceeded_cap


async def open_runs(
    store: BudgetStore, count: int, cap: int, tenant: str = TENANT
) -> list[uuid.UUID]:
    runs = [uuid.uuid4() for _ in range(count)]
    for run_id in runs:
        await store.open_budget(run_id, tenant, cap)
    return runs


# --- the store -----------------------------------------------------------------------------


async def test_tenant_cap_binds_across_runs_and_a_denial_says_which_cap(
    store: BudgetStore,
) -> None:
    first, second = await open_runs(store, 2, cap=80)
    (other,) = await open_runs(store, 1, cap=80, tenant="other")

    assert (await reserve(store, first, 60))[1:] == ("reserved", None)
    # The run has room for 50, the tenant (100 - 60) does not.
    assert (await reserve(store, second, 50))[1:] == ("denied", "tenant")
    # The run's own cap is checked too, and named when it is the one crossed.
    assert (await reserve(store, first, 30))[1:] == ("denied", "run")
    # Another tenant has its own balance.
    assert (await reserve(store, other, 60))[1:] == ("reserved", None)
    assert (await reserve(store, second, 40))[1:] == ("reserved", None)

    balances = await store.tenant_balances(TENANT, DAY)
    assert (balances.reserved_cents, balances.committed_cents) == (100, 0)


async def test_periods_and_uncapped_tenants(store: BudgetStore) -> None:
    (run_id,) = await open_runs(store, 1, cap=1000)

    assert (await reserve(store, run_id, 100))[1] == "reserved"
    assert (await reserve(store, run_id, 1))[1] == "denied"
    # A new period starts from nothing; a tenant without a cap is only bound by the run.
    assert (await reserve(store, run_id, 100, period="day:2025-06-02"))[1] == "reserved"
    assert (await reserve(store, run_id, 500, cap=None))[1] == "reserved"
    assert period_of("day", datetime(2025, 6, 1, 23, 59, tzinfo=UTC)) == DAY
    assert period_of("month", datetime(2025, 6, 30, tzinfo=UTC)) == "month:2025-06"


async def test_commit_and_release_move_the_tenant_balance_of_the_reservations_period(
    store: BudgetStore,
) -> None:
    (run_id,) = await open_runs(store, 1, cap=1000)
    done, _, _ = await reserve(store, run_id, 60)
    await reserve(store, run_id, 30)

    # Committed later, under another period: it counts against the reservation's own.
    await store.commit(run_id, done, "s", 45, tenant_period="day:2025-06-02")
    await store.release_all(run_id, "run.completed")

    balances = await store.tenant_balances(TENANT, DAY)
    assert (balances.reserved_cents, balances.committed_cents) == (0, 45)
    assert (await store.tenant_balances(TENANT, "day:2025-06-02")).committed_cents == 0


async def test_concurrent_runs_never_reserve_beyond_the_tenant_cap(store: BudgetStore) -> None:
    runs = await open_runs(store, 50, cap=1000)

    decided = await asyncio.gather(*(reserve(store, run_id, 7) for run_id in runs))

    assert sum(1 for _rid, decision, _cap in decided if decision == "reserved") == 14
    assert (await store.tenant_balances(TENANT, DAY)).reserved_cents == 98


async def test_an_expired_reservation_is_released_once_and_noted_until_published(
    store: BudgetStore,
) -> None:
    (run_id,) = await open_runs(store, 1, cap=100)
    now = epoch_ms(datetime.now(UTC))
    expired_id, _, _ = await reserve(store, run_id, 40, expires_at_ms=now - 1)
    later_id, _, _ = await reserve(store, run_id, 30, expires_at_ms=now + 60_000)

    assert await store.due(now) == [(str(run_id), str(expired_id))]
    first = await store.expire(str(run_id), str(expired_id), now)
    again = await store.expire(str(run_id), str(expired_id), now)  # a second replica
    assert await store.expire(str(run_id), str(later_id), now) is None  # not due

    assert first is not None and again is not None
    assert (first.is_new, again.is_new) == (True, False)
    assert first.reservation == again.reservation
    assert (first.reservation.state, first.reservation.reason) == ("released", "expired")
    assert first.tenant == TENANT
    assert await store.due(now) == []
    # Applied but not yet published: any sweep finds it again, until it is published.
    assert await store.unpublished_expiries() == [(str(run_id), str(expired_id))]
    await store.expiry_published(str(run_id), str(expired_id))
    assert await store.unpublished_expiries() == []

    balances = await store.balances(run_id)
    assert balances is not None and balances.reserved_cents == 30
    assert (await store.tenant_balances(TENANT, DAY)).reserved_cents == 30
    # The step ran after all: its cost is charged, nothing is given back twice.
    change = await store.commit(run_id, expired_id, "s", 25)
    assert change is not None and change.reservation.released_cents == 0  # released before
    balances = await store.balances(run_id)
    assert balances is not None
    assert (balances.reserved_cents, balances.committed_cents) == (30, 25)
    assert (await store.tenant_balances(TENANT, DAY)).committed_cents == 25


# --- ledger processes ------------------------------------------------------------------------


def assert_never_above_a_cap(stream: Sequence[tuple[int, AnyEvent]], tenant_cap: int) -> None:
    """Walk the log in order: at no point does a tenant's period, or a run, hold (reserved
    plus committed) more than its cap - so committed spend never exceeds either."""
    seen: set[uuid.UUID] = set()
    # With several ledgers a run's first decision may precede its opening in the log.
    caps = {e.run_id: e.cap_cents for _seq, e in stream if e.type == "budget.opened"}
    held: dict[object, int] = {}
    holdings: dict[uuid.UUID, tuple[object, object, int]] = {}
    for _seq, event in stream:
        if event.event_id in seen:
            continue
        seen.add(event.event_id)
        if event.type not in ("budget.reserved", "budget.committed", "budget.released"):
            continue
        tenant_key = (event.tenant, event.tenant_period)
        run_key = event.run_id
        previous = holdings.pop(event.reservation_id, None)
        if previous is not None:
            held[previous[0]] -= previous[2]
            held[previous[1]] -= previous[2]
        amount = {
            "budget.reserved": getattr(event, "amount_cents", 0),
            "budget.committed": getattr(event, "committed_cents", 0),
            "budget.released": 0,
        }[event.type]
        if event.type == "budget.committed":
            # Committed spend stays held for good, under a key of its own.
            holdings[uuid.uuid4()] = (tenant_key, run_key, amount)
        elif amount:
            holdings[event.reservation_id] = (tenant_key, run_key, amount)
        held[tenant_key] = held.get(tenant_key, 0) + amount
        held[run_key] = held.get(run_key, 0) + amount
        assert held[tenant_key] <= tenant_cap, (event, held[tenant_key])
        assert held[run_key] <= caps[event.run_id], (event, held[run_key])


async def test_many_runs_of_one_tenant_on_several_ledgers_never_spend_beyond_a_cap(
    infra: InfraUrls, namespace: str, ledger_process: LedgerFactory, redis: Redis
) -> None:
    tenant_cap = 2500
    env = {"AOS_CONSUMER_BATCH": "4", "AOS_TENANT_CAPS": json.dumps({TENANT: tenant_cap})}
    for replica in range(3):
        ledger_process(replica, **env).start()
    nc = await nats.connect(infra.nats_url)
    log = BudgetLog(nc.jetstream(), namespace)
    driver = CausalExecutor(Executor(nc.jetstream(), namespace), random.Random(5))
    try:
        await driver.start_runs(40)  # about 10,000 cents asked for, 4 times the cap
        while not driver.finished:
            await driver.react(await log.refresh())
            await asyncio.sleep(0.05)
        await eventually(lambda: ledger_idle(infra.nats_url, namespace), what="ledger idle")
        stream = await log.refresh()
    finally:
        await nc.drain()

    decisions = distinct_ids_per_reservation(stream, DECISIONS)
    assert set(decisions) == set(driver.requests) and set(decisions.values()) == {1}
    # (Replicas may take a run's end before a request of it: that one is denied as
    # CANCELLED, not for money.)
    denied = [
        e for e in budget_events(stream, "budget.denied") if e.error.code == "BUDGET_EXCEEDED"
    ]
    assert "tenant" in {e.exceeded_cap for e in denied}  # the tenant cap did bind
    for event in denied:
        assert f"{event.exceeded_cap} cap exceeded" in event.error.message
    (period,) = {e.tenant_period for e in budget_events(stream, "budget.reserved")}
    assert period is not None and period.startswith("month:")

    assert_never_above_a_cap(stream, tenant_cap)
    ((key, tenant),) = fold_tenants(stream).items()
    assert key == (TENANT, period) and tenant.cap_cents == tenant_cap
    assert tenant.committed_cents <= tenant_cap
    assert all(run.committed_cents <= run.cap_cents for run in fold(stream).values())
    await assert_redis_is_the_fold_of_the_log(BudgetStore(redis, namespace), stream)


async def test_reservations_never_committed_expire_once_across_replicas(
    infra: InfraUrls, namespace: str, ledger_process: LedgerFactory, redis: Redis
) -> None:
    env = {"AOS_RESERVATION_TTL_S": "0.5", "AOS_RESERVATION_SWEEP_S": "0.05"}
    for replica in range(2):
        ledger_process(replica, **env).start()
    store = BudgetStore(redis, namespace)
    run_id = uuid.uuid4()

    async with executor(infra.nats_url, namespace) as ex:
        await ex.goal(run_id, budget_cents=100)
        forgotten = await ex.request(run_id, "forgotten", 40)
        late: BudgetReservationRequested = await ex.request(run_id, "late", 30)

        async def both_expired() -> bool:
            stream = await read_budget_stream(infra.nats_url, namespace)
            return len(budget_events(stream, "budget.released")) >= 2

        await eventually(both_expired, what="both reservations expired")
        # The late step reports after its reservation expired: charged, nothing given back
        # twice; the run's end finds nothing left to release.
        await ex.succeeded(late, cost_cents=25)
        await ex.completed(run_id)
        await eventually(lambda: ledger_idle(infra.nats_url, namespace), what="ledger idle")
    stream = await read_budget_stream(infra.nats_url, namespace)

    released = budget_events(stream, "budget.released")
    assert {e.reservation_id for e in released} == {forgotten.reservation_id, late.reservation_id}
    assert {e.reason for e in released} == {"expired"}
    assert set(distinct_ids_per_reservation(stream, ("budget.released",)).values()) == {1}
    (committed,) = budget_events(stream, "budget.committed")
    assert (committed.committed_cents, committed.released_cents) == (25, 0)
    balances = await store.balances(run_id)
    assert balances is not None
    assert (balances.reserved_cents, balances.committed_cents) == (0, 25)
    assert await store.due(epoch_ms(datetime.now(UTC))) == []
    await assert_redis_is_the_fold_of_the_log(store, stream)


async def test_tenant_budget_query_and_cli(
    infra: InfraUrls,
    namespace: str,
    ledger_process: LedgerFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    ledger = ledger_process(
        AOS_TENANT_CAP_CENTS="1000", AOS_TENANT_CAPS=json.dumps({TENANT: 500})
    ).start()
    periods = {period_of("month", datetime.now(UTC))}
    run_id = uuid.uuid4()
    async with executor(infra.nats_url, namespace) as ex:
        await ex.goal(run_id, budget_cents=300)
        done = await ex.request(run_id, "a", 100)
        await ex.request(run_id, "b", 50)
        await ex.succeeded(done, cost_cents=70)
        await eventually(lambda: ledger_idle(infra.nats_url, namespace), what="ledger idle")

    async with httpx.AsyncClient(base_url=ledger.url, timeout=5.0) as http:
        body = (await http.get(f"/budgets/tenants/{TENANT}")).json()
        other = (await http.get("/budgets/tenants/nobody")).json()
        bad = await http.get("/budgets/tenants/Not%20A%20Tenant")
    periods.add(period_of("month", datetime.now(UTC)))
    assert body == {
        "tenant": TENANT,
        "period": body["period"],
        "cap_cents": 500,
        "reserved_cents": 50,
        "committed_cents": 70,
        "remaining_cents": 380,
    }
    assert body["period"] in periods
    assert (other["cap_cents"], other["remaining_cents"], other["committed_cents"]) == (
        1000,
        1000,
        0,
    )
    assert bad.status_code == 400

    monkeypatch.setenv("AOS_LEDGER_URL", ledger.url)
    assert aos(["budget", "show", TENANT, "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"tenant {TENANT}" in out and "500 cents" in out and "380 cents" in out
    assert aos(["budget", "show", TENANT, "--json", "--data-dir", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == body


async def test_a_decision_logged_before_its_runs_opening_replays_to_the_same_state(
    store: BudgetStore, redis: Redis
) -> None:
    """Several replicas can publish a run's first decision before its budget.opened."""
    run_id, rid = uuid.uuid4(), uuid.uuid4()
    opened = BudgetOpened(run_id=run_id, tenant=TENANT, cap_cents=100)
    reserved = BudgetReserved(
        run_id=run_id,
        tenant=TENANT,
        reservation_id=rid,
        step_id="s",
        attempt=1,
        amount_cents=30,
        remaining_cents=70,
        tenant_period=DAY,
    )

    await store.replay([reserved, opened])

    balances = await store.balances(run_id)
    assert balances is not None
    assert (balances.cap_cents, balances.reserved_cents, balances.tenant) == (100, 30, TENANT)
    assert (await store.tenant_balances(TENANT, DAY)).reserved_cents == 30


async def test_the_budget_is_the_run_owners_whichever_goal_is_handled_first(
    infra: InfraUrls, namespace: str, store: BudgetStore
) -> None:
    """A redelivery can put another tenant's later goal for a run ahead of the owner's
    (they are on different subjects): the budget still opens for the owner, the first
    goal for the run id in the log, as the planner decides it."""
    settings = LedgerSettings.model_validate(
        {"AOS_NATS_URL": infra.nats_url, "AOS_NAMESPACE": namespace, "REDIS_URL": infra.redis_url}
    )
    ledger = LedgerService(settings)
    ledger.bus = await EventBus.open(settings, "ledger")
    try:
        run_id = uuid.uuid4()
        owner = GoalSubmitted(run_id=run_id, tenant="acme", goal="g", budget_cents=40)
        intruder = GoalSubmitted(run_id=run_id, tenant="globex", goal="g", budget_cents=9)
        await ledger.bus.publish(owner)
        await ledger.bus.publish(intruder)
        delivery = Delivery(
            msg=None,  # type: ignore[arg-type]  # the handler reads no message when auth is off
            stream_seq=2,
            subject=goal_subject("globex", run_id, namespace),
            event=intruder,
            num_delivered=1,
        )
        opened = await ledger.handle_goal(delivery)
    finally:
        await ledger.bus.close()
        await ledger.redis.aclose()
    assert [(e.type, e.tenant, getattr(e, "cap_cents", None)) for e in opened] == [
        ("budget.opened", "acme", 40)
    ]
    balances = await store.balances(run_id)
    assert balances is not None and (balances.tenant, balances.cap_cents) == ("acme", 40)
