"""The tracer's side of parked messages: its parked consumer survives empty fetches and
restarts, the stores find, mark and forget a parked message by its id (its sequence in
the parked stream), and the tracer process stops cleanly, saying so."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from aos_cli.embedded import InfraUrls
from aos_contracts.parked import ParkedMessage
from aos_contracts.subjects import parked_subject
from aos_plumbing.bus import EventBus
from aos_tracer.consumers import ParkedConsumer
from aos_tracer.postgres import PostgresTraceStore
from aos_tracer.rows import ParkedRow
from aos_tracer.store import InMemoryTraceStore, TraceStore
from tests.support.processes import ServiceProcess
from tests.tracer.polling import until

pytestmark = pytest.mark.integration


def parked(reason: str, original_seq: int = 7) -> ParkedMessage:
    return ParkedMessage.of(
        service="planner",
        reason=reason,
        stream="AOS_GOALS",
        stream_seq=original_seq,
        subject="aos.goals.acme.x",
        headers={},
        data=b"{}",
    )


async def publish_parked(bus: EventBus, reason: str, original_seq: int = 7) -> None:
    await bus.js.publish(
        parked_subject("planner", bus.namespace),
        parked(reason, original_seq).model_dump_json().encode(),
    )


@pytest.fixture
async def bus(infra: InfraUrls, namespace: str) -> AsyncIterator[EventBus]:
    bus = await EventBus.connect(infra.nats_url, namespace, "test")
    await bus.ensure_streams()
    yield bus
    await bus.close()


async def test_the_parked_consumer_survives_empty_fetches_and_a_restart(bus: EventBus) -> None:
    store = InMemoryTraceStore()
    consumer = ParkedConsumer(bus, store)
    await consumer.start()
    try:
        await idle_then_store(bus, store, consumer)
    finally:
        await consumer.stop()

    restarted = ParkedConsumer(bus, store)
    await restarted.start()
    try:
        await publish_parked(bus, "after the restart", original_seq=8)
        rows = await until(lambda: store.list_parked(10), lambda rows: len(rows) == 2)
        assert sorted(row.parked_seq or 0 for row in rows) == [1, 2]
    finally:
        await restarted.stop()


async def idle_then_store(
    bus: EventBus, store: InMemoryTraceStore, consumer: ParkedConsumer
) -> None:
    """Three empty fetches (what an idle stream gives), then a parked message is stored."""
    assert consumer._sub is not None
    fetch = consumer._sub.fetch
    empty_answers = 0

    async def idle_then_real(batch: int = 1, timeout: float | None = 5.0) -> list[object]:  # noqa: ASYNC109 (nats-py's signature)
        # What nats-py returns when the server ends a lingering pull on an idle stream.
        nonlocal empty_answers
        if empty_answers < 3:
            empty_answers += 1
            return []
        return list(await fetch(batch, timeout=timeout))

    consumer._sub.fetch = idle_then_real  # type: ignore[method-assign,assignment]
    await until(lambda: _value(empty_answers), lambda n: n >= 3, what="three empty fetches")
    await publish_parked(bus, "after idling")
    rows = await until(lambda: store.list_parked(10), lambda rows: len(rows) == 1)
    assert rows[0].reason == "after idling" and rows[0].parked_seq == 1
    assert consumer._task is not None and not consumer._task.done()


async def _value(value: int) -> int:
    return value


def row(parked_seq: int, reason: str) -> ParkedRow:
    message = parked(reason)
    return ParkedRow(
        service=message.service,
        reason=reason,
        stream=message.stream,
        stream_seq=parked_seq,
        subject=message.subject,
        parked_at=message.parked_at,
        payload=message.model_dump(mode="json"),
        parked_seq=parked_seq,
    )


@pytest.fixture(params=["memory", "postgres"])
async def store(request: pytest.FixtureRequest, database: str) -> AsyncIterator[TraceStore]:
    if request.param == "memory":
        yield InMemoryTraceStore()
        return
    postgres = PostgresTraceStore(database)
    await postgres.start()
    yield postgres
    await postgres.close()


async def test_a_parked_message_is_found_marked_replayed_once_and_dropped_by_its_id(
    store: TraceStore,
) -> None:
    await store.add_parked("AOS_PARKED", 2, [row(1, "first"), row(2, "second")])
    assert (await store.get_parked(1) or row(0, "")).reason == "first"
    found = await store.get_parked(2)
    assert found is not None and found.reason == "second" and found.status == "parked"
    assert await store.get_parked(3) is None

    at = datetime(2025, 6, 1, tzinfo=UTC)
    marked = await store.mark_replayed(2, at)
    assert marked is not None and marked.replayed_at == at and marked.status == "replayed"
    again = await store.mark_replayed(2, datetime.now(UTC))
    assert again is not None and again.replayed_at == at  # the first replay counts
    assert await store.mark_replayed(3, at) is None
    assert [r.parked_seq for r in await store.list_parked(10, "parked")] == [1]
    assert [r.parked_seq for r in await store.list_parked(10, "replayed")] == [2]

    assert await store.drop_parked(1) is True
    assert await store.drop_parked(1) is False
    assert [r.parked_seq for r in await store.list_parked(10)] == [2]
    assert (await store.get_parked(2) or row(0, "")).to_full_json()["data_b64"] == "e30="


async def test_the_tracer_stops_cleanly_and_says_so(
    infra: InfraUrls, namespace: str, log_dir: Path, bus: EventBus
) -> None:
    env = {
        "AOS_NATS_URL": infra.nats_url,
        "AOS_NAMESPACE": namespace,
        "USE_POSTGRES_TRACES": "false",
    }
    tracer = ServiceProcess("tracer", env, log_dir).start()
    try:
        await publish_parked(bus, f"seen before stopping {uuid.uuid4()}")
        assert tracer.terminate() == 0
    finally:
        tracer.stop()
    log = tracer.log_path.read_text()
    assert "tracer stopped" in log, tracer.tail()
    assert "Traceback" not in log, tracer.tail()
