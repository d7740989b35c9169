"""Forged events, published raw as a hostile tenant would: nothing runs, nothing is
charged, the victim's run is unaffected, and every forgery is parked with its reason
(or, for requests a tenant may send, answered on the sender's own subjects).

Auth is off here (the embedded default): what holds is what the bus itself checks, the
structural checks of docs/SECURITY.md. NATS permissions (tests/infra) stop most of these
publishes before they reach the log; these tests prove the log is safe even without them.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from nats.aio.client import Client

from aos_contracts.codec import encode_event, event_headers
from aos_contracts.events import (
    BudgetReserved,
    EventEnvelope,
    GoalSubmitted,
    PlanCreated,
    PlanRejected,
    RunCancelRequested,
)
from aos_contracts.failures import FailureCode
from aos_contracts.plans import Plan, PlanStep
from aos_contracts.subjects import PARKED, run_subject
from aos_executor.runs import reservation_id
from tests.security.conftest import SideEffects
from tests.support.bus import RunWatcher, connected, read_stream, submit_goal
from tests.system.conftest import System, aos

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


async def publish_raw(
    nc: Client, system: System, context: str, tenant: str, run_id: uuid.UUID, event: EventEnvelope
) -> None:
    """`event` on `<namespace>.<context>.<tenant>.<run_id>`, whatever the event says."""
    subject = run_subject(context, tenant, run_id, system.namespace)
    await nc.jetstream().publish(subject, encode_event(event), headers=event_headers(event))


async def until(check: Callable[[], Awaitable[Any]], what: str, within_s: float = 30.0) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` if it never does."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {within_s} s: {what}")
        await asyncio.sleep(0.1)


async def parked_by(nc: Client, system: System, subject: str, services: set[str]) -> dict[str, str]:
    """service -> reason, once each of `services` parked the message on `subject`."""

    async def check() -> dict[str, str] | None:
        found = {
            p["service"]: p["reason"]
            for p in await read_stream(nc, system.namespace, PARKED)
            if p.get("subject") == subject
        }
        return found if services <= set(found) else None

    result: dict[str, str] = await until(check, f"{sorted(services)} parked {subject}")
    return result


def http_plan(effects: SideEffects) -> Plan:
    return Plan(
        steps=[
            PlanStep(
                id="s1",
                skill="http_call",
                params={"method": "POST", "url": f"{effects.url}/forged"},
            )
        ]
    )


async def ledger_status(system: System, run_id: uuid.UUID | str) -> int:
    async with httpx.AsyncClient(base_url=system.ledger.url) as ledger:
        return (await ledger.get(f"/budgets/runs/{run_id}")).status_code


async def test_a_plan_and_a_reservation_forged_on_a_goals_subject_run_nothing(
    open_system: System, effects: SideEffects
) -> None:
    """The attack of issue 10: plan.created plus budget.reserved on the tenant's own goals
    subject (the reservation id is computable by anyone). Also both on another tenant's
    plans and budget subjects with the payload's tenant unchanged (a tenant mismatch)."""
    system = open_system
    forged_run = uuid.uuid4()
    goal = GoalSubmitted(run_id=forged_run, tenant="acme", goal="x", budget_cents=10_000)
    plan = goal.caused(
        PlanCreated, "plan.created", plan=http_plan(effects), estimated_cents=0, budget_cents=10_000
    )
    reserved = goal.caused(
        BudgetReserved,
        "budget.reserved",
        reservation_id=reservation_id(forged_run, "s1", 1),
        step_id="s1",
        attempt=1,
        amount_cents=1,
        remaining_cents=9_999,
    )
    async with connected(system.nats_url) as nc, RunWatcher(nc, system.namespace) as watcher:
        await publish_raw(nc, system, "goals", "acme", forged_run, plan)
        await publish_raw(nc, system, "goals", "acme", forged_run, reserved)
        mismatched = uuid.uuid4()
        for event, context in ((plan, "plans"), (reserved, "budget")):
            moved = event.model_copy(update={"run_id": mismatched, "event_id": uuid.uuid4()})
            await publish_raw(nc, system, context, "globex", mismatched, moved)
        victim = await submit_goal(nc, system.namespace, "bench 2", tenant="globex")
        ends = await watcher.wait([victim])

        on_goals = run_subject("goals", "acme", forged_run, system.namespace)
        reasons = await parked_by(nc, system, on_goals, {"executor", "tracer"})
        on_plans = run_subject("plans", "globex", mismatched, system.namespace)
        mismatch = await parked_by(nc, system, on_plans, {"executor", "tracer"})
        runs = await read_stream(nc, system.namespace, "runs")

    assert ends[victim]["type"] == "run.completed"
    assert effects.requests == []
    assert not [e for e in runs if e["run_id"] in (str(forged_run), str(mismatched))]
    assert await ledger_status(system, forged_run) == 404
    assert await ledger_status(system, mismatched) == 404
    for reason in reasons.values():
        assert "is the plans stream's, but arrived on" in reason or "budget stream's" in reason
        assert on_goals in reason
    for reason in mismatch.values():
        assert "for tenant 'acme' arrived on a subject of tenant 'globex'" in reason


async def test_no_tenant_can_end_or_cancel_another_tenants_run(
    open_system: System, effects: SideEffects
) -> None:
    system = open_system
    system.executor.kill()  # the victim's plan waits in the log while the forgeries land
    async with connected(system.nats_url) as nc, RunWatcher(nc, system.namespace) as watcher:
        victim = uuid.UUID(await submit_goal(nc, system.namespace, "bench 3", tenant="globex"))
        answers = await nc.subscribe(run_subject("plans", "acme", victim, system.namespace))

        async def planned() -> bool:
            plans = await read_stream(nc, system.namespace, "plans")
            return any(p["run_id"] == str(victim) and p["type"] == "plan.created" for p in plans)

        await until(planned, "the victim's run planned")
        as_globex = GoalSubmitted(run_id=victim, tenant="globex", goal="x", budget_cents=1)
        ended = as_globex.caused(PlanRejected, "forged", reasons=["forged"])
        # On the goals stream: a type tenants may not send.
        await publish_raw(nc, system, "goals", "acme", victim, ended)
        # On the plans stream, as acme (no permission stops it with auth off): the run is
        # globex's, so the executor ignores it.
        as_acme = ended.model_copy(update={"tenant": "acme", "event_id": uuid.uuid4()})
        await publish_raw(nc, system, "plans", "acme", victim, as_acme)
        # Requests acme may send, naming globex's run: refused, with an answer to acme.
        squat = GoalSubmitted(run_id=victim, tenant="acme", goal="fetch x", budget_cents=5)
        await publish_raw(nc, system, "goals", "acme", victim, squat)
        cancel = RunCancelRequested(run_id=victim, tenant="acme", reason="mine now")
        await publish_raw(nc, system, "goals", "acme", victim, cancel)
        refused: list[dict[str, Any]] = []
        while len(refused) < 2:  # the subject also carries the forgery published above
            answer = json.loads((await answers.next_msg(timeout=30)).data)
            if answer["type"] == "request.refused":
                refused.append(answer)

        await asyncio.to_thread(system.executor.start)
        ends = await watcher.wait([str(victim)])
        on_goals = run_subject("goals", "acme", victim, system.namespace)
        reasons = await parked_by(nc, system, on_goals, {"executor", "planner", "tracer"})

    assert ends[str(victim)]["type"] == "run.completed"
    codes = {answer["request_type"]: answer["error"]["code"] for answer in refused}
    assert codes == {
        "goal.submitted": FailureCode.EVENT_REFUSED.value,
        "run.cancel_requested": FailureCode.RUN_NOT_FOUND.value,
    }
    assert all(answer["tenant"] == "acme" and not answer["ends_run"] for answer in refused)
    assert all("plan.rejected is the plans stream's" in reason for reason in reasons.values())
    # globex's trace holds only globex's events; acme's requests are not in its timeline.
    async with httpx.AsyncClient(base_url=system.tracer.url) as tracer:
        trace = await until(
            lambda: _ended_trace(tracer, victim), "the tracer stored the victim's end"
        )
    assert trace["run"]["tenant"] == "globex" and trace["run"]["status"] == "completed"
    assert {e["event"]["tenant"] for e in trace["events"]} == {"globex"}


async def _ended_trace(tracer: httpx.AsyncClient, run_id: uuid.UUID) -> dict[str, Any] | None:
    response = await tracer.get(f"/runs/{run_id}")
    if response.status_code != 200 or not response.json()["run"].get("ended_at"):
        return None
    trace: dict[str, Any] = response.json()
    return trace


async def test_a_goal_naming_another_tenant_on_ones_own_subject_is_parked(
    open_system: System, effects: SideEffects
) -> None:
    """With JWT off, the subject is the only proof of who sent a goal: a goal for globex
    on acme's subject would otherwise run as globex, on globex's money."""
    system = open_system
    forged = GoalSubmitted(
        run_id=uuid.uuid4(), tenant="globex", goal=f"fetch {effects.url}/x", budget_cents=500
    )
    async with connected(system.nats_url) as nc, RunWatcher(nc, system.namespace) as watcher:
        await publish_raw(nc, system, "goals", "acme", forged.run_id, forged)
        subject = run_subject("goals", "acme", forged.run_id, system.namespace)
        reasons = await parked_by(nc, system, subject, {"planner", "ledger", "tracer"})
        control = await submit_goal(nc, system.namespace, "bench 1", tenant="globex")
        await watcher.wait([control])
        plans = await read_stream(nc, system.namespace, "plans")
    assert effects.requests == []
    assert not [p for p in plans if p["run_id"] == str(forged.run_id)]
    assert await ledger_status(system, forged.run_id) == 404
    for reason in reasons.values():
        assert (
            f"goal.submitted for tenant 'globex' arrived on a subject of tenant 'acme': {subject}"
            in (reason)
        )


async def test_idempotency_keys_belong_to_their_tenant(open_system: System) -> None:
    """acme uses the key globex will use, first: globex's goal still runs, once."""
    system = open_system

    def submit(tenant: str) -> dict[str, Any]:
        done = aos(
            system, "goal", "submit", "bench 2", "--tenant", tenant, "--budget-cents", "5",
            "--idempotency-key", "order-1", "--wait", "--json",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        end: dict[str, Any] = json.loads(done.stdout)
        return end

    squatter = await asyncio.to_thread(submit, "acme")
    first = await asyncio.to_thread(submit, "globex")
    again = await asyncio.to_thread(submit, "globex")
    assert first["type"] == "run.completed" and first["tenant"] == "globex"
    assert first["run_id"] != squatter["run_id"]
    assert again["run_id"] == first["run_id"]  # one run per tenant and key
    async with connected(system.nats_url) as nc:
        plans = await read_stream(nc, system.namespace, "plans")
    duplicates = [p for p in plans if p["type"] == "request.refused"]
    assert [(d["tenant"], d["error"]["code"], d["existing_run_id"]) for d in duplicates] == [
        ("globex", "DUPLICATE_GOAL", first["run_id"])
    ]


async def test_the_cli_refuses_to_cancel_an_unknown_or_foreign_run(open_system: System) -> None:
    system = open_system
    async with connected(system.nats_url) as nc, RunWatcher(nc, system.namespace) as watcher:
        globex = await submit_goal(nc, system.namespace, "bench 1", tenant="globex")
        await watcher.wait([globex])
    for run_id in (str(uuid.uuid4()), globex):
        done = await asyncio.to_thread(aos, system, "run", "cancel", run_id, "--tenant", "acme")
        assert done.returncode == 2, done.stdout
        assert "refused (RUN_NOT_FOUND)" in done.stderr and run_id in done.stderr
    own = await asyncio.to_thread(aos, system, "run", "cancel", globex, "--tenant", "globex")
    assert own.returncode == 1 and "run.completed" in own.stdout  # it had ended already
