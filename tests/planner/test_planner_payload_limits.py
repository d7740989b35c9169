"""The planner and the bus's max payload: a goal above MAX_GOAL_BYTES is refused before
planning, and a decision that cannot be published ends as a rejection, not a retry loop."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import nats
from nats.js import api as js_api

from aos_contracts.codec import encode_event
from aos_contracts.events import EventEnvelope, GoalSubmitted, PlanRejected
from aos_contracts.failures import FailureCode
from aos_contracts.plans import Plan, PlanStep
from aos_planner.planning import (
    MAX_GOAL_BYTES,
    Planned,
    accepted_event,
    decision_event,
    goal_size_refusal,
)
from aos_planner.service import PlannerService
from aos_planner.settings import PlannerSettings

BUS_MAX_PAYLOAD = 1024 * 1024


def goal() -> GoalSubmitted:
    return GoalSubmitted(run_id=uuid.uuid4(), tenant="acme", goal="extract a", budget_cents=5)


def test_goal_size_refusal_is_none_up_to_the_limit_and_goal_too_large_above() -> None:
    assert goal_size_refusal(goal(), MAX_GOAL_BYTES) is None
    refusal = goal_size_refusal(goal(), MAX_GOAL_BYTES + 1)
    assert isinstance(refusal, PlanRejected)
    assert refusal.code == FailureCode.GOAL_TOO_LARGE
    same = goal()
    # Derived from the goal like every decision: a redelivery gives the same event.
    first, again = goal_size_refusal(same, 10**6), goal_size_refusal(same, 10**6)
    assert first is not None and again is not None and first.event_id == again.event_id


@dataclass
class SmallBus:
    """Publishes like nats-py: an event above the max payload raises MaxPayloadError."""

    published: list[EventEnvelope] = field(default_factory=list)

    async def publish(self, event: EventEnvelope) -> js_api.PubAck:
        if len(encode_event(event)) > BUS_MAX_PAYLOAD:
            raise nats.errors.MaxPayloadError
        self.published.append(event)
        return js_api.PubAck(stream="PLANS", seq=len(self.published))

    async def publish_all(self, events: Sequence[EventEnvelope]) -> list[js_api.PubAck]:
        return [await self.publish(event) for event in events]


async def test_a_decision_too_large_to_publish_is_published_as_a_goal_too_large_rejection() -> None:
    service = PlannerService(PlannerSettings())
    bus = SmallBus()
    service.bus = bus  # type: ignore[assignment]
    huge = goal().model_copy(update={"inputs": {"doc": "x" * BUS_MAX_PAYLOAD}})
    plan = Plan(steps=[PlanStep(id="a", skill="json_transform", params={"op": "omit"})])
    events = [accepted_event(huge, "stub"), decision_event(huge, Planned(plan, 0, 0))]
    await service.store.record(huge.run_id, huge.tenant, events)

    await service._publish(huge, events)  # returns: nothing left to retry

    (published,) = bus.published
    assert isinstance(published, PlanRejected)
    assert published.code == FailureCode.GOAL_TOO_LARGE
    assert "does not fit on the bus" in published.reasons[0]
    recorded = await service.store.decision(huge.run_id)
    assert recorded is not None and recorded.published_seq == 1
