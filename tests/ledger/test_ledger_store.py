"""The budget store's Lua scripts against a real Redis: decisions, idempotency, the
commit/release arithmetic, and that replaying the published events rebuilds the state."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import UTC, datetime

import pytest
from redis.asyncio import Redis

from aos_contracts import (
    BudgetReservationRequested,
    EventEnvelope,
    GoalSubmitted,
    RunCompleted,
    StepSucceeded,
)
from aos_ledger.service import (
    committed_event,
    decision_event,
    expired_event,
    opened_event,
    released_event,
)
from aos_ledger.store import BudgetNotOpen, BudgetStore, StoreNotRebuilt, epoch_ms
from tests.ledger.harness import TENANT, expiries, snapshot, tenant_snapshot, wipe

pytestmark = pytest.mark.integration


async def open_run(store: BudgetStore, cap_cents: int) -> uuid.UUID:
    run_id = uuid.uuid4()
    opened = await store.open_budget(run_id, TENANT, cap_cents)
    assert (opened.cap_cents, opened.tenant, opened.is_new) == (cap_cents, TENANT, True)
    return run_id


async def test_reserve_within_cap(store: BudgetStore) -> None:
    run_id = await open_run(store, 100)

    change = await store.reserve(run_id, uuid.uuid4(), "fetch", 1, 60, uuid.uuid4())

    assert change.is_new
    assert change.reservation.decision == "reserved"
    assert change.reservation.remaining_cents == 40
    balances = await store.balances(run_id)
    assert balances is not None
    assert (balances.reserved_cents, balances.committed_cents, balances.remaining_cents) == (
        60,
        0,
        40,
    )


async def test_reserve_exactly_the_rest_is_allowed(store: BudgetStore) -> None:
    run_id = await open_run(store, 100)
    await store.reserve(run_id, uuid.uuid4(), "a", 1, 60, uuid.uuid4())

    change = await store.reserve(run_id, uuid.uuid4(), "b", 1, 40, uuid.uuid4())

    assert change.reservation.decision == "reserved"
    assert change.reservation.remaining_cents == 0


async def test_deny_over_cap_changes_nothing(store: BudgetStore) -> None:
    run_id = await open_run(store, 100)
    await store.reserve(run_id, uuid.uuid4(), "a", 1, 60, uuid.uuid4())

    change = await store.reserve(run_id, uuid.uuid4(), "b", 1, 50, uuid.uuid4())

    assert change.is_new
    assert change.reservation.decision == "denied"
    assert change.reservation.state == "denied"
    assert change.reservation.remaining_cents == 40
    balances = await store.balances(run_id)
    assert balances is not None
    assert (balances.reserved_cents, balances.remaining_cents) == (60, 40)


async def test_re_request_returns_the_first_decision(store: BudgetStore) -> None:
    run_id = await open_run(store, 100)
    granted_id, denied_id = uuid.uuid4(), uuid.uuid4()
    first_grant = await store.reserve(run_id, granted_id, "a", 1, 60, uuid.uuid4())
    first_denial = await store.reserve(run_id, denied_id, "b", 1, 70, uuid.uuid4())

    # Asked again - with another amount even - each keeps its decision and numbers.
    again_grant = await store.reserve(run_id, granted_id, "a", 1, 10, uuid.uuid4())
    # Room frees up, yet a denial stays a denial: a decision is made once.
    await store.commit(run_id, granted_id, "a", 0)
    again_denial = await store.reserve(run_id, denied_id, "b", 1, 70, uuid.uuid4())

    assert not again_grant.is_new and not again_denial.is_new
    assert again_grant.reservation.decision == first_grant.reservation.decision == "reserved"
    assert again_grant.reservation.amount_cents == 60
    assert again_grant.reservation.remaining_cents == first_grant.reservation.remaining_cents
    assert again_denial.reservation == first_denial.reservation
    balances = await store.balances(run_id)
    assert balances is not None
    assert (balances.reserved_cents, balances.committed_cents) == (0, 0)


async def test_commit_charges_actual_cost_and_releases_the_rest(store: BudgetStore) -> None:
    run_id = await open_run(store, 100)
    reservation_id = uuid.uuid4()
    await store.reserve(run_id, reservation_id, "a", 1, 60, uuid.uuid4())

    change = await store.commit(run_id, reservation_id, "a", 45)

    assert change is not None and change.is_new
    assert change.reservation.state == "committed"
    assert (change.reservation.committed_cents, change.reservation.released_cents) == (45, 15)
    balances = await store.balances(run_id)
    assert balances is not None
    assert (balances.reserved_cents, balances.committed_cents, balances.remaining_cents) == (
        0,
        45,
        55,
    )

    again = await store.commit(run_id, reservation_id, "a", 45)
    assert again is not None and not again.is_new
    assert again.reservation == change.reservation
    assert await store.balances(run_id) == balances


async def test_commit_above_the_estimate_releases_nothing(store: BudgetStore) -> None:
    run_id = await open_run(store, 100)
    reservation_id = uuid.uuid4()
    await store.reserve(run_id, reservation_id, "a", 1, 30, uuid.uuid4())

    change = await store.commit(run_id, reservation_id, "a", 35)

    assert change is not None
    assert (change.reservation.committed_cents, change.reservation.released_cents) == (35, 0)
    balances = await store.balances(run_id)
    assert balances is not None
    assert (balances.reserved_cents, balances.committed_cents) == (0, 35)


async def test_commit_of_a_denied_reservation_is_ignored(store: BudgetStore) -> None:
    run_id = await open_run(store, 10)
    reservation_id = uuid.uuid4()
    await store.reserve(run_id, reservation_id, "a", 1, 30, uuid.uuid4())

    assert await store.commit(run_id, reservation_id, "a", 0) is None


async def test_cost_without_a_reservation_is_recorded(store: BudgetStore) -> None:
    run_id = await open_run(store, 100)

    assert await store.commit(run_id, uuid.uuid4(), "free", 0) is None
    change = await store.commit(run_id, uuid.uuid4(), "unreserved", 7)

    assert change is not None and change.reservation.decision is None
    balances = await store.balances(run_id)
    assert balances is not None
    assert (balances.reserved_cents, balances.committed_cents) == (0, 7)


async def test_release_all_releases_only_what_is_still_held(store: BudgetStore) -> None:
    run_id = await open_run(store, 100)
    done, held = uuid.uuid4(), uuid.uuid4()
    await store.reserve(run_id, done, "a", 1, 30, uuid.uuid4())
    await store.reserve(run_id, held, "b", 1, 20, uuid.uuid4())
    await store.reserve(run_id, uuid.uuid4(), "c", 1, 90, uuid.uuid4())  # denied
    await store.commit(run_id, done, "a", 10)

    released = await store.release_all(run_id, "run.completed")

    assert [(c.reservation.reservation_id, c.is_new) for c in released] == [(str(held), True)]
    assert released[0].reservation.released_cents == 20
    assert released[0].reservation.reason == "run.completed"
    balances = await store.balances(run_id)
    assert balances is not None
    assert (balances.reserved_cents, balances.committed_cents) == (0, 10)

    # A redelivered terminal event returns the same releases and changes nothing.
    again = await store.release_all(run_id, "run.cancelled")
    assert [(c.reservation, c.is_new) for c in again] == [(released[0].reservation, False)]
    assert await store.balances(run_id) == balances


async def test_a_request_after_the_run_ended_is_denied(store: BudgetStore) -> None:
    run_id = await open_run(store, 100)
    await store.release_all(run_id, "run.cancelled")

    late = await store.reserve(run_id, uuid.uuid4(), "late", 1, 10, uuid.uuid4())

    assert late.reservation.decision == "denied"
    assert late.reservation.denial_code == "CANCELLED"
    balances = await store.balances(run_id)
    assert balances is not None and balances.reserved_cents == 0


async def test_commit_after_release_charges_without_releasing_twice(store: BudgetStore) -> None:
    run_id = await open_run(store, 100)
    reservation_id = uuid.uuid4()
    await store.reserve(run_id, reservation_id, "a", 1, 30, uuid.uuid4())
    await store.release_all(run_id, "run.cancelled")

    change = await store.commit(run_id, reservation_id, "a", 12)

    assert change is not None
    assert (change.reservation.committed_cents, change.reservation.released_cents) == (12, 0)
    balances = await store.balances(run_id)
    assert balances is not None
    assert (balances.reserved_cents, balances.committed_cents) == (0, 12)


async def test_an_open_budget_keeps_its_cap_and_tenant(store: BudgetStore) -> None:
    run_id = await open_run(store, 100)

    again = await store.open_budget(run_id, "intruder", 5_000)

    assert (again.cap_cents, again.tenant, again.is_new) == (100, TENANT, False)


async def test_a_free_step_is_never_denied(store: BudgetStore) -> None:
    run_id = await open_run(store, 10)
    overrun = uuid.uuid4()
    await store.reserve(run_id, overrun, "a", 1, 10, uuid.uuid4())
    await store.commit(run_id, overrun, "a", 25)  # the estimate was too low

    free = await store.reserve(run_id, uuid.uuid4(), "b", 1, 0, uuid.uuid4())
    paid = await store.reserve(run_id, uuid.uuid4(), "c", 1, 1, uuid.uuid4())

    assert free.reservation.decision == "reserved"
    assert paid.reservation.decision == "denied"
    assert paid.reservation.remaining_cents == -15


async def test_no_decision_before_the_budget_is_open(store: BudgetStore) -> None:
    with pytest.raises(BudgetNotOpen):
        await store.reserve(uuid.uuid4(), uuid.uuid4(), "a", 1, 1, uuid.uuid4())


async def test_no_decision_without_the_marker(redis: Redis, namespace: str) -> None:
    store = BudgetStore(redis, namespace)  # never rebuilt: no applied_through marker
    with pytest.raises(StoreNotRebuilt):
        await store.open_budget(uuid.uuid4(), TENANT, 100)
    with pytest.raises(StoreNotRebuilt):
        await store.reserve(uuid.uuid4(), uuid.uuid4(), "a", 1, 1, uuid.uuid4())


async def test_marker_only_rises_and_publishing_never_creates_it(store: BudgetStore) -> None:
    await store.mark_published(7)
    await store.mark_published(3)
    assert await store.applied_through() == 7
    await store.redis.delete(store.marker_key)
    await store.mark_published(9)
    assert await store.applied_through() is None


async def test_concurrent_requests_never_reserve_beyond_the_cap(store: BudgetStore) -> None:
    run_id = await open_run(store, 100)

    # The client's pool opens a connection per request in flight, so they reach Redis
    # side by side.
    changes = await asyncio.gather(
        *(store.reserve(run_id, uuid.uuid4(), f"s{i}", 1, 7, uuid.uuid4()) for i in range(100))
    )

    granted = [c for c in changes if c.reservation.decision == "reserved"]
    assert len(granted) == 14  # 14 * 7 = 98 <= 100 < 15 * 7
    balances = await store.balances(run_id)
    assert balances is not None
    assert balances.reserved_cents == 98
    assert sorted(c.reservation.remaining_cents or 0 for c in granted) == list(range(2, 100, 7))


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_replaying_the_published_events_rebuilds_identical_state(
    redis: Redis, seed: int
) -> None:
    """Drive the store like the service does, keep every event it would publish (with
    the republications of redeliveries), replay them into an empty namespace: same state."""
    live_namespace = f"live{uuid.uuid4().hex[:8]}"
    rebuilt_namespace = f"rebuilt{uuid.uuid4().hex[:8]}"
    live, rebuilt = BudgetStore(redis, live_namespace), BudgetStore(redis, rebuilt_namespace)
    await live.mark_rebuilt(0)
    rng = random.Random(seed)
    published: list[EventEnvelope] = []
    try:
        # Two tenants, one with a cap the runs reach; some grants expire at once, so
        # expiry releases are part of what must be rebuilt.
        goals = [
            GoalSubmitted(run_id=uuid.uuid4(), tenant=tenant, goal="g", budget_cents=cap)
            for cap, tenant in ((0, TENANT), (50, "other"), (100, TENANT), (250, TENANT))
        ]
        now_ms = epoch_ms(datetime.now(UTC))
        requests: list[BudgetReservationRequested] = []
        for _ in range(120):
            goal = rng.choice(goals)
            action = rng.random()
            if action < 0.15:
                opened = await live.open_budget(goal.run_id, goal.tenant, goal.budget_cents)
                published.append(opened_event(goal, opened.cap_cents))
            elif action < 0.55:
                redelivered = requests and rng.random() < 0.2
                request = (
                    rng.choice(requests)
                    if redelivered
                    else BudgetReservationRequested(
                        run_id=goal.run_id,
                        tenant=goal.tenant,
                        reservation_id=uuid.uuid4(),
                        step_id=f"s{len(requests)}",
                        attempt=1,
                        amount_cents=rng.randint(0, 60),
                    )
                )
                requests.append(request)
                try:
                    change = await live.reserve(
                        request.run_id,
                        request.reservation_id,
                        request.step_id,
                        request.attempt,
                        request.amount_cents,
                        request.event_id,
                        tenant_period=rng.choice(["day:2025-06-01", "day:2025-06-02"]),
                        tenant_cap_cents=200 if request.tenant == TENANT else None,
                        expires_at_ms=now_ms + rng.choice([-1, 3_600_000]),
                    )
                except BudgetNotOpen:
                    continue
                published.append(decision_event(request, change.reservation))
                if rng.random() < 0.3:
                    for run_id, rid in await live.due(now_ms):
                        expired = await live.expire(run_id, rid, now_ms)
                        if expired is not None:
                            published.append(expired_event(expired))
                            await live.expiry_published(run_id, rid)
            elif action < 0.85 and requests:
                request = rng.choice(requests)
                step = StepSucceeded(
                    run_id=request.run_id,
                    tenant=request.tenant,
                    step_id=request.step_id,
                    skill="llm_invoke",
                    attempt=1,
                    reservation_id=request.reservation_id,
                    cost_cents=rng.randint(0, request.amount_cents),
                )
                try:
                    committed = await live.commit(
                        step.run_id, step.reservation_id, step.step_id, step.cost_cents
                    )
                except BudgetNotOpen:
                    continue
                if committed is not None:
                    # As the service does: the decision again first, then its consequence.
                    if committed.reservation.decision:
                        published.append(decision_event(step, committed.reservation))
                    published.append(committed_event(step, committed.reservation))
            elif action >= 0.85 and goal is not goals[-1]:  # the last run never ends
                completed = RunCompleted(run_id=goal.run_id, tenant=goal.tenant)
                for change in await live.release_all(goal.run_id, completed.type):
                    published.append(decision_event(completed, change.reservation))
                    published.append(released_event(completed, change.reservation))

        changed = await rebuilt.replay(published)
        assert changed < len(published) or not published  # republications change nothing
        await rebuilt.mark_rebuilt(len(published))

        live_state, rebuilt_state = await snapshot(live), await snapshot(rebuilt)
        assert live_state == rebuilt_state
        states = {r.state for s in live_state.values() for r in s.reservations.values()}
        assert states >= {"reserved", "denied", "committed", "released"}
        assert any(getattr(e, "reason", None) == "expired" for e in published)
        assert await tenant_snapshot(rebuilt) == await tenant_snapshot(live)
        assert await expiries(rebuilt) == await expiries(live)
        # Replaying again (a replica rebuilding at the same time) changes nothing either.
        assert await rebuilt.replay(published) == 0
        assert await snapshot(rebuilt) == live_state
    finally:
        await wipe(redis, live_namespace)
        await wipe(redis, rebuilt_namespace)


async def test_concurrent_decisions_go_out_together_and_each_gets_its_own_answer(
    store: BudgetStore, redis: Redis
) -> None:
    """Script calls made at once are sent as one pipeline (ScriptCalls); each caller
    still gets its own reply and its own error, and a server that lost its scripts
    (SCRIPT FLUSH, a restart) has them loaded again."""
    runs = [await open_run(store, 10) for _ in range(20)]
    await redis.script_flush()
    changes = await asyncio.gather(
        *(
            store.reserve(run, uuid.uuid4(), "a", 1, 4 + i % 10, uuid.uuid4())
            for i, run in enumerate(runs)
        ),
        store.reserve(uuid.uuid4(), uuid.uuid4(), "a", 1, 1, uuid.uuid4()),
        return_exceptions=True,
    )
    *granted, unknown = changes
    assert isinstance(unknown, BudgetNotOpen)  # a run never opened: its own error
    decisions = [change.reservation.decision for change in granted]  # type: ignore[union-attr]
    assert decisions == ["reserved" if 4 + i % 10 <= 10 else "denied" for i in range(20)]
    for i, run in enumerate(runs):
        balances = await store.balances(run)
        assert balances is not None
        assert balances.reserved_cents == (4 + i % 10 if 4 + i % 10 <= 10 else 0)
