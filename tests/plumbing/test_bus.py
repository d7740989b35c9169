"""The bus's helpers for waiting on another service, for slow handlers, and for failed
deliveries (outages wait, poison is parked)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import asyncpg
import nats.errors
import pytest
import redis.exceptions
from nats.js.errors import NotFoundError

from aos_cli.embedded import InfraUrls
from aos_contracts.events import (
    EventEnvelope,
    GoalSubmitted,
    PlanRejected,
    RunAccepted,
    RunCancelRequested,
)
from aos_contracts.parked import ParkedMessage
from aos_plumbing.bus import BatchHandler, Delivery, EventBus, per_run
from aos_plumbing.outages import is_outage
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


# --- failed deliveries: outages wait, poison is parked -----------------------------------


async def parked_messages(bus: EventBus) -> list[ParkedMessage]:
    parked: list[ParkedMessage] = []
    seq = 1
    while True:
        try:
            raw = await bus.js.get_msg(bus.stream("parked"), seq=seq, next=True)
        except NotFoundError:
            return parked
        parked.append(ParkedMessage.model_validate_json(raw.data or b""))
        seq = (raw.seq or seq) + 1


async def until(condition: Callable[[], Awaitable[bool]], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not await condition():
        assert time.monotonic() < deadline, f"not true within {within_s} s"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def consumed(
    bus: EventBus, handler: BatchHandler, events: list[GoalSubmitted | RunCancelRequested]
) -> AsyncIterator[None]:
    """`handler` consuming the goals stream (parking after 2 deliveries) while `events`
    are published to it."""
    consumer = bus.consumer("goals", "outages", handler, park_after_deliveries=2)
    await consumer.start()
    try:
        await bus.publish_all(events)
        yield
    finally:
        await consumer.stop()


async def test_a_delivery_failing_for_an_outage_is_never_parked_and_its_run_waits(
    bus: EventBus,
) -> None:
    """The store is "down" for 6 deliveries, three times the parking threshold: the goal
    is not parked, and the run's next event is held back (and not parked either) until
    the goal is handled."""
    first = goal()
    later = RunCancelRequested(run_id=first.run_id, tenant="acme")
    handled: list[tuple[str, int]] = []

    async def handle(delivery: Delivery) -> None:
        if isinstance(delivery.event, GoalSubmitted) and delivery.num_delivered < 6:
            raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)")
        handled.append((str(delivery.event.type), delivery.num_delivered))

    async def both_handled() -> bool:
        return len(handled) == 2

    async with consumed(bus, per_run(handle, park_after_deliveries=2), [first, later]):
        await until(both_handled, within_s=30)
    assert [kind for kind, _ in handled] == ["goal.submitted", "run.cancel_requested"]
    assert handled[0][1] == 6
    assert handled[1][1] >= 2  # held back past the parking threshold, yet not parked
    assert await parked_messages(bus) == []


async def test_a_handler_error_is_parked_with_the_exception_and_its_run_goes_on(
    bus: EventBus,
) -> None:
    first = goal()
    later = RunCancelRequested(run_id=first.run_id, tenant="acme")
    handled: list[str] = []

    async def handle(delivery: Delivery) -> None:
        if isinstance(delivery.event, GoalSubmitted):
            raise ValueError("no such skill: teleport")
        handled.append(str(delivery.event.type))

    async def parked_and_handled() -> bool:
        return bool(handled) and bool(await parked_messages(bus))

    async with consumed(bus, per_run(handle, park_after_deliveries=2), [first, later]):
        await until(parked_and_handled, within_s=30)
    [parked] = await parked_messages(bus)
    assert parked.reason == (
        "handler failed 2 times; the last time with ValueError: no such skill: teleport"
    )
    assert parked.stream_seq == 1
    assert handled == ["run.cancel_requested"]  # behind the parked goal, then handled


async def test_an_outage_outlasting_the_bound_is_given_up_once_and_nothing_parked(
    bus: EventBus,
) -> None:
    """The dependency never comes back: after `give_up_after_s` the service's give-up
    ends the run (its events are published like a handler's), and the message is acked."""
    stuck = goal()
    gave_up: list[tuple[int, str]] = []
    published: list[EventEnvelope] = []

    async def handle(delivery: Delivery) -> None:
        raise asyncpg.CannotConnectNowError("the database system is starting up")

    async def give_up(delivery: Delivery, exc: BaseException) -> list[EventEnvelope]:
        gave_up.append((delivery.num_delivered, type(exc).__name__))
        assert isinstance(delivery.event, GoalSubmitted)
        return [delivery.event.caused(PlanRejected, "plan.rejected", reasons=["outage"])]

    async def publish(events: Sequence[EventEnvelope]) -> None:
        published.extend(events)

    async def acked() -> bool:
        info = await bus.js.consumer_info(bus.stream("goals"), "outages")
        return bool(gave_up) and info.num_ack_pending == 0 and info.num_pending == 0

    handler = per_run(
        handle, publish=publish, park_after_deliveries=2, give_up=give_up, give_up_after_s=0.5
    )
    async with consumed(bus, handler, [stuck]):
        await until(acked, within_s=30)
    assert len(gave_up) == 1 and gave_up[0][0] > 2 and gave_up[0][1] == "CannotConnectNowError"
    assert [type(event) for event in published] == [PlanRejected]
    assert await parked_messages(bus) == []


def test_outages_are_told_from_poison() -> None:
    assert is_outage(ConnectionRefusedError(111, "refused"))
    assert is_outage(asyncpg.AdminShutdownError("terminating connection"))
    assert is_outage(asyncpg.InterfaceError("connection is closed"))
    assert is_outage(redis.exceptions.ConnectionError("Connection refused"))
    assert is_outage(nats.errors.NoRespondersError())
    assert is_outage(TimeoutError())
    assert not is_outage(ValueError("bad"))
    assert not is_outage(asyncpg.DataError("invalid input"))  # an InterfaceError subclass
    assert not is_outage(asyncpg.UniqueViolationError("duplicate key"))
    assert not is_outage(None)
