"""Simulate a plan: what would run, what it may cost, whether it fits — before anything runs.

    python -m aos_planner simulate "summarize the notes" --budget-cents 20 \\
        --input-json '{"text": "..."}' [--json]

Uses the configured backend (PLANNER_BACKEND; the stub needs nothing else, so this works
offline). Exit 0 when the plan is valid and fits the budget, 1 when it does not, 2 on a
usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from typing import Any

from pydantic import ValidationError

from aos_contracts.events import GoalSubmitted
from aos_contracts.skills import SKILL_CONTRACTS
from aos_planner.backend import PlanningFailed
from aos_planner.planning import budget_problem, estimate_cents, validation_problems
from aos_planner.service import make_planner
from aos_planner.settings import PlannerSettings


async def simulate(text: str, budget_cents: int, inputs: dict[str, Any]) -> dict[str, Any]:
    settings = PlannerSettings()
    planner = make_planner(settings)
    goal = GoalSubmitted(
        run_id=uuid.uuid4(),
        tenant="simulation",
        goal=text,
        budget_cents=budget_cents,
        inputs=inputs,
    )
    report: dict[str, Any] = {"goal": text, "budget_cents": budget_cents, "backend": planner.name}
    try:
        plan = await planner.make_plan(goal)
    except PlanningFailed as exc:
        return {**report, "feasible": False, "reasons": exc.reasons, "steps": []}
    steps = []
    for step in plan.steps:
        try:
            estimate: int | None = SKILL_CONTRACTS[step.skill].estimate_cents(step.params)
        except (KeyError, ValueError):
            estimate = None  # unknown skill (reported below) or params resolved at run time
        steps.append(
            {
                "id": step.id,
                "skill": step.skill,
                "depends_on": step.depends_on,
                "estimated_cents": estimate,
                "params": step.params,
            }
        )
    reasons = validation_problems(plan)
    over = None if reasons else budget_problem(plan, budget_cents)
    if over:
        reasons = [over]
    return {
        **report,
        "feasible": not reasons,
        "reasons": reasons,
        "estimated_cents": None if reasons and not over else estimate_cents(plan),
        "rationale": plan.rationale,
        "steps": steps,
    }


def render(report: dict[str, Any]) -> str:
    lines = [
        f"goal      {report['goal']}",
        f"backend   {report['backend']}",
        f"budget    {report['budget_cents']} cents",
    ]
    if report.get("estimated_cents") is not None:
        lines.append(f"estimate  {report['estimated_cents']} cents (worst case)")
    lines.append(f"feasible  {'yes' if report['feasible'] else 'no'}")
    for reason in report["reasons"]:
        lines.append(f"  - {reason}")
    if report["steps"]:
        lines += ["", "  step        skill           after        cents"]
        for step in report["steps"]:
            cents = "run time" if step["estimated_cents"] is None else str(step["estimated_cents"])
            after = ",".join(step["depends_on"]) or "-"
            lines.append(f"  {step['id']:<11} {step['skill']:<15} {after:<12} {cents}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="aos-planner simulate", description=__doc__)
    parser.add_argument("goal")
    parser.add_argument("--budget-cents", type=int, required=True)
    parser.add_argument("--input-json", default="{}")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        inputs = json.loads(args.input_json)
        if not isinstance(inputs, dict):
            raise ValueError("--input-json must be a JSON object")
        report = asyncio.run(simulate(args.goal, args.budget_cents, inputs))
    except (ValueError, ValidationError) as exc:
        print(f"aos: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else render(report))
    return 0 if report["feasible"] else 1
