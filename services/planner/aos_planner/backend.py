"""What a planning backend is: something that turns a goal into a plan, or says why not."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from aos_contracts.events import GoalSubmitted, StepTelemetry
from aos_contracts.failures import FailureCode
from aos_contracts.plans import Plan


class PlanningFailed(Exception):
    """The backend could not produce a valid plan; `reasons` say why."""

    def __init__(self, reasons: list[str], code: FailureCode = FailureCode.PLAN_INVALID) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons
        self.code = code


CallOutcome = Literal["plan", "invalid", "error"]


class CallMeter(Protocol):
    """Where a backend that pays for its calls accounts for them, around each call.

    `before_call` raises PlanningFailed (BUDGET_EXCEEDED) when the run cannot afford the
    call's worst case, so the call is never made; `after_call` reports what it cost."""

    @property
    def spent_cents(self) -> int: ...

    async def before_call(self, worst_case_cents: int, model: str | None) -> None: ...

    async def after_call(
        self,
        cost_cents: int,
        *,
        outcome: CallOutcome,
        duration_ms: float,
        telemetry: StepTelemetry | None = None,
    ) -> None: ...


@dataclass
class Unmetered:
    """A meter that allows every call and only adds up their cost: for `plan simulate`,
    for tests, and for backends that cost nothing."""

    spent_cents: int = 0

    async def before_call(self, worst_case_cents: int, model: str | None) -> None:
        return None

    async def after_call(
        self,
        cost_cents: int,
        *,
        outcome: CallOutcome,
        duration_ms: float,
        telemetry: StepTelemetry | None = None,
    ) -> None:
        self.spent_cents += cost_cents


@dataclass(frozen=True)
class OverBudget:
    """Why the planner is asked again: its plan was estimated above what the run has left."""

    plan: Plan
    estimated_cents: int
    remaining_cents: int


class Planner(Protocol):
    name: str
    is_stub: bool

    async def make_plan(
        self,
        goal: GoalSubmitted,
        meter: CallMeter | None = None,
        *,
        over_budget: OverBudget | None = None,
    ) -> Plan:
        """A plan for the goal, or PlanningFailed. Transient backend errors raise
        anything else, so the goal is retried rather than rejected.

        With `over_budget`, the goal is asked again with the budget stated: the plan
        must fit in `over_budget.remaining_cents`."""
        ...
