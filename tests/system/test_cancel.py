"""Cancelling a run: the executor ends it as cancelled, and nothing more runs or is held."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

from tests.support.bus import RunWatcher, connected, read_stream, submit_goal
from tests.system.conftest import System, aos


async def test_a_run_cancelled_before_its_steps_ends_cancelled_with_nothing_run(
    system: System,
) -> None:
    # With the executor down the plan waits in the log; the cancel lands before any step.
    system.executor.kill()
    async with connected(system.nats_url) as nc, RunWatcher(nc, system.namespace) as watcher:
        run_id = await submit_goal(nc, system.namespace, "bench 3", budget_cents=5)
        for _ in range(100):
            plans = await read_stream(nc, system.namespace, "plans")
            if any(p["run_id"] == run_id and p["type"] == "plan.created" for p in plans):
                break
            await asyncio.sleep(0.1)
        sent = await asyncio.to_thread(
            aos, system, "run", "cancel", run_id, "--tenant", "acme", "--reason", "changed my mind"
        )
        assert sent.returncode == 0, sent.stderr
        await asyncio.to_thread(system.executor.start)
        end = (await watcher.wait([run_id]))[run_id]
        runs = await read_stream(nc, system.namespace, "runs")
    assert end["type"] == "run.cancelled"
    assert end["reason"] == "changed my mind"
    mine = Counter(e["type"] for e in runs if e["run_id"] == run_id)
    assert mine == {"run.cancelled": 1}  # no reservation asked, no step started


async def test_cancelling_a_finished_run_says_how_it_ended(system: System) -> None:
    async with connected(system.nats_url) as nc, RunWatcher(nc, system.namespace) as watcher:
        run_id = await submit_goal(nc, system.namespace, "bench 1", budget_cents=5)
        await watcher.wait([run_id])
    done = await asyncio.to_thread(
        aos, system, "run", "cancel", run_id, "--tenant", "acme", "--wait", "--json"
    )
    assert done.returncode == 1
    assert json.loads(done.stdout)["type"] == "run.completed"
