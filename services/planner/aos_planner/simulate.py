"""Simulate a plan: what would run, what it may cost, whether it fits — before anything runs.

    python -m aos_planner simulate "summarize the notes" --budget-cents 20 \\
        --input-json '{"text": "..."}' [--json]

Uses the configured backend (PLANNER_BACKEND; the stub needs nothing else, so this works
offline). Exit 0 when the plan is valid and fits the budget, 1 when it does not, 2 on a
usage error. `--input-json -` reads the inputs from stdin (how `aos plan simulate` passes
them: a command line holds at most 128 KiB per argument).

Steps are estimated from the goal's actual inputs (preview.py): a prompt that holds a
900 KB input is priced as such. A step that uses an output not known before the run
(an http_call's, an llm_invoke's) is listed with those outputs, and estimated a second
time with each at `--assume-output-bytes` (default: the executor's default step output
limit); the verdict is the planner's, on the first estimate, and the executor reserves
each step's worst case again from its resolved params before it runs.
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
from aos_planner.backend import Planner, PlanningFailed, Unmetered
from aos_planner.planning import Refused, plan_goal, validation_problems
from aos_planner.preview import UNKNOWN_OUTPUT_BOUND_BYTES, PlanPreview, preview
from aos_planner.service import make_planner
from aos_planner.settings import PlannerSettings


async def simulate(
    text: str,
    budget_cents: int,
    inputs: dict[str, Any],
    *,
    replan: bool = False,
    assume_output_bytes: int = UNKNOWN_OUTPUT_BOUND_BYTES,
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
        view = None if plan is None else preview(plan, inputs, bound_bytes=assume_output_bytes)
        return {
            **report,
            "feasible": False,
            "reasons": outcome.reasons,
            **_estimates(view),
            "rationale": "" if plan is None else plan.rationale,
            "steps": [] if plan is None or view is None else _steps(plan, view),
        }
    view = preview(outcome.plan, inputs, bound_bytes=assume_output_bytes)
    return {
        **report,
        "feasible": True,
        "reasons": [],
        **_estimates(view),
        "estimated_cents": outcome.estimated_cents,
        "replanned": outcome.replanned,
        "rationale": outcome.plan.rationale,
        "steps": _steps(outcome.plan, view),
    }


def _estimates(view: PlanPreview | None) -> dict[str, Any]:
    """The plan's worst case from what is known before the run, and, when some step uses
    an output not known yet, its worst case with each such output at the assumed bound."""
    if view is None:
        return {"estimated_cents": None}
    unknown = any(step.unknown_outputs for step in view.steps)
    return {
        "estimated_cents": view.cents,
        "estimated_cents_at_bound": view.cents_at_bound if unknown else None,
        "assumed_output_bytes": view.bound_bytes if unknown else None,
    }


async def _plan_for_display(planner: Planner, goal: GoalSubmitted) -> Plan | None:
    if not planner.is_stub:
        return None  # asking a paid backend again only to show its plan: no
    try:
        return await planner.make_plan(goal)
    except PlanningFailed:
        return None


def _steps(plan: Plan, view: PlanPreview) -> list[dict[str, Any]]:
    by_id = {step.id: step for step in view.steps}
    steps = []
    for step in plan.steps:
        seen = by_id.get(step.id)
        unknown = list(seen.unknown_outputs) if seen else []
        steps.append(
            {
                "id": step.id,
                "skill": step.skill,
                "depends_on": step.depends_on,
                # None: an unknown skill (reported) or params that fit only once resolved
                "estimated_cents": seen.cents if seen else None,
                # steps (or `goal`) whose outputs it uses and that are not known yet
                "unknown_outputs": unknown,
                "estimated_cents_at_bound": seen.cents_at_bound if seen and unknown else None,
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
        lines.append(
            f"estimate  {report['estimated_cents']} cents (worst case, from the goal's inputs)"
            f"{replanned}"
        )
    if report.get("estimated_cents_at_bound") is not None:
        lines.append(
            f"          up to {report['estimated_cents_at_bound']} cents if every output not "
            f"known before the run is {report['assumed_output_bytes']} bytes (assumed)"
        )
    lines.append(f"feasible  {'yes' if report['feasible'] else 'no'}")
    for reason in report["reasons"]:
        lines.append(f"  - {reason}")
    if report["steps"]:
        lines += ["", "  step        skill           after        cents"]
        for step in report["steps"]:
            cents = "run time" if step["estimated_cents"] is None else str(step["estimated_cents"])
            if step["estimated_cents_at_bound"] is not None:
                cents += f", up to {step['estimated_cents_at_bound']}"
            if step["unknown_outputs"]:
                cents += f" (uses {', '.join(step['unknown_outputs'])}: not known before the run)"
            after = ",".join(step["depends_on"]) or "-"
            lines.append(f"  {step['id']:<11} {step['skill']:<15} {after:<12} {cents}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="aos-planner simulate", description=__doc__)
    parser.add_argument("goal")
    parser.add_argument("--budget-cents", type=int, required=True)
    parser.add_argument("--input-json", default="{}", help="a JSON object, or - for stdin")
    parser.add_argument(
        "--assume-output-bytes",
        type=int,
        default=UNKNOWN_OUTPUT_BOUND_BYTES,
        help="the size assumed for each output not known before the run",
    )
    parser.add_argument(
        "--replan",
        action="store_true",
        help="when the plan is above the budget, ask once more with the budget stated",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        inputs = json.loads(sys.stdin.read() if args.input_json == "-" else args.input_json)
        if not isinstance(inputs, dict):
            raise ValueError("--input-json must be a JSON object")
        if args.assume_output_bytes < 0:
            raise ValueError("--assume-output-bytes must be 0 or more")
        report = asyncio.run(
            simulate(
                args.goal,
                args.budget_cents,
                inputs,
                replan=args.replan,
                assume_output_bytes=args.assume_output_bytes,
            )
        )
    except ValidationError as exc:  # before ValueError: it is one, but many lines long
        errors = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors()
        )
        print(f"aos: error: {errors}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"aos: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else render(report))
    return 0 if report["feasible"] else 1
