"""SIGKILL a service mid-run, restart it: nothing lost, nothing applied twice.

Half of the goals are submitted and the victim is killed as soon as the first run ends
(so it dies with work in flight); the other half are submitted while it is dead (so
its restart must pick up work it never saw). Then every run must complete, and the log
and the stores must show each thing happening exactly once.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import httpx
import pytest

from tests.support.bus import RunWatcher, connected, read_stream, submit_goal
from tests.system.conftest import System

RUNS = 40
STEPS = 5


@pytest.mark.parametrize("victim", ["ledger", "tracer", "executor", "planner"])
async def test_sigkill_mid_run_loses_nothing_and_applies_nothing_twice(
    system: System, victim: str
) -> None:
    service = getattr(system, victim)
    ns = system.namespace
    async with connected(system.nats_url) as nc, RunWatcher(nc, ns) as watcher:
        first = [
            await submit_goal(nc, ns, f"bench {STEPS}", budget_cents=10) for _ in range(RUNS // 2)
        ]
        await watcher.wait(first[:1])
        service.kill()
        second = [
            await submit_goal(nc, ns, f"bench {STEPS}", budget_cents=10) for _ in range(RUNS // 2)
        ]
        await asyncio.to_thread(service.start)
        ends = await watcher.wait(first + second, within_s=120)
        assert Counter(end["type"] for end in ends.values()) == {"run.completed": RUNS}

        # The ledger commits after the run has ended (it learns the cost from the
        # step's result), so give it until every reservation is committed.
        for _ in range(150):
            budget = await read_stream(nc, ns, "budget")
            if sum(e["type"] == "budget.committed" for e in budget) >= RUNS * STEPS:
                break
            await asyncio.sleep(0.2)
        plans = await read_stream(nc, ns, "plans")
        runs = await read_stream(nc, ns, "runs")
        goals = await read_stream(nc, ns, "goals")

    # Exactly one plan per run, one success per step, one end per run.
    assert Counter(e["type"] for e in plans) == {"run.accepted": RUNS, "plan.created": RUNS}
    succeeded = Counter((e["run_id"], e["step_id"]) for e in runs if e["type"] == "step.succeeded")
    assert len(succeeded) == RUNS * STEPS and set(succeeded.values()) == {1}
    terminal = Counter(e["run_id"] for e in runs if e["type"] == "run.completed")
    assert len(terminal) == RUNS and set(terminal.values()) == {1}

    # The ledger decided each reservation once and committed it once.
    for kind in ("budget.reservation_requested",):
        per = Counter(e["reservation_id"] for e in runs if e["type"] == kind)
        assert len(per) == RUNS * STEPS and set(per.values()) == {1}
    for kind in ("budget.reserved", "budget.committed"):
        per = Counter(e["reservation_id"] for e in budget if e["type"] == kind)
        assert len(per) == RUNS * STEPS and set(per.values()) == {1}, kind
    assert (
        Counter(e["run_id"] for e in budget if e["type"] == "budget.opened").most_common(1)[0][1]
        == 1
    )

    # The tracer holds every event of the log exactly once.
    logged = Counter(e["run_id"] for e in [*goals, *plans, *runs, *budget])
    async with httpx.AsyncClient(base_url=system.tracer.url) as client:
        for _ in range(200):
            traced = {}
            for run_id in logged:
                body = (await client.get(f"/runs/{run_id}")).json()
                traced[run_id] = [(e["stream"], e["stream_seq"]) for e in body.get("events", [])]
            if all(len(traced[run_id]) == count for run_id, count in logged.items()):
                break
            await asyncio.sleep(0.2)
    for run_id, count in logged.items():
        assert len(traced[run_id]) == count, run_id
        assert len(set(traced[run_id])) == count, f"{run_id} has duplicate trace rows"


async def test_the_executor_killed_at_random_points_loses_and_repeats_nothing(
    system: System,
) -> None:
    """Kill -9 the executor three times at random moments while runs flow, restarting it
    each time; every run completes, and the log shows each step succeeded once, each
    reservation asked for once and each run ended once."""
    seed = random.randrange(1_000_000)
    chooser = random.Random(seed)
    ns = system.namespace
    submitted: list[str] = []
    async with connected(system.nats_url) as nc, RunWatcher(nc, ns) as watcher:
        for _ in range(3):
            submitted += [
                await submit_goal(nc, ns, f"bench {STEPS}", budget_cents=10) for _ in range(10)
            ]
            await asyncio.sleep(chooser.uniform(0.0, 0.4))
            system.executor.kill()
            await asyncio.to_thread(system.executor.start)
        ends = await watcher.wait(submitted, within_s=120)
        runs = await read_stream(nc, ns, "runs")
    assert Counter(end["type"] for end in ends.values()) == {"run.completed": len(submitted)}, seed
    per_step = Counter((e["run_id"], e["step_id"]) for e in runs if e["type"] == "step.succeeded")
    assert len(per_step) == len(submitted) * STEPS and set(per_step.values()) == {1}, seed
    requests = Counter(
        e["reservation_id"] for e in runs if e["type"] == "budget.reservation_requested"
    )
    assert set(requests.values()) == {1}, seed
    ended = Counter(e["run_id"] for e in runs if e["type"] == "run.completed")
    assert set(ended.values()) == {1}, seed
