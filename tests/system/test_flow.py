"""End to end through the four services as processes, on real NATS, Redis and Postgres."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter

import httpx

from tests.support.bus import RunWatcher, connected, read_stream, submit_goal
from tests.system.conftest import System


async def test_a_goal_published_with_plain_nats_completes_and_is_traced(system: System) -> None:
    # What a user's program does with nothing but nats-py and the documented JSON Schema.
    run_id = str(uuid.uuid4())
    goal = {
        "type": "goal.submitted",
        "event_id": str(uuid.uuid4()),
        "run_id": run_id,
        "tenant": "acme",
        "goal": "summarize the release notes",
        "budget_cents": 50,
        "inputs": {"text": "AOS 0.1 ships a planner, an executor, a ledger and a tracer."},
    }
    async with connected(system.nats_url) as nc, RunWatcher(nc, system.namespace) as watcher:
        await nc.jetstream().publish(
            f"{system.namespace}.goals.acme.{run_id}",
            json.dumps(goal).encode(),
            headers={"Nats-Msg-Id": goal["event_id"]},
        )
        ends = await watcher.wait([run_id])
    end = ends[run_id]
    assert end["type"] == "run.completed", end
    assert end["outputs"]["summary"]["text"].startswith("[stub ")
    assert 0 < end["cost_cents"] <= 50

    timeline = await _eventually_traced(system, run_id, "completed")
    steps = {step["step_id"]: step for step in timeline["steps"]}
    assert set(steps) == {"text", "summary"}
    assert all(step["status"] == "succeeded" for step in steps.values())
    assert steps["summary"]["cost_cents"] == end["cost_cents"]


async def test_a_malformed_goal_is_parked_and_the_planner_serves_the_next(system: System) -> None:
    async with connected(system.nats_url) as nc, RunWatcher(nc, system.namespace) as watcher:
        js = nc.jetstream()
        bad_run = str(uuid.uuid4())
        await js.publish(f"{system.namespace}.goals.acme.{bad_run}", b"{this is not an event")
        await js.publish(
            f"{system.namespace}.goals.acme.{bad_run}",
            json.dumps({"type": "goal.submitted", "run_id": bad_run, "tenant": "acme"}).encode(),
        )
        good_run = await submit_goal(nc, system.namespace, "bench 2", budget_cents=5)
        ends = await watcher.wait([good_run])
        assert ends[good_run]["type"] == "run.completed"
        parked = [
            p
            for p in await read_stream(nc, system.namespace, "parked")
            if p["service"] == "planner"
        ]
    reasons = sorted(p["reason"] for p in parked)
    assert len(reasons) == 2
    assert reasons[0].startswith("invalid event") and "budget_cents" in reasons[0]
    assert reasons[1].startswith("not JSON")


async def test_a_goal_resubmitted_with_the_same_id_runs_once(system: System) -> None:
    async with connected(system.nats_url) as nc, RunWatcher(nc, system.namespace) as watcher:
        run_id = str(uuid.uuid4())
        payload = {
            "type": "goal.submitted",
            "event_id": str(uuid.uuid4()),
            "run_id": run_id,
            "tenant": "acme",
            "goal": "bench 1",
            "budget_cents": 5,
        }
        for _ in range(3):
            await nc.jetstream().publish(
                f"{system.namespace}.goals.acme.{run_id}",
                json.dumps(payload).encode(),
                headers={"Nats-Msg-Id": payload["event_id"]},
            )
        await watcher.wait([run_id])
        plans = await read_stream(nc, system.namespace, "plans")
    assert Counter(p["type"] for p in plans if p["run_id"] == run_id) == {
        "run.accepted": 1,
        "plan.created": 1,
    }


async def test_over_budget_and_unplannable_goals_fail_with_codes(system: System) -> None:
    async with connected(system.nats_url) as nc, RunWatcher(nc, system.namespace) as watcher:
        dear = await submit_goal(
            nc, system.namespace, "summarize x", budget_cents=0, inputs={"text": "x"}
        )
        odd = await submit_goal(nc, system.namespace, "make me a sandwich")
        ends = await watcher.wait([dear, odd])
    assert ends[dear]["type"] == "run.failed"
    assert ends[dear]["error"]["code"] == "BUDGET_EXCEEDED"
    assert ends[odd]["error"]["code"] == "PLAN_INVALID"


async def _eventually_traced(system: System, run_id: str, status: str) -> dict:  # type: ignore[type-arg]
    async with httpx.AsyncClient(base_url=system.tracer.url) as client:
        for _ in range(100):
            response = await client.get(f"/runs/{run_id}")
            if response.status_code == 200 and response.json()["run"]["status"] == status:
                return response.json()  # type: ignore[no-any-return]
            await asyncio.sleep(0.1)
    raise AssertionError(f"run {run_id} never traced as {status}")
