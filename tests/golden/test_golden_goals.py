"""The stub planner's documented goals, run through the four services, against the golden
files in this folder (AOS_UPDATE_GOLDEN=1 rewrites them), plus the golden CLI, the HTML
timeline, and what a deliberately changed stub output looks like."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from aos_cli.main import main as aos
from tests.support.bus import RunWatcher, connected, submit_goal
from tests.support.golden import GOLDEN_DIR, CompareGolden, GoldenMismatch, compare_golden
from tests.system.conftest import System

pytestmark = pytest.mark.integration

NOTES = "AOS plans, budgets, runs and traces goals. Every event is on the log."

# name -> (goal, inputs): one per rule of aos_planner/stub.py.
GOALS: dict[str, tuple[str, dict[str, Any]]] = {
    "bench": ("bench 3", {"n": 1}),
    "fetch-and-summarize": ("fetch https://example.com/notes.json and summarize it", {}),
    "fetch": ("fetch https://example.com/notes.json", {}),
    "summarize": ("summarize the release notes", {"text": NOTES}),
}


def settled(run: dict[str, Any]) -> bool:
    """The run ended and the ledger answered all of it: nothing more will be traced.

    The tracer reads each stream with its own consumer, so the run's end can be traced
    before its goal: the goal and the budget's opening are waited for too."""
    events = [item["event"] for item in run.get("events", [])]
    types = [event["type"] for event in events]
    if not any(t in ("run.completed", "run.failed", "run.cancelled") for t in types):
        return False
    if "goal.submitted" not in types or "budget.opened" not in types:
        return False

    def reservations(*kinds: str) -> set[str]:
        return {e["reservation_id"] for e in events if e["type"] in kinds}

    requested = reservations("budget.reservation_requested")
    decided = reservations("budget.reserved", "budget.denied")
    closed = reservations("budget.committed", "budget.released")
    return requested <= decided and reservations("budget.reserved") <= closed


async def run_to_end(system: System, goal: str, inputs: dict[str, Any]) -> str:
    async with connected(system.nats_url) as nc, RunWatcher(nc, system.namespace) as watcher:
        run_id = await submit_goal(nc, system.namespace, goal, budget_cents=100, inputs=inputs)
        await watcher.wait([run_id])
    async with httpx.AsyncClient(base_url=system.tracer.url, timeout=5.0) as http:
        for _ in range(300):
            response = await http.get(f"/runs/{run_id}")
            if response.status_code == 200 and settled(response.json()):
                return run_id
            await asyncio.sleep(0.1)
    raise AssertionError(f"run {run_id} was never fully traced")


async def test_the_stub_goals_match_their_golden_files(
    golden_system: System, golden: CompareGolden, tmp_path: Path
) -> None:
    run_ids = {}
    for name, (goal, inputs) in GOALS.items():
        run_ids[name] = await run_to_end(golden_system, goal, inputs)
    async with httpx.AsyncClient(base_url=golden_system.tracer.url, timeout=5.0) as http:
        texts = {
            name: (await http.get(f"/runs/{rid}/golden")).text for name, rid in run_ids.items()
        }
        page = await http.get(f"/runs/{run_ids['fetch-and-summarize']}/timeline.html")
        run = (await http.get(f"/runs/{run_ids['summarize']}")).json()
    for name, text in texts.items():
        golden(name, text)

    # The HTML timeline: one bar per step, with its cost.
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for step in ("fetch", "body", "summary"):
        assert f"<code>{step}</code>" in page.text
    assert page.text.count('class="bar"') == 3

    # What a replay needs is in the run: the plan, and every step's params and output.
    events = [item["event"] for item in run["events"]]
    (plan,) = [e for e in events if e["type"] == "plan.created"]
    assert [s["id"] for s in plan["plan"]["steps"]] == ["text", "summary"]
    started = {e["step_id"]: e for e in events if e["type"] == "step.started"}
    succeeded = {e["step_id"]: e for e in events if e["type"] == "step.succeeded"}
    assert set(started) == set(succeeded) == {"text", "summary"}
    assert started["text"]["params"] and succeeded["text"]["output"] == NOTES

    # The CLI: record, verify (exit 0), verify against a changed file (exit 1, a diff).
    env = {"AOS_TRACER_URL": golden_system.tracer.url, "AOS_NAMESPACE": golden_system.namespace}
    target = tmp_path / "summarize.json"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        args = ["--data-dir", str(tmp_path)]
        assert aos(["golden", "record", run_ids["summarize"], str(target), *args]) == 0
        assert target.read_text() == texts["summarize"]
        assert aos(["golden", "verify", run_ids["summarize"], str(target), *args]) == 0
        target.write_text(target.read_text().replace("[stub", "[changed stub", 1))
        assert aos(["golden", "verify", run_ids["summarize"], str(target), *args]) == 1


def test_a_changed_stub_output_fails_the_golden_comparison_with_a_clear_diff(
    tmp_path: Path,
) -> None:
    """Simulates a stub that now answers differently: the run's text is the checked-in
    golden file with the summary's output changed; the comparison must name that line."""
    path = GOLDEN_DIR / "summarize.json"
    recorded = json.loads(path.read_text())
    succeeded = [
        item["event"]
        for item in recorded["events"]
        if item["event"]["type"] == "step.succeeded" and item["event"]["step_id"] == "summary"
    ]
    assert succeeded, "the summarize golden file has no summary step"
    old_text = json.dumps(succeeded[0]["output"], sort_keys=True)
    succeeded[0]["output"] = {"text": "a different summary"}
    changed = json.dumps(recorded, indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    with pytest.raises(GoldenMismatch) as failure:
        compare_golden(path, changed)

    message = str(failure.value)
    assert "summarize.json (golden)" in message and "summarize.json (run)" in message
    lines = message.splitlines()
    assert any(line.startswith("+") and '"a different summary"' in line for line in lines)
    assert any(line.startswith("-") and "stub" in line for line in lines), (
        old_text,
        message,
    )
    compare_golden(path, path.read_text())  # the file itself matches
