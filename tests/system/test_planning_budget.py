"""The Anthropic planner's calls budgeted on the real ledger, through all four services:
reserved before each call, committed after, charged to the run; a call the budget cannot
cover is never made; a recorded plan is reused without a call."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from aos_contracts import GoalSubmitted
from aos_contracts.codec import encode_event, event_headers
from aos_contracts.subjects import goal_subject
from tests.planner.scripted_messages_api import (
    SUMMARY_PLAN,
    ScriptedMessagesApi,
    error,
    first_request,
    plan_call,
)
from tests.support.bus import RunWatcher, connected, read_stream
from tests.system.conftest import System


@pytest.fixture
async def api() -> AsyncIterator[ScriptedMessagesApi]:
    server = await ScriptedMessagesApi(replies=[]).start()
    try:
        yield server
    finally:
        await server.stop()


async def use_anthropic_planner(system: System, api: ScriptedMessagesApi, **env: str) -> None:
    system.planner.stop()
    system.planner.env.update(
        {
            "PLANNER_BACKEND": "anthropic",
            "ANTHROPIC_API_KEY": "test-key",
            "ANTHROPIC_BASE_URL": api.base_url,
            "AOS_PLANNER_MAX_TOKENS": "1024",
            # The planner's own retries are what is tested, not the SDK's.
            "AOS_ANTHROPIC_MAX_RETRIES": "0",
            **env,
        }
    )
    await asyncio.to_thread(system.planner.start)


async def submit(system: System, nc: Any, budget_cents: int, **fields: Any) -> str:
    goal = GoalSubmitted(
        run_id=uuid.uuid4(),
        tenant="acme",
        goal="summarize the notes",
        budget_cents=budget_cents,
        inputs={"text": "AOS plans goals. It budgets every step."},
        **fields,
    )
    await nc.jetstream().publish(
        goal_subject(goal.tenant, goal.run_id, system.namespace),
        encode_event(goal),
        headers=event_headers(goal),
    )
    return str(goal.run_id)


async def events_of(nc: Any, system: System, context: str, run_id: str) -> list[dict[str, Any]]:
    return [e for e in await read_stream(nc, system.namespace, context) if e["run_id"] == run_id]


async def settled_budget(system: System, run_id: str) -> dict[str, Any]:
    """The ledger's balances of a run once nothing is reserved any more."""
    async with httpx.AsyncClient(base_url=system.ledger.url) as client:
        for _ in range(100):
            body: dict[str, Any] = (await client.get(f"/budgets/runs/{run_id}")).json()
            if body.get("reserved_cents") == 0:
                return body
            await asyncio.sleep(0.1)
    raise AssertionError(f"run {run_id} still holds a reservation: {body}")


async def test_planning_is_reserved_committed_and_charged_to_the_run(
    system: System, api: ScriptedMessagesApi
) -> None:
    await use_anthropic_planner(system, api)
    api.replies = [plan_call(SUMMARY_PLAN)]
    async with connected(system.nats_url) as nc, RunWatcher(nc, system.namespace) as watcher:
        run_id = await submit(system, nc, budget_cents=100)
        end = (await watcher.wait([run_id]))[run_id]
        plans = await events_of(nc, system, "plans", run_id)
        budget = await events_of(nc, system, "budget", run_id)
    assert end["type"] == "run.completed", end
    assert len(api.requests) == 1

    types = [e["type"] for e in plans]
    assert types == [
        "run.accepted",
        "planning.reservation_requested",
        "planning.call_finished",
        "plan.created",
    ]
    request, finished, created = plans[1], plans[2], plans[3]
    # 900 input and 120 output tokens at claude-sonnet-4-6's price: 1 cent.
    assert finished["cost_cents"] == 1 and finished["outcome"] == "plan"
    assert finished["telemetry"]["input_tokens"] == 900
    assert created["planning_cost_cents"] == 1

    planning = [e for e in budget if e.get("step_id") == "@planning"]
    assert [e["type"] for e in planning] == ["budget.reserved", "budget.committed"]
    reserved, committed = planning
    assert reserved["reservation_id"] == request["reservation_id"]
    assert reserved["amount_cents"] == request["amount_cents"] >= 2  # 1024 output tokens
    assert committed["committed_cents"] == 1
    assert committed["released_cents"] == request["amount_cents"] - 1
    # The ledger committed the planning before the plan was published, so the first
    # step was decided against the actual planning cost.
    first_step = next(e for e in budget if e.get("step_id") == "text")
    assert first_step["remaining_cents"] == 100 - 1 - first_step["amount_cents"]

    assert end["cost_cents"] >= 1  # the planning, plus what the (stub) steps cost
    balances = await settled_budget(system, run_id)
    assert balances["committed_cents"] == end["cost_cents"]


async def test_a_planning_call_the_budget_cannot_cover_is_never_made(
    system: System, api: ScriptedMessagesApi
) -> None:
    await use_anthropic_planner(system, api)
    api.replies = [plan_call(SUMMARY_PLAN)]
    async with connected(system.nats_url) as nc, RunWatcher(nc, system.namespace) as watcher:
        run_id = await submit(system, nc, budget_cents=1)
        end = (await watcher.wait([run_id]))[run_id]
        plans = await events_of(nc, system, "plans", run_id)
    assert api.requests == []
    assert end["type"] == "run.failed" and end["error"]["code"] == "BUDGET_EXCEEDED"
    assert end["cost_cents"] == 0
    rejected = plans[-1]
    assert rejected["type"] == "plan.rejected" and rejected["code"] == "BUDGET_EXCEEDED"
    assert rejected["reasons"] == [
        "the budget refused the planning call: planning call 1 asked for 3 cents but the "
        "run has only 1 cents left of its budget (run cap exceeded)"
    ]
    balances = await settled_budget(system, run_id)
    assert balances["committed_cents"] == 0


async def test_a_recorded_plan_is_reused_without_calling_the_model(
    system: System, api: ScriptedMessagesApi
) -> None:
    await use_anthropic_planner(system, api)
    api.replies = [plan_call(SUMMARY_PLAN)]
    async with connected(system.nats_url) as nc, RunWatcher(nc, system.namespace) as watcher:
        first = await submit(system, nc, budget_cents=100)
        await watcher.wait([first])
        again = await submit(system, nc, budget_cents=100, reuse_plan_of=uuid.UUID(first))
        other = await submit(system, nc, budget_cents=100, reuse_plan_of=uuid.uuid4())
        ends = await watcher.wait([again, other])
        created = (await events_of(nc, system, "plans", again))[-1]
        refused = (await events_of(nc, system, "plans", other))[-1]
    assert len(api.requests) == 1  # only the first run asked the model
    assert ends[again]["type"] == "run.completed"
    assert created["type"] == "plan.created"
    assert created["reused_plan_of"] == first and created["planning_cost_cents"] == 0
    assert [step["id"] for step in created["plan"]["steps"]] == ["text", "summary"]
    assert ends[other]["type"] == "run.failed"
    assert refused["type"] == "plan.rejected"
    assert "has no recorded plan for tenant 'acme'" in refused["reasons"][0]


def planning_events(plans: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return sorted((e for e in plans if e["type"] == f"planning.{kind}"), key=lambda e: e["attempt"])


async def committed_planning(nc: Any, system: System, run_id: str) -> list[int]:
    budget = await events_of(nc, system, "budget", run_id)
    return [
        e["committed_cents"]
        for e in budget
        if e["type"] == "budget.committed" and e["step_id"] == "@planning"
    ]


async def test_a_retried_planning_call_is_a_new_reservation_and_each_is_charged_once(
    system: System, api: ScriptedMessagesApi
) -> None:
    await use_anthropic_planner(system, api)
    api.replies = [error(529, "overloaded_error", "Overloaded"), plan_call(SUMMARY_PLAN)]
    async with connected(system.nats_url) as nc, RunWatcher(nc, system.namespace) as watcher:
        run_id = await submit(system, nc, budget_cents=100)
        end = (await watcher.wait([run_id]))[run_id]
        plans = await events_of(nc, system, "plans", run_id)
        committed = await committed_planning(nc, system, run_id)
    assert end["type"] == "run.completed", end
    assert len(api.requests) == 2
    requested = planning_events(plans, "reservation_requested")
    finished = planning_events(plans, "call_finished")
    assert [e["attempt"] for e in requested] == [1, 2]
    assert len({e["reservation_id"] for e in requested}) == 2
    assert [(e["outcome"], e["cost_cents"]) for e in finished] == [("error", 0), ("plan", 1)]
    assert committed == [0, 1]
    assert plans[-1]["planning_cost_cents"] == 1
    balances = await settled_budget(system, run_id)
    assert balances["committed_cents"] == end["cost_cents"]


async def test_planning_that_cannot_finish_is_rejected_as_retryable_not_left_hanging(
    system: System, api: ScriptedMessagesApi
) -> None:
    await use_anthropic_planner(system, api, AOS_PLANNING_ATTEMPTS="2")
    api.replies = [error(529, "overloaded_error", "Overloaded")] * 2
    async with connected(system.nats_url) as nc, RunWatcher(nc, system.namespace) as watcher:
        run_id = await submit(system, nc, budget_cents=100)
        end = (await watcher.wait([run_id]))[run_id]
        plans = await events_of(nc, system, "plans", run_id)
    assert len(api.requests) == 2
    assert end["type"] == "run.failed"
    assert end["error"]["code"] == "DEPENDENCY_UNAVAILABLE" and end["error"]["retryable"]
    rejected = plans[-1]
    assert rejected["type"] == "plan.rejected"
    assert "planning did not finish after 2 attempts" in rejected["reasons"][0]
    assert "OverloadedError" in rejected["reasons"][0]  # the SDK's error for a 529


async def test_a_call_cut_off_by_a_planner_crash_is_charged_its_worst_case_once(
    system: System, api: ScriptedMessagesApi
) -> None:
    await use_anthropic_planner(system, api)
    # The first call is answered only after the planner has been killed.
    api.replies = [plan_call(SUMMARY_PLAN, hold_s=5.0), plan_call(SUMMARY_PLAN)]
    async with connected(system.nats_url) as nc, RunWatcher(nc, system.namespace) as watcher:
        run_id = await submit(system, nc, budget_cents=100)
        await first_request(api)
        await asyncio.to_thread(system.planner.kill)
        await asyncio.to_thread(system.planner.start)
        end = (await watcher.wait([run_id]))[run_id]
        plans = await events_of(nc, system, "plans", run_id)
        committed = await committed_planning(nc, system, run_id)
    assert end["type"] == "run.completed", end
    requested = planning_events(plans, "reservation_requested")
    finished = planning_events(plans, "call_finished")
    worst_case = requested[0]["amount_cents"]
    assert [e["attempt"] for e in requested] == [1, 2]
    assert [(e["outcome"], e["cost_cents"]) for e in finished] == [
        ("error", worst_case),
        ("plan", 1),
    ]
    assert committed == [worst_case, 1]
    created = plans[-1]
    assert created["type"] == "plan.created"
    assert created["planning_cost_cents"] == worst_case + 1
    balances = await settled_budget(system, run_id)
    assert balances["committed_cents"] == end["cost_cents"] >= worst_case + 1


async def test_a_slow_planning_call_does_not_hold_back_the_goals_behind_it(
    system: System, api: ScriptedMessagesApi
) -> None:
    await use_anthropic_planner(system, api)
    api.replies = [plan_call(SUMMARY_PLAN, hold_s=4.0), plan_call(SUMMARY_PLAN)]
    async with connected(system.nats_url) as nc, RunWatcher(nc, system.namespace) as watcher:
        slow = await submit(system, nc, budget_cents=100)
        await first_request(api)
        fast = await submit(system, nc, budget_cents=100)
        ends = await watcher.wait([slow, fast])
    assert ends[slow]["type"] == ends[fast]["type"] == "run.completed"
    # The second goal was planned (and run) while the first one's call was still open.
    assert ends[fast]["occurred_at"] < ends[slow]["occurred_at"]
