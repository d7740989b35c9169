"""SIGTERM a service mid-run: it stops fetching, finishes what it holds, exits 0, and a
restart loses nothing and does nothing twice.

Unlike SIGKILL (tests/system/test_faults.py), nothing should need redelivery after the
ack wait: what the service held when the signal came was finished and acknowledged, or
handed back.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from tests.support.bus import RunWatcher, connected, read_stream, submit_goal
from tests.system.conftest import System, system  # noqa: F401 - the fixture

pytestmark = pytest.mark.e2e

RUNS = 20
STEPS = 4


# The executor (steps in flight) and the ledger (budget decisions in flight) hold the most;
# the planner and tracer stop through the same LogConsumer.stop.
@pytest.mark.parametrize("victim", ["executor", "ledger"])
async def test_sigterm_mid_run_exits_0_and_loses_nothing(
    system: System,  # noqa: F811 - the fixture imported above
    victim: str,
) -> None:
    service = getattr(system, victim)
    ns = system.namespace
    async with connected(system.nats_url) as nc, RunWatcher(nc, ns) as watcher:
        first = [
            await submit_goal(nc, ns, f"bench {STEPS}", budget_cents=10) for _ in range(RUNS // 2)
        ]
        await watcher.wait(first[:1])
        exit_code = await asyncio.to_thread(service.terminate)
        second = [
            await submit_goal(nc, ns, f"bench {STEPS}", budget_cents=10) for _ in range(RUNS // 2)
        ]
        await asyncio.to_thread(service.start)
        ends = await watcher.wait(first + second, within_s=120)
        for _ in range(150):  # the ledger commits after a run has ended
            budget = await read_stream(nc, ns, "budget")
            if sum(e["type"] == "budget.committed" for e in budget) >= RUNS * STEPS:
                break
            await asyncio.sleep(0.2)
        plans = await read_stream(nc, ns, "plans")
        runs = await read_stream(nc, ns, "runs")
        parked = await read_stream(nc, ns, "parked")

    assert exit_code == 0, service.tail()
    log = service.log_path.read_text()
    assert f"{victim} stopped" in log
    assert Counter(end["type"] for end in ends.values()) == {"run.completed": RUNS}
    assert Counter(e["type"] for e in plans) == {"run.accepted": RUNS, "plan.created": RUNS}
    succeeded = Counter((e["run_id"], e["step_id"]) for e in runs if e["type"] == "step.succeeded")
    assert len(succeeded) == RUNS * STEPS and set(succeeded.values()) == {1}
    terminal = Counter(e["run_id"] for e in runs if e["type"] == "run.completed")
    assert len(terminal) == RUNS and set(terminal.values()) == {1}
    for kind in ("budget.reserved", "budget.committed"):
        per = Counter(e["reservation_id"] for e in budget if e["type"] == kind)
        assert len(per) == RUNS * STEPS and set(per.values()) == {1}, kind
    assert parked == []
