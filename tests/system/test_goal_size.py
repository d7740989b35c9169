"""Goals near the bus's max payload: above MAX_GOAL_BYTES rejected GOAL_TOO_LARGE at once
(no planning, no retries, no loop), at the limit planned and run."""

from __future__ import annotations

import json
import uuid
from typing import Any

from aos_contracts.subjects import goal_subject
from aos_planner.planning import MAX_GOAL_BYTES
from tests.support.bus import RunWatcher, connected, read_stream
from tests.system.conftest import System


def goal_of_size(size: int, goal: str, key: str) -> tuple[str, bytes]:
    """A goal.submitted message of exactly `size` bytes, its inputs padded."""
    run_id = str(uuid.uuid4())
    payload: dict[str, Any] = {
        "type": "goal.submitted",
        "event_id": str(uuid.uuid4()),
        "run_id": run_id,
        "tenant": "acme",
        "goal": goal,
        "budget_cents": 50,
        "inputs": {"doc": {key: ""}},
    }
    padding = size - len(json.dumps(payload).encode())
    payload["inputs"]["doc"][key] = "x" * padding
    data = json.dumps(payload).encode()
    assert len(data) == size
    return run_id, data


async def test_a_goal_of_a_million_bytes_is_rejected_too_large_and_one_at_the_limit_runs(
    system: System,
) -> None:
    big_run, big = goal_of_size(1_000_000, "extract a from doc", "a")
    fits_run, fits = goal_of_size(MAX_GOAL_BYTES, "extract a from doc", "a")
    async with connected(system.nats_url) as nc, RunWatcher(nc, system.namespace) as watcher:
        js = nc.jetstream()
        for run_id, data in ((big_run, big), (fits_run, fits)):
            await js.publish(goal_subject("acme", run_id, system.namespace), data)
        # The bound only keeps a hang from stalling the suite; the rejection is immediate.
        ends = await watcher.wait([big_run, fits_run], within_s=30)
        plans = await read_stream(nc, system.namespace, "plans")
        parked = await read_stream(nc, system.namespace, "parked")

    assert ends[big_run]["type"] == "run.failed", ends[big_run]
    decisions = [p for p in plans if p["run_id"] == big_run]
    assert [d["type"] for d in decisions] == ["plan.rejected"]
    assert decisions[0]["code"] == "GOAL_TOO_LARGE"
    assert f"above the limit of {MAX_GOAL_BYTES} bytes" in decisions[0]["reasons"][0]

    assert ends[fits_run]["type"] == "run.completed", ends[fits_run]
    assert len(ends[fits_run]["outputs"]["fields"]["a"]) > 250_000
    assert parked == []
