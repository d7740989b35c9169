"""From a goal to the planner's decision: the events it publishes.

Whatever the backend, a plan is validated here before it is accepted: every skill
exists, params fit the skill's input schema, references point at earlier steps and at
fields their output has, no cycles, step count and depth within the configured limits,
and the worst-case cost (each skill's cost model) fits what the run has left once
planning is paid for. An invalid plan is rejected with every reason and never runs; a
plan above the budget is asked for again, once, when the goal allows it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from aos_contracts.events import (
    EventEnvelope,
    GoalSubmitted,
    PlanCreated,
    PlanRejected,
    RunAccepted,
)
from aos_contracts.failures import FailureCode
from aos_contracts.plans import (
    DEFAULT_PLAN_LIMITS,
    Plan,
    PlanLimits,
    limit_problems,
    plan_problems,
    references_in,
)
from aos_contracts.skills import SKILL_CONTRACTS, output_fields_by_skill
from aos_planner.backend import CallMeter, OverBudget, Planner, PlanningFailed, Unmetered


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


def validation_problems(plan: Plan, limits: PlanLimits = DEFAULT_PLAN_LIMITS) -> list[str]:
    """Every reason to reject the plan: its size against `limits`, then skills,
    references (to earlier steps and to fields their output has), cycles, and params."""
    return (
        limit_problems(plan, limits)
        + plan_problems(plan, set(SKILL_CONTRACTS), output_fields_by_skill())
        + param_problems(plan)
    )


Validate = Callable[[Plan], list[str]]

# The largest goal.submitted message (its bytes on the bus: text, inputs and envelope)
# the planner plans. NATS refuses messages above its max payload (1 MiB by default), and
# the events derived from a goal copy it: run.accepted holds its text and inputs,
# plan.created its inputs next to the plan, step.started params resolved from the inputs.
# A quarter of the max payload leaves room for each of those, and for a parked copy.
MAX_GOAL_BYTES = 256 * 1024


def goal_size_refusal(
    goal: GoalSubmitted, size_bytes: int, limit: int = MAX_GOAL_BYTES
) -> PlanRejected | None:
    """plan.rejected GOAL_TOO_LARGE for a goal whose message is above `limit` bytes,
    decided before any planning call (and never retried: the goal cannot shrink)."""
    if size_bytes <= limit:
        return None
    return too_large_refusal(
        goal, f"the goal is {size_bytes} bytes, above the limit of {limit} bytes"
    )


def too_large_refusal(goal: GoalSubmitted, reason: str) -> PlanRejected:
    return goal.caused(
        PlanRejected, "plan.rejected", reasons=[reason], code=FailureCode.GOAL_TOO_LARGE
    )


@dataclass(frozen=True)
class Planned:
    """A goal's plan, accepted: valid, and estimated within what the run has left."""

    plan: Plan
    estimated_cents: int
    planning_cost_cents: int
    replanned: bool = False


@dataclass(frozen=True)
class Refused:
    """A goal no acceptable plan came from, with every reason."""

    reasons: list[str]
    code: FailureCode
    planning_cost_cents: int


async def plan_goal(
    goal: GoalSubmitted,
    planner: Planner,
    meter: CallMeter,
    *,
    validate: Validate = validation_problems,
    recorded: Plan | None = None,
) -> Planned | Refused:
    """Ask the backend for a plan (or take `recorded`, a plan reused from an earlier run),
    validate it, and check its worst case against what the run has left once planning
    is paid for. A plan above that is refused, or, when the goal allows it, asked for
    once more with the budget stated."""

    def refused(reasons: list[str], code: FailureCode) -> Refused:
        return Refused(reasons, code, meter.spent_cents)

    try:
        plan = recorded if recorded is not None else await planner.make_plan(goal, meter)
    except PlanningFailed as exc:
        return refused(exc.reasons, exc.code)
    problems = validate(plan)
    if problems:
        return refused(problems, FailureCode.PLAN_INVALID)
    estimate = estimate_cents(plan)
    over_budget = _over_budget(estimate, goal, meter.spent_cents)
    if over_budget is None:
        return Planned(plan, estimate, meter.spent_cents)
    if not goal.replan_within_budget or recorded is not None:
        return refused([over_budget], FailureCode.BUDGET_EXCEEDED)
    first = OverBudget(plan, estimate, goal.budget_cents - meter.spent_cents)
    try:
        plan = await planner.make_plan(goal, meter, over_budget=first)
    except PlanningFailed as exc:
        return refused([over_budget, *exc.reasons], exc.code)
    problems = validate(plan)
    if problems:
        return refused(
            [over_budget, "the plan asked for within the budget is invalid:", *problems],
            FailureCode.PLAN_INVALID,
        )
    estimate = estimate_cents(plan)
    still_over = _over_budget(estimate, goal, meter.spent_cents)
    if still_over is not None:
        return refused(
            [over_budget, f"asked again within the budget: {still_over}"],
            FailureCode.BUDGET_EXCEEDED,
        )
    return Planned(plan, estimate, meter.spent_cents, replanned=True)


def _over_budget(estimate: int, goal: GoalSubmitted, planning_cents: int) -> str | None:
    """Why a plan estimated at `estimate` cents does not fit what the run has left after
    planning; None if it does."""
    remaining = goal.budget_cents - planning_cents
    if estimate <= remaining:
        return None
    if planning_cents == 0:
        return f"plan is estimated at {estimate} cents, above the budget of {goal.budget_cents}"
    return (
        f"plan is estimated at {estimate} cents, above the {remaining} cents left of the "
        f"budget of {goal.budget_cents} after planning cost {planning_cents}"
    )


def accepted_event(goal: GoalSubmitted, backend: str) -> RunAccepted:
    return goal.caused(
        RunAccepted,
        "run.accepted",
        goal=goal.goal,
        budget_cents=goal.budget_cents,
        inputs=goal.inputs,
        planner_backend=backend,
    )


def decision_event(
    goal: GoalSubmitted, outcome: Planned | Refused, *, reused_plan_of: uuid.UUID | None = None
) -> PlanCreated | PlanRejected:
    """The event that ends planning. The executor owns the run's lifecycle: it answers
    plan.rejected with run.failed."""
    if isinstance(outcome, Refused):
        return goal.caused(
            PlanRejected,
            "plan.rejected",
            reasons=outcome.reasons,
            code=outcome.code,
            planning_cost_cents=outcome.planning_cost_cents,
        )
    return goal.caused(
        PlanCreated,
        "plan.created",
        plan=outcome.plan,
        estimated_cents=outcome.estimated_cents,
        budget_cents=goal.budget_cents,
        inputs=goal.inputs,
        planning_cost_cents=outcome.planning_cost_cents,
        replanned=outcome.replanned,
        reused_plan_of=reused_plan_of,
    )


async def decide(
    goal: GoalSubmitted, planner: Planner, *, validate: Validate = validation_problems
) -> list[EventEnvelope]:
    """The events that answer one goal with an unmetered backend: accepted, then a plan
    or a rejection (the service meters paid backends; see metering.py)."""
    outcome = await plan_goal(goal, planner, Unmetered(), validate=validate)
    return [accepted_event(goal, planner.name), decision_event(goal, outcome)]
