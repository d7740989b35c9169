"""Two executor replicas: one active, one standing by; the standby takes over when the
active one dies, and every step still runs exactly once."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx

from tests.support.bus import RunWatcher, connected, read_stream, submit_goal
from tests.support.processes import ServiceProcess
from tests.system.conftest import System

STEPS = 4


async def roles(*executors: ServiceProcess) -> list[str]:
    async with httpx.AsyncClient() as client:
        answers = [await client.get(f"{e.url}/readyz") for e in executors]
    return [answer.json()["backends"]["role"] for answer in answers]


async def eventually_one_active(*executors: ServiceProcess) -> ServiceProcess:
    for _ in range(100):
        current = await roles(*executors)
        if current.count("active") == 1:
            return executors[current.index("active")]
        await asyncio.sleep(0.1)
    raise AssertionError(f"roles never settled: {await roles(*executors)}")


async def test_a_standby_takes_over_and_nothing_runs_twice(system: System) -> None:
    second = ServiceProcess("executor", system.executor.env, system.executor.log_dir)
    second.log_path.parent.mkdir(exist_ok=True)
    await asyncio.to_thread(second.start)
    try:
        active = await eventually_one_active(system.executor, second)
        standby = second if active is system.executor else system.executor
        ns = system.namespace
        async with connected(system.nats_url) as nc, RunWatcher(nc, ns) as watcher:
            first = [await submit_goal(nc, ns, f"bench {STEPS}", budget_cents=5) for _ in range(10)]
            await watcher.wait(first[:1])
            active.kill()
            second_half = [
                await submit_goal(nc, ns, f"bench {STEPS}", budget_cents=5) for _ in range(10)
            ]
            assert await eventually_one_active(standby) is standby
            try:
                ends = await watcher.wait(first + second_half, within_s=90)
            except TimeoutError:
                # Say which runs did not end, and what the executors said, so that a
                # rare failure can be understood from the report alone.
                missing = sorted(set(first + second_half) - set(watcher.ends))
                raise AssertionError(
                    f"{len(missing)} runs never ended: {missing}\n"
                    f"--- standby (now active) ---\n{standby.tail(80)}\n"
                    f"--- killed active ---\n{active.tail(30)}"
                ) from None
            runs = await read_stream(nc, ns, "runs")
    finally:
        second.stop()
    assert Counter(end["type"] for end in ends.values()) == {"run.completed": 20}
    succeeded = Counter((e["run_id"], e["step_id"]) for e in runs if e["type"] == "step.succeeded")
    assert len(succeeded) == 20 * STEPS and set(succeeded.values()) == {1}


async def test_only_one_of_two_replicas_is_active(system: System) -> None:
    second = ServiceProcess("executor", system.executor.env, system.executor.log_dir)
    await asyncio.to_thread(second.start)
    try:
        await eventually_one_active(system.executor, second)
        await asyncio.sleep(1.0)  # a renewal period later, still exactly one
        assert sorted(await roles(system.executor, second)) == ["active", "standby"]
    finally:
        second.stop()
