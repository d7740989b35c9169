"""The planner giving up on a goal after an outage: judged from the log, since its store
is what is down."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from aos_cli.embedded import InfraUrls
from aos_contracts.events import GoalSubmitted, PlanRejected, RunAccepted
from aos_contracts.failures import FailureCode
from aos_planner.service import PlannerService
from aos_planner.settings import PlannerSettings
from aos_plumbing.bus import Delivery, EventBus

pytestmark = pytest.mark.integration

OUTAGE = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)")


@pytest.fixture
async def planner(infra: InfraUrls, namespace: str) -> AsyncIterator[PlannerService]:
    settings = PlannerSettings(
        AOS_NATS_URL=infra.nats_url, AOS_NAMESPACE=namespace, AOS_OUTAGE_GIVE_UP_S=5
    )
    service = PlannerService(settings)
    service.bus = await EventBus.open(settings, "planner")
    try:
        yield service
    finally:
        for context in ("goals", "plans", "runs", "budget", "parked"):
            await service.bus.js.delete_stream(service.bus.stream(context))
        await service.bus.close()


def delivery_of(goal: GoalSubmitted) -> Delivery:
    return Delivery(None, 1, f"x.goals.{goal.tenant}.{goal.run_id}", goal, 12)  # type: ignore[arg-type]


def goal(tenant: str = "acme", run_id: uuid.UUID | None = None) -> GoalSubmitted:
    return GoalSubmitted(
        run_id=run_id or uuid.uuid4(), tenant=tenant, goal="bench 1", budget_cents=10
    )


async def test_an_undecided_goal_is_rejected_as_dependency_unavailable(
    planner: PlannerService,
) -> None:
    assert planner.bus is not None
    undecided = goal()
    accepted = undecided.caused(
        RunAccepted, "run.accepted", goal="g", budget_cents=10, planner_backend="stub"
    )
    await planner.bus.publish(accepted)  # planning had begun when the store went away
    await planner.give_up(delivery_of(undecided), OUTAGE)
    events = await planner.bus.run_events("plans", "acme", undecided.run_id)
    assert [event.type for event in events] == ["run.accepted", "plan.rejected"]
    rejection = events[-1]
    assert isinstance(rejection, PlanRejected)
    assert rejection.code is FailureCode.DEPENDENCY_UNAVAILABLE
    assert "unreachable for 5 s: ConnectionRefusedError" in rejection.reasons[0]
    # Given up twice (a redelivery before the ack): the log keeps one rejection.
    await planner.give_up(delivery_of(undecided), OUTAGE)
    assert len(await planner.bus.run_events("plans", "acme", undecided.run_id)) == 2


async def test_a_goal_the_log_shows_decided_keeps_its_decision(planner: PlannerService) -> None:
    assert planner.bus is not None
    decided = goal()
    rejected_earlier = decided.caused(PlanRejected, "plan.rejected", reasons=["too big"])
    await planner.bus.publish(rejected_earlier)
    await planner.give_up(delivery_of(decided), OUTAGE)
    events = await planner.bus.run_events("plans", "acme", decided.run_id)
    assert [event.event_id for event in events] == [rejected_earlier.event_id]


async def test_another_tenants_run_id_gets_no_answer(planner: PlannerService) -> None:
    assert planner.bus is not None
    owner = goal("acme")
    created = owner.caused(
        RunAccepted, "run.accepted", goal="g", budget_cents=10, planner_backend="stub"
    )
    intruder = goal("globex", run_id=owner.run_id)
    # The run is acme's: its goal is the first for the run id in the log.
    await planner.bus.publish_all([owner, intruder, created])
    await planner.give_up(delivery_of(intruder), OUTAGE)
    assert await planner.bus.run_events("plans", "globex", owner.run_id) == []
    assert len(await planner.bus.run_events("plans", "*", owner.run_id)) == 1
