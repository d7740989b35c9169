"""`aos plan simulate`: offline with the stub, a plan, its estimate, whether it fits."""

from __future__ import annotations

import json
import os
import subprocess
import sys


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


def test_a_plan_over_budget_is_infeasible_and_says_why() -> None:
    done = simulate("summarize the notes", "--budget-cents", "0")
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
    done = simulate("summarize the notes", "--budget-cents", "0", "--replan", "--json")
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["feasible"] is False
    assert report["reasons"][0].endswith("above the budget of 0")
    assert report["reasons"][1] == "no stub plan for this goal fits in 0 cents"
    assert report["planning_cost_cents"] == 0  # the stub makes no model call
