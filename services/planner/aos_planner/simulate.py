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
from aos_contracts.plans import Plan
from aos_contracts.skills import SKILL_CONTRACTS
from aos_planner.backend import Planner, PlanningFailed, Unmetered
from aos_planner.planning import Refused, estimate_cents, plan_goal, validation_problems
from aos_planner.service import make_planner
from aos_planner.settings import PlannerSettings


async def simulate(
    text: str, budget_cents: int, inputs: dict[str, Any], *, replan: bool = False
) -> dict[str, Any]:
    """The planner's decision for the goal, as the service would take it, without the
    bus or the ledger: a paid backend's calls are counted, not reserved."""
    settings = PlannerSettings()
    planner = make_planner(settings)
    goal = GoalSubmitted(
        run_id=uuid.uuid4(),
        tenant="simulation",
        goal=text,
        budget_cents=budget_cents,
        inputs=inputs,
        replan_within_budget=replan,
    )
    report: dict[str, Any] = {"goal": text, "budget_cents": budget_cents, "backend": planner.name}
    meter = Unmetered()
    outcome = await plan_goal(
        goal,
        planner,
        meter,
        validate=lambda plan: validation_problems(plan, settings.plan_limits()),
    )
    report["planning_cost_cents"] = meter.spent_cents
    if isinstance(outcome, Refused):
        # The plan that was refused is not returned by plan_goal; a stub plan is shown
        # again for its per-step estimates (the stub is deterministic and free).
        plan = await _plan_for_display(planner, goal)
        return {
            **report,
            "feasible": False,
            "reasons": outcome.reasons,
            "estimated_cents": None if plan is None else estimate_cents(plan),
            "rationale": "" if plan is None else plan.rationale,
            "steps": [] if plan is None else _steps(plan),
        }
    return {
        **report,
        "feasible": True,
        "reasons": [],
        "estimated_cents": outcome.estimated_cents,
        "replanned": outcome.replanned,
        "rationale": outcome.plan.rationale,
        "steps": _steps(outcome.plan),
    }


async def _plan_for_display(planner: Planner, goal: GoalSubmitted) -> Plan | None:
    if not planner.is_stub:
        return None  # asking a paid backend again only to show its plan: no
    try:
        return await planner.make_plan(goal)
    except PlanningFailed:
        return None


def _steps(plan: Plan) -> list[dict[str, Any]]:
    steps = []
    for step in plan.steps:
        try:
            estimate: int | None = SKILL_CONTRACTS[step.skill].estimate_cents(step.params)
        except (KeyError, ValueError):
            estimate = None  # unknown skill (reported) or params resolved at run time
        steps.append(
            {
                "id": step.id,
                "skill": step.skill,
                "depends_on": step.depends_on,
                "estimated_cents": estimate,
                "params": step.params,
            }
        )
    return steps


def render(report: dict[str, Any]) -> str:
    lines = [
        f"goal      {report['goal']}",
        f"backend   {report['backend']}",
        f"budget    {report['budget_cents']} cents",
    ]
    if report.get("planning_cost_cents"):
        lines.append(f"planning  {report['planning_cost_cents']} cents (the planner's calls)")
    if report.get("estimated_cents") is not None:
        replanned = " (asked again within the budget)" if report.get("replanned") else ""
        lines.append(f"estimate  {report['estimated_cents']} cents (worst case){replanned}")
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
    parser.add_argument(
        "--replan",
        action="store_true",
        help="when the plan is above the budget, ask once more with the budget stated",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        inputs = json.loads(args.input_json)
        if not isinstance(inputs, dict):
            raise ValueError("--input-json must be a JSON object")
        report = asyncio.run(simulate(args.goal, args.budget_cents, inputs, replan=args.replan))
    except (ValueError, ValidationError) as exc:
        print(f"aos: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else render(report))
    return 0 if report["feasible"] else 1
