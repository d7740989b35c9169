"""Replay: a recorded run re-driven offline takes the same decisions; a changed fact shows."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
from typing import Any

import httpx

from tests.support.bus import RunWatcher, connected, submit_goal
from tests.system.conftest import System


async def record(system: System, goal: str, **inputs: Any) -> tuple[str, list[dict[str, Any]]]:
    async with connected(system.nats_url) as nc, RunWatcher(nc, system.namespace) as watcher:
        run_id = await submit_goal(nc, system.namespace, goal, budget_cents=50, inputs=inputs)
        await watcher.wait([run_id])
    async with httpx.AsyncClient(base_url=system.tracer.url) as client:
        for _ in range(100):
            body = (await client.get(f"/runs/{run_id}")).json()
            if body.get("run", {}).get("status") == "completed" and any(
                e["type"] == "budget.committed" for e in body["events"]
            ):
                return run_id, [item["event"] for item in body["events"]]
            await asyncio.sleep(0.1)
    raise AssertionError("run never fully traced")


async def replayed(system: System, events: list[dict[str, Any]]) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=system.executor.url) as client:
        response = await client.post("/replay", json={"events": events})
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_a_recorded_run_replays_with_the_same_decisions(system: System) -> None:
    run_id, events = await record(system, "summarize the notes", text="AOS replays runs.")
    report = await replayed(system, events)
    assert report["identical"], report["differences"]
    assert report["recorded_end"] == report["replayed_end"] == "run.completed"
    assert report["decisions"] >= 5  # two reservations, two starts, one end

    # The same through the CLI, which fetches the recording from the tracer.
    env = {
        **os.environ,
        "AOS_TRACER_URL": system.tracer.url,
        "AOS_EXECUTOR_URL": system.executor.url,
    }
    cli = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "aos_cli", "replay", run_id, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["identical"] is True


async def test_a_changed_recorded_output_shows_as_a_different_decision(system: System) -> None:
    _, events = await record(system, "summarize the notes", text="the original text")
    tampered = copy.deepcopy(events)
    for event in tampered:
        if event["type"] == "step.succeeded" and event["step_id"] == "text":
            event["output"] = "a different text"
    report = await replayed(system, tampered)
    assert not report["identical"]
    assert any(
        "step 'summary' attempt 1: params after resolution differ" in difference
        and "a different text" in difference
        for difference in report["differences"]
    ), report["differences"]


async def test_a_recording_without_a_plan_is_refused_clearly(system: System) -> None:
    async with httpx.AsyncClient(base_url=system.executor.url) as client:
        response = await client.post("/replay", json={"events": []})
        garbage = await client.post("/replay", json={"events": [{"type": "nope"}]})
    assert response.status_code == 400
    assert "no plan.created" in response.json()["error"]
    assert garbage.status_code == 400
