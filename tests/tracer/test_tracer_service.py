"""The tracer as a real process: events in through NATS, answers out through its API."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from aos_cli.embedded import InfraUrls
from aos_contracts.parked import ParkedMessage
from aos_contracts.subjects import goal_subject, parked_subject, stream_name
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
    }
    process = ServiceProcess("tracer", env, log_dir).start()
    yield process
    process.stop()


@pytest.fixture
async def api(tracer: ServiceProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=tracer.url, timeout=10.0) as client:
        yield client


async def test_runs_steps_events_and_timeline_are_served(
    infra: InfraUrls, namespace: str, api: httpx.AsyncClient
) -> None:
    first = happy_run("acme")
    second = retried_then_failed_run("acme", start=START + timedelta(minutes=1))
    other = happy_run("globex", start=START + timedelta(minutes=2))
    stories = [first, second, other]
    nc = await nats.connect(infra.nats_url)
    try:
        await publish(nc.jetstream(), namespace, [e for s in stories for e in s.events])
    finally:
        await nc.drain()

    async def listed() -> list[dict[str, Any]]:
        return list((await api.get("/runs")).json()["runs"])

    await until(
        listed,
        lambda runs: sorted(run["status"] for run in runs) == ["completed", "completed", "failed"],
        what="all three runs ended",
    )
    acme = (await api.get("/runs", params={"tenant": "acme"})).json()["runs"]
    assert [run["run_id"] for run in acme] == [str(second.run_id), str(first.run_id)]
    assert acme[1] == {
        "run_id": str(first.run_id),
        "tenant": "acme",
        "goal": first.goal.goal,
        "status": "completed",
        "budget_cents": 100,
        "cost_cents": 7,
        "created_at": START.isoformat(),
        "ended_at": first.events[-1].occurred_at.isoformat(),
    }
    failed = (await api.get("/runs", params={"status": "failed", "limit": "5"})).json()["runs"]
    assert [run["run_id"] for run in failed] == [str(second.run_id)]

    detail = (await api.get(f"/runs/{second.run_id}", params={"tenant": "acme"})).json()
    assert detail["run"] == acme[0]
    assert detail["steps"] == [
        {
            "step_id": "fetch",
            "skill": "http_call",
            "status": "failed",
            "attempts": 2,
            "started_at": second.events[6].occurred_at.isoformat(),
            "ended_at": second.events[12].occurred_at.isoformat(),
            "duration_ms": 80.0,
            "cost_cents": 2,
            "tokens": None,
            "error_code": "HTTP_5XX",
        }
    ]
    assert [event["event"] for event in detail["events"]] == [
        event.model_dump(mode="json") for event in second.events
    ]
    assert {event["stream"] for event in detail["events"]} == {
        stream_name(context, namespace) for context in ("goals", "plans", "runs", "budget")
    }

    timeline = await api.get(f"/runs/{first.run_id}/timeline")
    assert timeline.status_code == 200
    assert timeline.headers["content-type"].startswith("text/plain")
    assert f"run      {first.run_id}" in timeline.text
    assert "status   completed" in timeline.text
    assert "summarise" in timeline.text


async def test_isolation_and_bad_requests_get_clear_errors(api: httpx.AsyncClient) -> None:
    missing = uuid.uuid4()
    response = await api.get(f"/runs/{missing}")
    assert (response.status_code, response.json()) == (404, {"error": f"run {missing} not found"})
    assert (await api.get(f"/runs/{missing}/timeline")).status_code == 404
    for path, params in [
        ("/runs/not-a-run-id", {}),
        ("/runs", {"limit": "zero"}),
        ("/runs", {"limit": "0"}),
        ("/runs", {"status": "sleeping"}),
        ("/runs", {"tenant": "Not A Tenant!"}),
        ("/parked", {"limit": "-1"}),
    ]:
        response = await api.get(path, params=params)
        assert response.status_code == 400, (path, params)
        assert response.json()["error"]


async def test_another_tenants_run_is_not_found(
    infra: InfraUrls, namespace: str, api: httpx.AsyncClient
) -> None:
    story = happy_run("acme")
    nc = await nats.connect(infra.nats_url)
    try:
        await publish(nc.jetstream(), namespace, story.events)
    finally:
        await nc.drain()
    await until(
        lambda: api.get(f"/runs/{story.run_id}", params={"tenant": "acme"}),
        lambda response: response.status_code == 200,
        what="the run is traced",
    )
    for path in (f"/runs/{story.run_id}", f"/runs/{story.run_id}/timeline"):
        response = await api.get(path, params={"tenant": "globex"})
        assert response.status_code == 404
        assert response.json() == {"error": f"run {story.run_id} not found"}
    assert (await api.get("/runs", params={"tenant": "globex"})).json() == {"runs": []}


async def test_undecodable_messages_and_parked_messages_show_in_parked(
    infra: InfraUrls, namespace: str, api: httpx.AsyncClient
) -> None:
    garbage_subject = goal_subject("acme", uuid.uuid4(), namespace)
    parked_elsewhere = ParkedMessage.of(
        service="x",
        reason="handler failed 5 times",
        stream=stream_name("runs", namespace),
        stream_seq=42,
        subject=f"{namespace}.runs.acme.r1",
        headers={},
        data=b'{"type": "?"}',
    )
    nc = await nats.connect(infra.nats_url)
    try:
        js = nc.jetstream()
        await js.publish(garbage_subject, b"\x00garbage, not an event")
        await js.publish(
            parked_subject("x", namespace), parked_elsewhere.model_dump_json().encode()
        )
        await js.publish(parked_subject("y", namespace), b"not a parked message either")
    finally:
        await nc.drain()

    async def parked() -> list[dict[str, Any]]:
        return list((await api.get("/parked")).json()["parked"])

    rows = await until(parked, lambda rows: len(rows) == 3, what="three parked messages")
    by_service = {row["service"]: row for row in rows}
    assert set(by_service) == {"tracer", "x", "y"}

    ours = by_service["tracer"]  # the tracer's own goals consumer parked the garbage
    assert ours["stream"] == stream_name("goals", namespace)
    assert ours["subject"] == garbage_subject
    assert ours["reason"].startswith("not JSON")
    assert ours["data"] == "\x00garbage, not an event"

    assert by_service["x"]["reason"] == "handler failed 5 times"
    assert by_service["x"]["stream_seq"] == 42
    assert by_service["x"]["data"] == '{"type": "?"}'
    assert by_service["x"]["parked_at"] == parked_elsewhere.parked_at.isoformat()

    unreadable = by_service["y"]
    assert unreadable["reason"].startswith("not a parked message")
    assert unreadable["stream"] == stream_name("parked", namespace)
    assert unreadable["data"] == "not a parked message either"


async def test_readiness_names_the_trace_backend(
    infra: InfraUrls, namespace: str, log_dir: Path, api: httpx.AsyncClient
) -> None:
    ready = (await api.get("/readyz")).json()
    assert ready["backends"] == {"traces": "postgres", "auth": "stub", "rbac": "off"}
    assert ready["checks"] == {"nats": True, "postgres": True}

    env = {"AOS_NATS_URL": infra.nats_url, "AOS_NAMESPACE": namespace}
    memory = ServiceProcess("tracer", {**env, "USE_POSTGRES_TRACES": "false"}, log_dir / "m")
    (log_dir / "m").mkdir()
    memory.start()
    try:
        async with httpx.AsyncClient(base_url=memory.url) as client:
            ready = (await client.get("/readyz")).json()
    finally:
        memory.stop()
    assert ready["backends"] == {"traces": "memory", "auth": "stub", "rbac": "off"}
    assert ready["checks"] == {"nats": True, "memory": True}
