"""From a goal to the planner's decision: the events it publishes.

Whatever the backend, a plan is validated here before it is accepted: every skill
exists, params fit the skill's input schema, references point at earlier steps, no
cycles, and the worst-case cost (each skill's cost model) fits the budget. An invalid
plan is rejected with every reason and never runs.
"""

from __future__ import annotations

from aos_contracts.events import (
    EventEnvelope,
    GoalSubmitted,
    PlanCreated,
    PlanRejected,
    RunAccepted,
)
from aos_contracts.failures import FailureCode
from aos_contracts.plans import Plan, plan_problems, references_in
from aos_contracts.skills import SKILL_CONTRACTS
from aos_planner.backend import Planner, PlanningFailed


def param_problems(plan: Plan) -> list[str]:
    """Params checked against each skill's input schema, as far as possible before the
    references are resolved: unknown fields, missing required fields, and full
    validation of steps that hold no reference."""
    problems: list[str] = []
    for step in plan.steps:
        contract = SKILL_CONTRACTS.get(step.skill)
        if contract is None:
            continue  # reported by plan_problems
        fields = contract.params_model.model_fields
        unknown = sorted(set(step.params) - set(fields))
        if unknown:
            problems.append(f"step {step.id!r}: {step.skill} has no params {unknown}")
        missing = sorted(
            name for name, info in fields.items() if info.is_required() and name not in step.params
        )
        if missing:
            problems.append(f"step {step.id!r}: {step.skill} needs params {missing}")
        if not unknown and not missing and not references_in(step.params):
            try:
                contract.params_model.model_validate(step.params)
            except ValueError as exc:
                problems.append(f"step {step.id!r}: invalid params: {exc}")
    return problems


def estimate_cents(plan: Plan) -> int:
    """Worst-case cost of the plan from each skill's cost model."""
    total = 0
    for step in plan.steps:
        contract = SKILL_CONTRACTS[step.skill]
        try:
            total += contract.estimate_cents(step.params)
        except ValueError:
            continue  # params with unresolved references are estimated at run time
    return total


def validation_problems(plan: Plan) -> list[str]:
    return plan_problems(plan, set(SKILL_CONTRACTS)) + param_problems(plan)


def budget_problem(plan: Plan, budget_cents: int) -> str | None:
    estimate = estimate_cents(plan)
    if estimate > budget_cents:
        return f"plan is estimated at {estimate} cents, above the budget of {budget_cents}"
    return None


async def decide(goal: GoalSubmitted, planner: Planner) -> list[EventEnvelope]:
    """The events that answer one goal: accepted, then a plan or a rejection."""
    accepted = goal.caused(
        RunAccepted,
        "run.accepted",
        goal=goal.goal,
        budget_cents=goal.budget_cents,
        inputs=goal.inputs,
        planner_backend=planner.name,
    )
    try:
        plan = await planner.make_plan(goal)
    except PlanningFailed as exc:
        return [accepted, *_reject(goal, exc.reasons, exc.code)]
    problems = validation_problems(plan)
    if problems:
        return [accepted, *_reject(goal, problems, FailureCode.PLAN_INVALID)]
    over_budget = budget_problem(plan, goal.budget_cents)
    if over_budget:
        return [accepted, *_reject(goal, [over_budget], FailureCode.BUDGET_EXCEEDED)]
    estimate = estimate_cents(plan)
    created = goal.caused(
        PlanCreated,
        "plan.created",
        plan=plan,
        estimated_cents=estimate,
        budget_cents=goal.budget_cents,
        inputs=goal.inputs,
    )
    return [accepted, created]


def _reject(goal: GoalSubmitted, reasons: list[str], code: FailureCode) -> list[EventEnvelope]:
    # The executor owns the run's lifecycle: it answers plan.rejected with run.failed.
    return [goal.caused(PlanRejected, "plan.rejected", reasons=reasons, code=code)]
