"""The Postgres trace store on a real, fresh database."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest

from aos_contracts import GoalSubmitted, RunCompleted
from aos_contracts.parked import ParkedMessage
from aos_tracer.postgres import MIGRATIONS, PostgresTraceStore
from aos_tracer.rows import ParkedRow, TracedEvent
from aos_tracer.store import InMemoryTraceStore
from tests.tracer.tracer_events import START, happy_run, in_log, retried_then_failed_run

pytestmark = pytest.mark.integration


@pytest.fixture
async def store(database: str) -> AsyncIterator[PostgresTraceStore]:
    store = PostgresTraceStore(database)
    await store.start()
    yield store
    await store.close()


def by_stream(traced: list[TracedEvent]) -> dict[str, list[TracedEvent]]:
    batches: dict[str, list[TracedEvent]] = defaultdict(list)
    for item in traced:
        batches[item.stream].append(item)
    return batches


async def count(database: str, sql: str) -> int:
    conn = await asyncpg.connect(database)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def test_a_batch_is_stored_and_projected_like_the_memory_store_does(
    store: PostgresTraceStore, database: str
) -> None:
    stories = [happy_run(start=START + timedelta(minutes=n)) for n in range(3)]
    stories.append(retried_then_failed_run("globex", start=START + timedelta(minutes=5)))
    traced = in_log([event for story in stories for event in story.events])
    memory = InMemoryTraceStore()
    for stream, batch in by_stream(traced).items():
        assert await store.apply(stream, batch) == len(batch)
        await memory.apply(stream, batch)

    assert await count(database, "SELECT count(*) FROM events") == len(traced)
    for story in stories:
        assert await store.get_run(story.run_id) == await memory.get_run(story.run_id)
        assert await store.run_steps(story.run_id) == await memory.run_steps(story.run_id)
        assert await store.run_events(story.run_id) == await memory.run_events(story.run_id)
    assert await store.list_runs(tenant="acme", status="completed", limit=2) == [
        await memory.get_run(stories[2].run_id),
        await memory.get_run(stories[1].run_id),
    ]
    assert await store.get_run(uuid.uuid4()) is None


async def test_applying_the_same_batch_again_stores_nothing_twice(
    store: PostgresTraceStore, database: str
) -> None:
    traced = in_log(happy_run().events)
    batches = by_stream(traced)
    for stream, batch in batches.items():
        await store.apply(stream, batch)
    run_before = await store.get_run(traced[0].event.run_id)
    steps_before = await store.run_steps(traced[0].event.run_id)

    for stream, batch in batches.items():  # redelivered after a crash before the ack
        assert await store.apply(stream, batch) == 0
        assert await store.last_seq(stream) == batch[-1].stream_seq
    # The same event again at a later sequence (republished past the duplicate window).
    first = batches["AOS_RUNS"][0]
    again = TracedEvent(first.stream, 99, first.subject, first.event)
    assert await store.apply("AOS_RUNS", [again]) == 0
    assert await store.last_seq("AOS_RUNS") == 99
    assert await store.last_seq("AOS_NEVER_SEEN") == 0
    # A batch redelivered after later ones (its ack wait ran out) is stored, late.
    completed = happy_run().events[-1]
    assert isinstance(completed, RunCompleted)
    late = TracedEvent(first.stream, 100, first.subject, completed)
    assert await store.apply("AOS_RUNS", [late]) == 1
    assert await store.apply("AOS_RUNS", [TracedEvent(first.stream, 50, "s", late.event)]) == 0
    assert await store.last_seq("AOS_RUNS") == 100

    assert await count(database, "SELECT count(*) FROM events") == len(traced) + 1
    assert await store.get_run(traced[0].event.run_id) == run_before
    assert await store.run_steps(traced[0].event.run_id) == steps_before


async def test_batches_of_all_streams_applied_concurrently_lose_no_update(
    store: PostgresTraceStore,
) -> None:
    stories = [happy_run(f"t{n % 3}", start=START + timedelta(seconds=n)) for n in range(40)]
    traced = in_log([event for story in stories for event in story.events])
    memory = InMemoryTraceStore()
    for stream, batch in by_stream(traced).items():
        await memory.apply(stream, batch)

    async def feed(stream: str, batch: list[TracedEvent]) -> None:
        for index in range(0, len(batch), 7):
            await store.apply(stream, batch[index : index + 7])

    await asyncio.gather(*(feed(stream, batch) for stream, batch in by_stream(traced).items()))
    for story in stories:
        assert await store.get_run(story.run_id) == await memory.get_run(story.run_id)
        assert await store.run_steps(story.run_id) == await memory.run_steps(story.run_id)


async def test_text_postgres_cannot_hold_is_stored_readably(store: PostgresTraceStore) -> None:
    goal = GoalSubmitted(
        run_id=uuid.uuid4(),
        tenant="acme",
        goal="nul\x00inside",
        budget_cents=5,
        inputs={"k\x00": "v\x00"},
    )
    [traced] = in_log([goal])
    assert await store.apply(traced.stream, [traced]) == 1
    run = await store.get_run(goal.run_id)
    assert run is not None and run.goal == "nul\ufffdinside"
    [event] = await store.run_events(goal.run_id)
    assert event.payload["inputs"] == {"k\ufffd": "v\ufffd"}


async def test_migrations_run_once(store: PostgresTraceStore, database: str) -> None:
    second = PostgresTraceStore(database)
    await second.start()  # a restart, or a second replica: nothing left to migrate
    await second.close()
    assert await count(database, "SELECT count(*) FROM schema_migrations") == len(MIGRATIONS)


async def test_parked_messages_are_stored_once(store: PostgresTraceStore) -> None:
    parked = ParkedMessage.of(
        service="planner",
        reason="not JSON",
        stream="AOS_GOALS",
        stream_seq=7,
        subject="aos.goals.acme.x",
        headers={"h": "1"},
        data=b"\xffgarbage",
    )
    row = ParkedRow(
        service=parked.service,
        reason=parked.reason,
        stream=parked.stream,
        stream_seq=parked.stream_seq,
        subject=parked.subject,
        parked_at=parked.parked_at,
        payload=parked.model_dump(mode="json"),
    )
    await store.add_parked("AOS_PARKED", 3, [row])
    await store.add_parked("AOS_PARKED", 3, [row])
    [stored] = await store.list_parked(10)
    assert stored == row
    assert stored.to_json()["data"] == "\ufffdgarbage"
    assert await store.last_seq("AOS_PARKED") == 3
