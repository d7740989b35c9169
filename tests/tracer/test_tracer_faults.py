"""Fault tests: a tracer killed while it consumes, and a tracer whose database was lost.

Both end the same way: every published event is stored exactly once, and the runs and
steps read back exactly as they would from a tracer that never failed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import nats
import pytest

from aos_cli.embedded import InfraUrls
from aos_contracts import EventEnvelope
from aos_contracts.parked import ParkedMessage
from aos_contracts.subjects import CONTEXTS, goal_subject, parked_subject, stream_name
from tests.support.processes import ServiceProcess
from tests.tracer.polling import until
from tests.tracer.tracer_events import START, happy_run, publish, retried_then_failed_run

pytestmark = pytest.mark.integration


@pytest.fixture
def tracer(
    infra: InfraUrls, namespace: str, database: str, log_dir: Path
) -> Iterator[ServiceProcess]:
    env = {
        "AOS_NATS_URL": infra.nats_url,
        "AOS_NAMESPACE": namespace,
        "AOS_TRACER_DATABASE_URL": database,
        # Small batches: more transactions, so a kill lands between two of them.
        "AOS_CONSUMER_BATCH": "20",
    }
    process = ServiceProcess("tracer", env, log_dir)
    yield process
    process.stop()


async def fetchval(database: str, sql: str) -> Any:
    conn = await asyncpg.connect(database)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def stored_count(database: str) -> int:
    return int(await fetchval(database, "SELECT count(*) FROM events"))


async def publish_all(nats_url: str, namespace: str, events: list[EventEnvelope]) -> None:
    nc = await nats.connect(nats_url)
    try:
        await publish(nc.jetstream(), namespace, events)
    finally:
        await nc.drain()


async def test_a_tracer_killed_while_consuming_stores_every_event_exactly_once(
    infra: InfraUrls, namespace: str, database: str, tracer: ServiceProcess
) -> None:
    tracer.start()  # declares the streams and its consumers
    tracer.terminate()
    stories = [happy_run(f"t{n % 4}", start=START + timedelta(seconds=n)) for n in range(250)]
    events = [event for story in stories for event in story.events]
    await publish_all(infra.nats_url, namespace, events)

    stored = 0
    for _ in range(3):
        tracer.start()

        def progressed(n: int, before: int = stored) -> bool:
            return n > before

        stored = await until(lambda: stored_count(database), progressed, what="progress")
        tracer.kill()  # SIGKILL: mid-transaction, or committed but not acknowledged
    tracer.start()
    # Batches the kills left unacknowledged come back after the consumer's ack wait.
    await until(
        lambda: stored_count(database),
        lambda n: n >= len(events),
        give_up_after_s=150,
        what="catch up",
    )

    conn = await asyncpg.connect(database)
    try:
        ids = [row["event_id"] for row in await conn.fetch("SELECT event_id FROM events")]
        runs = await conn.fetch("SELECT run_id, status, cost_cents FROM runs")
        steps = await conn.fetch("SELECT status, attempts, cost_cents FROM steps")
        tracked = {
            row["stream"]: row["last_seq"]
            for row in await conn.fetch("SELECT stream, last_seq FROM tracking")
        }
    finally:
        await conn.close()
    assert len(ids) == len(events)
    assert set(ids) == {event.event_id for event in events}
    assert {row["run_id"] for row in runs} == {story.run_id for story in stories}
    assert {(row["status"], row["cost_cents"]) for row in runs} == {("completed", 7)}
    assert len(steps) == 2 * len(stories)
    assert {(row["status"], row["attempts"]) for row in steps} == {("succeeded", 1)}
    assert sum(row["cost_cents"] for row in steps) == 7 * len(stories)
    nc = await nats.connect(infra.nats_url)
    try:
        for context in CONTEXTS:
            info = await nc.jetstream().stream_info(stream_name(context, namespace))
            assert tracked[stream_name(context, namespace)] == info.state.last_seq
    finally:
        await nc.drain()


async def test_a_lost_database_is_rebuilt_from_the_log(
    infra: InfraUrls, namespace: str, database: str, tracer: ServiceProcess
) -> None:
    tracer.start()
    stories = [happy_run(start=START + timedelta(minutes=n)) for n in range(5)]
    stories.append(retried_then_failed_run("globex", start=START + timedelta(minutes=9)))
    events = [event for story in stories for event in story.events]
    await publish_all(infra.nats_url, namespace, events)
    parked = ParkedMessage.of(
        service="ledger",
        reason="handler failed 5 times",
        stream="X",
        stream_seq=3,
        subject="s",
        headers=None,
        data=b"{}",
    )
    nc = await nats.connect(infra.nats_url)
    try:
        await nc.jetstream().publish(goal_subject("acme", uuid.uuid4(), namespace), b"garbage")
        await nc.jetstream().publish(
            parked_subject("ledger", namespace), parked.model_dump_json().encode()
        )
    finally:
        await nc.drain()

    async def snapshot() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=tracer.url) as client:
            view: dict[str, Any] = {
                "runs": (await client.get("/runs", params={"limit": "100"})).json(),
                "parked": (await client.get("/parked")).json(),
            }
            for story in stories:
                view[str(story.run_id)] = (await client.get(f"/runs/{story.run_id}")).json()
                timeline = await client.get(f"/runs/{story.run_id}/timeline")
                view[f"{story.run_id}/timeline"] = timeline.text
        return view

    def complete(view: dict[str, Any]) -> bool:
        ended = [run for run in view["runs"]["runs"] if run["ended_at"] is not None]
        return len(ended) == len(stories) and len(view["parked"]["parked"]) == 2

    before = await until(snapshot, complete, what="everything traced")
    assert await stored_count(database) == len(events)

    # Lost: the database dropped and created again, empty.
    tracer.terminate()
    name = urlsplit(database).path.lstrip("/")
    admin = await asyncpg.connect(infra.postgres_url)
    try:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    tracer.start()
    assert await until(snapshot, complete, what="rebuilt after a drop") == before

    # Lost again: every table emptied under a stopped tracer.
    tracer.terminate()
    await fetchval(database, "TRUNCATE events, runs, steps, parked, tracking")
    tracer.start()
    assert await until(snapshot, complete, what="rebuilt after a truncate") == before
    assert await stored_count(database) == len(events)
