"""From a goal to the planner's decision: the events it publishes.

Whatever the backend, a plan is validated here before it is accepted: every skill
exists, params fit the skill's input schema, references point at earlier steps and at
fields their output has, no cycles, step count and depth within the configured limits,
references to the goal's inputs name inputs the goal has (and json_transform steps over
them succeed: preview.py runs them), and the worst-case cost (each skill's cost model,
from the params resolved from the goal's inputs) fits what the run has left once
planning is paid for. An invalid plan is rejected with every reason and never runs; a
plan above the budget is asked for again, once, when the goal allows it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from aos_contracts.events import (
    EventEnvelope,
    GoalSubmitted,
    PlanCreated,
    PlanRejected,
    RunAccepted,
    utc_now,
)
from aos_contracts.failures import FailureCode
from aos_contracts.plans import (
    DEFAULT_PLAN_LIMITS,
    Plan,
    PlanLimits,
    PlanStep,
    limit_problems,
    plan_problems,
    references_in,
)
from aos_contracts.skills import SKILL_CONTRACTS, output_fields_by_skill
from aos_planner.backend import CallMeter, OverBudget, Planner, PlanningFailed, Unmetered
from aos_planner.preview import preview


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


def estimate_cents(plan: Plan, inputs: dict[str, Any] | None = None) -> int:
    """Worst-case cost of the plan from each skill's cost model, with its params resolved
    from the goal's `inputs` as far as they can be before the run (preview.py)."""
    return preview(plan, inputs).cents


def validation_problems(plan: Plan, limits: PlanLimits = DEFAULT_PLAN_LIMITS) -> list[str]:
    """Every reason to reject the plan: its size against `limits`, then skills,
    references (to earlier steps and to fields their output has), cycles, and params."""
    return (
        limit_problems(plan, limits)
        + plan_problems(plan, set(SKILL_CONTRACTS), output_fields_by_skill())
        + param_problems(plan)
    )


MAX_SCHEMA_ERRORS = 20


def read_plan(
    raw: Any, limits: PlanLimits = DEFAULT_PLAN_LIMITS, inputs: dict[str, Any] | None = None
) -> tuple[Plan | None, list[str]]:
    """A plan given as JSON (a model's tool call): the plan when it is valid, else None
    and every reason: the schema's errors, and what validation and the goal's `inputs`
    find wrong with the parts that can be read (unknown skills, references, params,
    missing inputs), so that one repair can fix them all."""
    try:
        plan = Plan.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        problems = [
            f"{'.'.join(str(part) for part in error['loc']) or 'plan'}: {error['msg']}"
            for error in errors[:MAX_SCHEMA_ERRORS]
        ]
        if len(errors) > MAX_SCHEMA_ERRORS:
            problems.append(f"and {len(errors) - MAX_SCHEMA_ERRORS} more schema errors")
        readable = _readable_part(raw)
        if readable is not None:
            found = validation_problems(readable, limits) + preview(readable, inputs).problems
            problems += [problem for problem in found if problem not in problems]
        return None, problems
    problems = validation_problems(plan, limits) + preview(plan, inputs).problems
    return (None if problems else plan), problems


def _readable_part(raw: Any) -> Plan | None:
    """The steps of a plan that fails the schema, as far as they can be read: each with
    a string id and skill (a step that fails the schema only elsewhere is taken as it
    is, its params and depends_on kept when they have the right type)."""
    items = raw.get("steps") if isinstance(raw, dict) else None
    if not isinstance(items, list):
        return None
    steps: list[PlanStep] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        try:
            steps.append(PlanStep.model_validate(item))
            continue
        except ValidationError:
            pass
        step_id, skill = item.get("id"), item.get("skill")
        if not isinstance(step_id, str) or not isinstance(skill, str):
            continue
        params = item.get("params")
        deps = item.get("depends_on")
        if not isinstance(deps, list):
            deps = []
        steps.append(
            PlanStep.model_construct(
                id=step_id,
                skill=skill,
                params=params if isinstance(params, dict) else {},
                depends_on=[dep for dep in deps if isinstance(dep, str)],
            )
        )
    return Plan.model_construct(steps=steps, rationale="") if steps else None


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
    refusal = _invalid(plan, goal, validate)
    if refusal is not None:
        return refused(*refusal)
    estimate = estimate_cents(plan, goal.inputs)
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
    refusal = _invalid(plan, goal, validate)
    if refusal is not None:
        problems, code = refusal
        return refused(
            [over_budget, "the plan asked for within the budget is invalid:", *problems], code
        )
    estimate = estimate_cents(plan, goal.inputs)
    still_over = _over_budget(estimate, goal, meter.spent_cents)
    if still_over is not None:
        return refused(
            [over_budget, f"asked again within the budget: {still_over}"],
            FailureCode.BUDGET_EXCEEDED,
        )
    return Planned(plan, estimate, meter.spent_cents, replanned=True)


def _invalid(
    plan: Plan, goal: GoalSubmitted, validate: Validate
) -> tuple[list[str], FailureCode] | None:
    """Every reason the plan cannot run for this goal, with its code: INPUT_INVALID when
    the only reasons are the goal's inputs (a reference to an input it lacks; the code
    the step would have failed with at run time), else PLAN_INVALID. None: it can run."""
    plan_reasons = validate(plan)
    input_reasons = preview(plan, goal.inputs).problems
    if not plan_reasons and not input_reasons:
        return None
    code = FailureCode.PLAN_INVALID if plan_reasons else FailureCode.INPUT_INVALID
    return plan_reasons + input_reasons, code


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


def run_deadline(goal: GoalSubmitted) -> datetime | None:
    """When the run must have ended: `deadline_s` after the goal, or None (the executor's
    default then applies). A goal dated in the future counts from now, so that a wrong
    clock cannot stretch a deadline past MAX_RUN_DEADLINE_S."""
    if goal.deadline_s is None:
        return None
    return min(goal.occurred_at, utc_now()) + timedelta(seconds=goal.deadline_s)


def accepted_event(goal: GoalSubmitted, backend: str) -> RunAccepted:
    return goal.caused(
        RunAccepted,
        "run.accepted",
        goal=goal.goal,
        budget_cents=goal.budget_cents,
        inputs=goal.inputs,
        planner_backend=backend,
        deadline_at=run_deadline(goal),
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
            idempotency_key=goal.idempotency_key,
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
        idempotency_key=goal.idempotency_key,
        deadline_at=run_deadline(goal),
    )


async def decide(
    goal: GoalSubmitted, planner: Planner, *, validate: Validate = validation_problems
) -> list[EventEnvelope]:
    """The events that answer one goal with an unmetered backend: accepted, then a plan
    or a rejection (the service meters paid backends; see metering.py)."""
    outcome = await plan_goal(goal, planner, Unmetered(), validate=validate)
    return [accepted_event(goal, planner.name), decision_event(goal, outcome)]
