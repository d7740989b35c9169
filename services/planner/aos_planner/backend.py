"""What a planning backend is: something that turns a goal into a plan, or says why not."""

from __future__ import annotations

from typing import Protocol

from aos_contracts.events import GoalSubmitted
from aos_contracts.failures import FailureCode
from aos_contracts.plans import Plan


class PlanningFailed(Exception):
    """The backend could not produce a valid plan; `reasons` say why."""

    def __init__(self, reasons: list[str], code: FailureCode = FailureCode.PLAN_INVALID) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons
        self.code = code


class Planner(Protocol):
    name: str
    is_stub: bool

    async def make_plan(self, goal: GoalSubmitted) -> Plan:
        """A plan for the goal, or PlanningFailed. Transient backend errors raise
        anything else, so the goal is retried rather than rejected."""
        ...
