"""The runs and steps projections: pure functions of the events, shared by both stores.

Every rule here is a merge that gives the same rows whatever order the events are
applied in, because that order is not the log's: four consumers (goals, plans, runs,
budget) do not wait for each other, so a run's `step.started` may be applied before its
`goal.submitted`; and a batch redelivered after a crash arrives after later batches of
its own stream. So a run's status only moves forward (submitted < running < terminal)
and a terminal status is never overwritten; a step's status is that of its latest
(attempt, phase); plan steps are only added when missing; sums add up, times take the
earliest start and latest end. Each event is applied once (the stores see to that).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from aos_contracts.events import (
    PLANNING_STEP_ID,
    AnyEvent,
    BudgetDenied,
    GoalSubmitted,
    PlanCreated,
    PlanningCallFinished,
    PlanRejected,
    RequestRefused,
    RunAccepted,
    RunCancelled,
    RunCompleted,
    RunFailed,
    StepFailed,
    StepStarted,
    StepSucceeded,
)
from aos_tracer.rows import RunRow, StepRow

StepKey = tuple[uuid.UUID, str]

_STATUS_RANK = {"submitted": 0, "running": 1, "completed": 2, "failed": 2, "cancelled": 2}


def aware(value: datetime) -> datetime:
    """Events may carry naive timestamps; the envelope's default is UTC, so read them as UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def no_nul(value: str) -> str:
    """Postgres text cannot hold NUL, and anyone can put one in a goal; both stores agree."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def tokens_of(output: Any) -> int | None:
    """Tokens a step used, when its output reports `usage` the way LLM APIs do."""
    usage = output.get("usage") if isinstance(output, dict) else None
    if not isinstance(usage, dict):
        return None
    total = _count(usage.get("total_tokens"))
    if total is not None:
        return total
    counted = [_count(usage.get(key)) for key in ("input_tokens", "output_tokens")]
    present = [count for count in counted if count is not None]
    return sum(present) if present else None


def _count(value: Any) -> int | None:
    """A plausible token count, or None (outputs are free-form; bigint must not overflow)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**40:
        return value
    return None


class Projector:
    """Applies events to `runs` and `steps` (mutated in place) and notes what it touched,
    so that a store writes back only those rows."""

    def __init__(self, runs: dict[uuid.UUID, RunRow], steps: dict[StepKey, StepRow]) -> None:
        self.runs = runs
        self.steps = steps
        self.touched_runs: set[uuid.UUID] = set()
        self.touched_steps: set[StepKey] = set()

    def apply(self, event: AnyEvent) -> None:
        if isinstance(event, RequestRefused) and not event.ends_run:
            return  # an answer to its sender about a run id that is not theirs: no run
        at = aware(event.occurred_at)
        run = self._run(event, at)
        if run is None:
            return
        match event:
            case GoalSubmitted() | RunAccepted():
                run.goal = run.goal or no_nul(event.goal)
                run.budget_cents = (
                    event.budget_cents if run.budget_cents is None else run.budget_cents
                )
            case PlanCreated():
                if run.budget_cents is None:
                    run.budget_cents = event.budget_cents
                _advance(run, "running")
                for planned in event.plan.steps:
                    key = (run.run_id, planned.id)
                    if key not in self.steps:
                        self.steps[key] = StepRow(run.run_id, planned.id, planned.skill, "pending")
                        self.touched_steps.add(key)
            case PlanRejected():
                _end(run, "failed", at, cost_cents=event.planning_cost_cents)
            case PlanningCallFinished():
                if not run.is_terminal:
                    run.cost_cents += event.cost_cents
            case StepStarted():
                _advance(run, "running")
                step = self._step(run, event.step_id, event.skill)
                _step_status(step, event.attempt, "running", None)
                step.started_at = at if step.started_at is None else min(step.started_at, at)
            case StepSucceeded() | StepFailed():
                step = self._step(run, event.step_id, event.skill)
                if isinstance(event, StepSucceeded):
                    _step_status(step, event.attempt, "succeeded", None)
                    used = tokens_of(event.output)
                    if used is not None:
                        step.tokens = (step.tokens or 0) + used
                else:
                    status = "retrying" if event.will_retry else "failed"
                    _step_status(step, event.attempt, status, event.error.code.value)
                step.ended_at = at if step.ended_at is None else max(step.ended_at, at)
                step.duration_ms += event.duration_ms  # all attempts: the time the step took
                step.cost_cents += event.cost_cents  # failed attempts are charged too
                if not run.is_terminal:
                    run.cost_cents += event.cost_cents
            case BudgetDenied() if event.step_id != PLANNING_STEP_ID:
                step = self._step(run, event.step_id, None)
                if step.status == "pending":  # a denial never undoes a step that went on
                    step.status = "denied"
                    step.error_code = event.error.code.value
            case RequestRefused():  # a duplicate goal: its run id never runs
                _end(run, "failed", at, cost_cents=0)
            case RunCompleted() | RunFailed() | RunCancelled():
                status = {"run.completed": "completed", "run.failed": "failed"}.get(
                    event.type, "cancelled"
                )
                _end(run, status, at, cost_cents=event.cost_cents)
            case _:
                pass  # cancel requests, budget bookkeeping: in the event list, not the views

    def _run(self, event: AnyEvent, at: datetime) -> RunRow | None:
        """The event's run; None when the run is another tenant's (an event naming it from
        another tenant's subjects changes nothing of it: docs/SECURITY.md)."""
        run = self.runs.get(event.run_id)
        if run is not None and run.tenant != event.tenant:
            return None
        if run is None:
            run = RunRow(event.run_id, event.tenant, None, "submitted", None, 0, at, at)
            self.runs[event.run_id] = run
        run.created_at = min(run.created_at, at)
        run.updated_at = max(run.updated_at, at)
        self.touched_runs.add(run.run_id)
        return run

    def _step(self, run: RunRow, step_id: str, skill: str | None) -> StepRow:
        step_id, skill = no_nul(step_id), None if skill is None else no_nul(skill)
        key = (run.run_id, step_id)
        step = self.steps.get(key)
        if step is None:
            step = self.steps[key] = StepRow(run.run_id, step_id, skill, "pending")
        elif skill is not None:
            step.skill = skill
        self.touched_steps.add(key)
        return step


# Where a status sits in one attempt: a step's status comes from its latest attempt's
# latest phase, whichever order the events were applied in.
_STEP_PHASE = {
    "pending": -1,
    "denied": -1,
    "running": 0,
    "retrying": 1,
    "succeeded": 1,
    "failed": 1,
}


def _step_status(step: StepRow, attempt: int, status: str, error_code: str | None) -> None:
    if (attempt, _STEP_PHASE[status]) >= (step.attempts, _STEP_PHASE[step.status]):
        step.status = status
        step.error_code = error_code
    step.attempts = max(step.attempts, attempt)


def _advance(run: RunRow, status: str) -> None:
    if _STATUS_RANK[status] > _STATUS_RANK[run.status]:
        run.status = status


def _end(run: RunRow, status: str, at: datetime, *, cost_cents: int) -> None:
    if run.is_terminal:
        return  # the first terminal event decides; a late one changes nothing
    run.status = status
    run.ended_at = at
    # The executor's total is authoritative, but never below what the steps reported.
    run.cost_cents = max(run.cost_cents, cost_cents)
