"""`aos plan simulate`: offline with the stub, a plan, its estimate, whether it fits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aos_planner.simulate import simulate as simulate_in_process


def simulate(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PLANNER_BACKEND", "ANTHROPIC_API_KEY")}
    return subprocess.run(
        [sys.executable, "-m", "aos_cli", "plan", "simulate", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_feasible_plan_shows_its_steps_and_worst_case_cost() -> None:
    done = simulate(
        "summarize the notes", "--budget-cents", "20", "--input-json", '{"text": "x"}', "--json"
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["feasible"] is True
    assert report["backend"] == "stub"
    assert [(s["id"], s["skill"]) for s in report["steps"]] == [
        ("text", "json_transform"),
        ("summary", "llm_invoke"),
    ]
    assert report["estimated_cents"] == sum(s["estimated_cents"] for s in report["steps"]) > 0


NOTES = '{"text": "AOS plans goals."}'


def test_a_plan_over_budget_is_infeasible_and_says_why() -> None:
    done = simulate("summarize the notes", "--budget-cents", "0", "--input-json", NOTES)
    assert done.returncode == 1
    assert "feasible  no" in done.stdout
    assert "above the budget of 0" in done.stdout


def test_a_goal_without_a_plan_is_infeasible_with_the_rules_listed() -> None:
    done = simulate("make me a sandwich", "--budget-cents", "5")
    assert done.returncode == 1
    assert "no rule for this goal" in done.stdout


def test_a_bad_budget_is_a_one_line_error() -> None:
    done = simulate("bench 2", "--budget-cents", "-3")
    assert done.returncode == 2
    assert done.stderr.startswith("aos: error:")
    assert "Traceback" not in done.stderr


def test_replan_asks_again_within_the_budget_and_says_why_it_could_not() -> None:
    done = simulate(
        "summarize the notes", "--budget-cents", "0", "--input-json", NOTES, "--replan", "--json"
    )
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["feasible"] is False
    assert report["reasons"][0].endswith("above the budget of 0")
    assert report["reasons"][1] == "no stub plan for this goal fits in 0 cents"
    assert report["planning_cost_cents"] == 0  # the stub makes no model call


# About 900 KB of text: its prompt alone is ~300 000 tokens, ~90 cents on claude-sonnet-4-6.
LARGE_TEXT = "AOS plans, budgets, runs and traces goals. " * 21_000


@pytest.fixture
def stub_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PLANNER_BACKEND", raising=False)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)


@pytest.mark.usefixtures("stub_backend")
async def test_a_large_goal_is_estimated_from_its_actual_inputs() -> None:
    report = await simulate_in_process("summarize the notes", 20, {"text": LARGE_TEXT})
    assert report["feasible"] is False
    by_step = {step["id"]: step for step in report["steps"]}
    # The text step runs before the run (json_transform is pure): the summary's prompt
    # is priced with the 900 KB in it, and nothing is left unknown.
    assert by_step["summary"]["estimated_cents"] > 80
    assert by_step["summary"]["unknown_outputs"] == []
    assert report["estimated_cents"] == by_step["summary"]["estimated_cents"]
    assert report["estimated_cents_at_bound"] is None
    assert "above the budget of 20" in report["reasons"][0]


@pytest.mark.usefixtures("stub_backend")
async def test_a_small_goal_stays_cheap() -> None:
    report = await simulate_in_process("summarize the notes", 20, {"text": "AOS plans."})
    assert report["feasible"] is True
    assert report["estimated_cents"] == 1


@pytest.mark.usefixtures("stub_backend")
async def test_steps_that_use_outputs_not_known_yet_say_so_with_the_bound_assumed() -> None:
    report = await simulate_in_process(
        "fetch https://example.com/notes and summarize them", 100, {}, assume_output_bytes=300_000
    )
    assert report["feasible"] is True
    by_step = {step["id"]: step for step in report["steps"]}
    assert by_step["fetch"]["unknown_outputs"] == []
    assert by_step["body"]["unknown_outputs"] == ["fetch"]
    assert by_step["summary"]["unknown_outputs"] == ["body"]
    # 300 000 bytes of body in the prompt: 100 000 estimated tokens, 30 cents + output.
    assert by_step["summary"]["estimated_cents"] == 1
    assert by_step["summary"]["estimated_cents_at_bound"] == 31
    assert report["assumed_output_bytes"] == 300_000
    assert report["estimated_cents_at_bound"] == 31


def test_the_cli_reads_large_inputs_from_a_file_and_shows_the_bound(tmp_path: Path) -> None:
    inputs = tmp_path / "notes.json"
    inputs.write_text(json.dumps({"text": LARGE_TEXT}))
    done = simulate("summarize the notes", "--budget-cents", "20", "--input-json", f"@{inputs}")
    assert done.returncode == 1, done.stderr
    assert "feasible  no" in done.stdout and "above the budget of 20" in done.stdout

    fetched = simulate("fetch https://example.com/notes and summarize", "--budget-cents", "5")
    assert fetched.returncode == 0, fetched.stderr
    assert "if every output not known before the run is 524288 bytes (assumed)" in (fetched.stdout)
    assert "(uses body: not known before the run)" in fetched.stdout


def test_a_missing_input_is_named_at_plan_time() -> None:
    done = simulate("summarize the notes", "--budget-cents", "20", "--json")
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["reasons"] == [
        "step 'text': json_transform extract needs the goal input 'text', which is missing "
        "(the goal's inputs: none)"
    ]


def test_an_unreadable_inputs_file_is_a_one_line_error(tmp_path: Path) -> None:
    done = simulate("summarize", "--budget-cents", "5", "--input-json", f"@{tmp_path}/nope")
    assert done.returncode == 2
    assert done.stderr.startswith("aos: error:") and "cannot read" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
