"""Done-when of issue 3: fetch-and-summarise through all four services as processes,
with real httpx against a local HTTP server and the real anthropic SDK against a local
Messages API server; and the same goal refused when external calls are disabled."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from aos_contracts.progress import progress_subject
from tests.executor.messages_api import MessagesApi
from tests.support.bus import RunWatcher, connected, read_stream, submit_goal
from tests.support.http import serve_on_loopback
from tests.system.conftest import System

NOTES = {"notes": ["AOS plans goals.", "It budgets every step.", "It traces runs."]}


class NotesServer:
    """GET /notes: first a 503 asking to retry (so the trace shows a retry), then JSON."""

    def __init__(self) -> None:
        self.hits = 0
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.hits == 1:
            return web.Response(status=503, text="warming up", headers={"Retry-After": "0"})
        return web.json_response(NOTES)


@pytest.fixture
async def notes() -> AsyncIterator[NotesServer]:
    server = NotesServer()
    app = web.Application()
    app.router.add_get("/notes", server.handle)
    runner, server.port = await serve_on_loopback(app)
    try:
        yield server
    finally:
        await runner.cleanup()


@pytest.fixture
async def messages_api() -> AsyncIterator[MessagesApi]:
    api = await MessagesApi(script=["429"], retry_after="0").start()
    try:
        yield api
    finally:
        await api.stop()


async def restart_executor(system: System, env: dict[str, str]) -> None:
    system.executor.stop()
    system.executor.env.update(env)
    await asyncio.to_thread(system.executor.start)


async def traced(system: System, run_id: str) -> dict[str, Any]:
    """The tracer's view of a run, once it holds the run's end."""
    async with httpx.AsyncClient(base_url=system.tracer.url) as client:
        for _ in range(300):
            response = await client.get(f"/runs/{run_id}")
            if response.status_code == 200:
                body: dict[str, Any] = response.json()
                if body["run"]["status"] in ("completed", "failed"):
                    return body
            await asyncio.sleep(0.1)
    raise AssertionError(f"run {run_id} never ended in the tracer")


def payloads(trace: dict[str, Any], event_type: str) -> list[dict[str, Any]]:
    return [e["event"] for e in trace["events"] if e["type"] == event_type]


async def test_fetch_and_summarise_runs_on_real_httpx_and_real_sdk(
    system: System, notes: NotesServer, messages_api: MessagesApi
) -> None:
    await restart_executor(
        system,
        {
            "ANTHROPIC_API_KEY": "test",
            "ANTHROPIC_BASE_URL": messages_api.base_url,
            "AOS_HTTP_ALLOW_HOSTS": "127.0.0.1",
            "DISABLE_EXTERNAL_CALLS": "0",
        },
    )
    async with httpx.AsyncClient() as client:
        readiness = await client.get(f"{system.executor.url}/readyz")
    backends = readiness.json()["backends"]
    assert backends["skill:llm_invoke"] == "claude"
    assert backends["skill:http_call"] == "httpx"

    ns = system.namespace
    progress: list[dict[str, Any]] = []
    async with connected(system.nats_url) as nc, RunWatcher(nc, ns) as watcher:

        async def on_progress(msg: Any) -> None:
            progress.append(json.loads(msg.data))

        await nc.subscribe(progress_subject("acme", "*", ns), cb=on_progress)
        goal = f"fetch http://127.0.0.1:{notes.port}/notes and summarize"
        run_id = await submit_goal(nc, ns, goal, budget_cents=100)
        end = (await watcher.wait([run_id]))[run_id]
        await nc.flush()
    assert end["type"] == "run.completed", end
    assert end["outputs"]["summary"]["text"] == messages_api.text
    assert end["cost_cents"] == 1

    # The model saw the fetched notes, through the json_transform step.
    [request] = [r for r in messages_api.requests if r.get("stream")][-1:]
    assert "It budgets every step." in request["messages"][0]["content"]
    assert len(messages_api.requests) == 2  # the 429, then the answer

    # Live progress arrived on core NATS: the body's chunks and the model's deltas.
    mine = [p for p in progress if p["run_id"] == run_id]
    assert {p["step_id"] for p in mine if p["kind"] == "http.chunk"} == {"fetch"}
    text = "".join(p["text"] for p in mine if p["kind"] == "llm.text")
    assert text == messages_api.text

    trace = await traced(system, run_id)
    succeeded = {p["step_id"]: p for p in payloads(trace, "step.succeeded")}
    fetch = succeeded["fetch"]["telemetry"]
    assert fetch["backend"] == "httpx" and fetch["retries"] == 1 and fetch["calls"] == 2
    assert fetch["circuit"] == f"http:127.0.0.1:{notes.port}"
    assert fetch["circuit_state"] == "closed" and fetch["status_code"] == 200
    summary = succeeded["summary"]
    assert summary["cost_cents"] == 1 and summary["is_stub"] is False
    usage = summary["telemetry"]
    assert usage["backend"] == "claude" and usage["retries"] == 1
    assert usage["circuit"] == "llm:claude" and usage["circuit_state"] == "closed"
    assert (usage["input_tokens"], usage["output_tokens"]) == (1200, 80)
    assert usage["cache_creation_input_tokens"] == 400
    assert usage["cache_read_input_tokens"] == 2000
    steps = {step["step_id"]: step for step in trace["steps"]}
    assert steps["summary"]["cost_cents"] == 1 and steps["summary"]["tokens"] == 1200 + 80
    assert trace["run"]["cost_cents"] == 1


async def test_with_external_calls_disabled_the_goal_fails_at_the_fetch_and_costs_nothing(
    system: System, notes: NotesServer, messages_api: MessagesApi
) -> None:
    await restart_executor(
        system,
        {
            "ANTHROPIC_API_KEY": "test",
            "ANTHROPIC_BASE_URL": messages_api.base_url,
            "DISABLE_EXTERNAL_CALLS": "1",
            "AOS_HTTP_ALLOW_HOSTS": "api.example.com",
        },
    )
    ns = system.namespace
    async with connected(system.nats_url) as nc, RunWatcher(nc, ns) as watcher:
        goal = f"fetch http://127.0.0.1:{notes.port}/notes and summarize"
        run_id = await submit_goal(nc, ns, goal, budget_cents=100)
        end = (await watcher.wait([run_id]))[run_id]
        runs = [e for e in await read_stream(nc, ns, "runs") if e["run_id"] == run_id]
    assert end["type"] == "run.failed"
    assert end["error"]["code"] == "EXTERNAL_CALLS_DISABLED"
    assert end["error"]["retryable"] is False
    assert end["failed_step_id"] == "fetch"
    assert end["cost_cents"] == 0
    # Nothing left the process, and the later steps never asked for budget or started.
    assert notes.hits == 0 and messages_api.requests == []
    touched = {e.get("step_id") for e in runs if "step_id" in e}
    assert touched == {"fetch"}
    [failed] = [e for e in runs if e["type"] == "step.failed"]
    assert failed["will_retry"] is False and failed["attempt"] == 1

    trace = await traced(system, run_id)
    assert trace["run"]["status"] == "failed" and trace["run"]["cost_cents"] == 0
    committed = [p for p in payloads(trace, "budget.committed") if p.get("committed_cents", 0) > 0]
    assert committed == []
