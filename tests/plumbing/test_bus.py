"""The bus's helpers for waiting on another service, and for slow handlers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from aos_cli.embedded import InfraUrls
from aos_contracts.events import GoalSubmitted, PlanRejected, RunAccepted, RunCancelRequested
from aos_plumbing.bus import Delivery, EventBus
from aos_plumbing.settings import CommonSettings


@pytest.fixture
async def bus(infra: InfraUrls, namespace: str) -> AsyncIterator[EventBus]:
    settings = CommonSettings(AOS_NATS_URL=infra.nats_url, AOS_NAMESPACE=namespace)
    bus = await EventBus.open(settings, "planner")
    try:
        yield bus
    finally:
        for context in ("goals", "plans", "runs", "budget", "parked"):
            await bus.js.delete_stream(bus.stream(context))
        await bus.close()


def goal() -> GoalSubmitted:
    return GoalSubmitted(run_id=uuid.uuid4(), tenant="acme", goal="g", budget_cents=1)


async def test_a_watch_sees_a_runs_earlier_and_later_events_and_only_that_runs(
    bus: EventBus,
) -> None:
    mine, other = goal(), goal()
    accepted = mine.caused(
        RunAccepted, "run.accepted", goal="g", budget_cents=1, planner_backend="stub"
    )
    await bus.publish_all([accepted, other.caused(PlanRejected, "plan.rejected", reasons=["x"])])
    watch = await bus.watch_run("plans", "acme", mine.run_id)
    try:
        first = await watch.wait_for(lambda event: True, timeout_s=5)
        assert first.event_id == accepted.event_id
        later = mine.caused(PlanRejected, "plan.rejected", reasons=["late"])
        await bus.publish(later)
        found = await watch.wait_for(lambda event: isinstance(event, PlanRejected), 5)
        assert found.event_id == later.event_id
        with pytest.raises(TimeoutError):
            await watch.wait_for(lambda event: True, timeout_s=0.3)
    finally:
        await watch.close()
    # The ordered consumer is gone at once, not after its inactivity threshold.
    info = await bus.js.stream_info(bus.stream("plans"))
    assert info.state.consumer_count == 0
    events = await bus.run_events("plans", "acme", mine.run_id)
    assert [event.event_id for event in events] == [accepted.event_id, later.event_id]
    assert await bus.run_events("plans", "acme", uuid.uuid4()) == []


async def consume_one_slowly(bus: EventBus, handling_s: float) -> list[int]:
    """Deliveries of one goal to a handler that takes `handling_s` the first time."""
    seen: list[int] = []

    async def handler(deliveries: list[Delivery]) -> list[Delivery]:
        for delivery in deliveries:
            seen.append(delivery.num_delivered)
            if delivery.num_delivered == 1:
                await asyncio.sleep(handling_s)
        return []

    consumer = bus.consumer("goals", "slow", handler)
    await consumer.start()
    try:
        await bus.publish(goal())
        await asyncio.sleep(handling_s + 2 * bus.ack_wait_s)
    finally:
        await consumer.stop()
    return seen


async def test_a_handler_slower_than_the_ack_wait_keeps_its_message(bus: EventBus) -> None:
    bus.ack_wait_s = 1.0
    assert await consume_one_slowly(bus, handling_s=2.5) == [1]


class ProgressRecorder:
    """Stands in for a delivered message: counts the progress reports made for it."""

    def __init__(self) -> None:
        self.reports = 0

    async def in_progress(self) -> None:
        self.reports += 1


async def test_a_hung_handler_stops_reporting_progress_after_the_limit(bus: EventBus) -> None:
    bus.ack_wait_s, bus.max_handling_s = 0.2, 0.5
    message = ProgressRecorder()
    delivery = Delivery(message, 1, "subject", goal(), 1)  # type: ignore[arg-type]
    consumer = bus.consumer("goals", "hung", lambda deliveries: asyncio.sleep(0))
    reporting = asyncio.create_task(consumer._keep_in_progress([delivery]))
    await asyncio.sleep(1.5)
    # It gave up by itself: the ack wait may now redeliver what a hung handler holds.
    assert reporting.done()
    assert 1 <= message.reports <= 4  # every 0.1 s, for less than 0.5 s


async def test_a_consumer_decodes_only_the_types_it_wants_and_acks_the_rest(
    bus: EventBus,
) -> None:
    wanted, unwanted = goal(), goal()
    cancel = RunCancelRequested(run_id=unwanted.run_id, tenant="acme")
    await bus.publish_all([cancel, wanted])
    seen: list[str] = []

    async def handler(deliveries: list[Delivery]) -> list[Delivery]:
        seen.extend(str(delivery.event.type) for delivery in deliveries)
        return []

    consumer = bus.consumer("goals", "picky", handler, event_types={"goal.submitted"})
    await consumer.start()
    try:
        for _ in range(50):
            info = await bus.js.consumer_info(bus.stream("goals"), "picky")
            if info.num_pending == 0 and info.num_ack_pending == 0 and seen:
                break
            await asyncio.sleep(0.1)
    finally:
        await consumer.stop()
    assert seen == ["goal.submitted"]
    assert (info.num_pending, info.num_ack_pending) == (0, 0)  # the cancel was acked too
