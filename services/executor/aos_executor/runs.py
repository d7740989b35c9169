"""A run as the executor sees it: state folded from events, and what to do next.

Level-triggered, like a Kubernetes controller: `apply` folds any event (its own or
another service's, live or replayed, once or twice) into the state with guarded
transitions, and `next_actions` looks at the state and says what is missing. Every
event it decides on has an id derived from (run, step, attempt, purpose), so deciding
twice — after a crash, a redelivery, or a replay — publishes the same ids, which the
log drops as duplicates. Pure: no I/O here.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from pydantic_core import to_json

from aos_contracts.events import (
    AnyEvent,
    BudgetDenied,
    BudgetReservationRequested,
    BudgetReserved,
    EventEnvelope,
    PlanCreated,
    PlanRejected,
    RunAccepted,
    RunCancelled,
    RunCancelRequested,
    RunCompleted,
    RunFailed,
    StepFailed,
    StepStarted,
    StepSucceeded,
    derive_event_id,
)
from aos_contracts.failures import Failure, FailureCode
from aos_contracts.plans import Plan, PlanStep
from aos_contracts.skills import SKILL_CONTRACTS
from aos_executor.references import UnresolvedReference, resolve


class StepStatus(StrEnum):
    PENDING = "pending"  # nothing asked yet for this attempt
    RESERVING = "reserving"  # budget.reservation_requested published
    RESERVED = "reserved"  # the ledger said yes: may start
    RUNNING = "running"  # step.started published, result not yet
    # step.started is in the log but no result, and no call runs in this process (the
    # executor that made it died): settled by the skill's safety, see `may_call_again`
    INTERRUPTED = "interrupted"
    BACKOFF = "backoff"  # failed retryably, waiting before the next attempt
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # failed for good (non-retryable or out of attempts)
    DENIED = "denied"  # the ledger said no
    SKIPPED = "skipped"  # optional, and the budget (or a skipped dependency) said no


@dataclass
class StepState:
    step: PlanStep
    attempt: int = 1
    status: StepStatus = StepStatus.PENDING
    output: Any = None
    cost_cents: int = 0  # actual cost summed over attempts
    failure: Failure | None = None
    # The attempt whose Idempotency-Key the current one carries: an earlier one whose
    # call may have had its effect (None: the current attempt's own key).
    key_attempt: int | None = None

    @property
    def max_attempts(self) -> int:
        contract = SKILL_CONTRACTS.get(self.step.skill)
        default = contract.max_attempts if contract else 1
        return self.step.max_attempts or default


def reservation_id(run_id: uuid.UUID, step_id: str, attempt: int) -> uuid.UUID:
    return derive_event_id(run_id, f"reservation/{step_id}/{attempt}")


# What run.completed may carry of its sinks' outputs, in total: with the envelope it stays
# under NATS' default max payload of 1 MiB. Outputs past it are listed in omitted_outputs
# (each is in its step.succeeded). No step output is larger (AOS_MAX_STEP_OUTPUT_BYTES is
# capped at this), so a run's first sink always fits.
RUN_OUTPUTS_MAX_BYTES = 768 * 1024
# A step's params, resolved (they may hold several earlier outputs), travel in its
# step.started: larger, and the step fails INPUT_INVALID before its call.
STEP_PARAMS_MAX_BYTES = RUN_OUTPUTS_MAX_BYTES


def json_size(value: Any) -> int:
    """Bytes of `value` as the codec encodes it (compact JSON, UTF-8)."""
    return len(to_json(value))


@dataclass
class RunState:
    run_id: uuid.UUID
    tenant: str
    correlation_id: uuid.UUID | None = None
    plan: Plan | None = None
    plan_event_id: uuid.UUID | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    steps: dict[str, StepState] = field(default_factory=dict)
    rejection: PlanRejected | None = None
    cancel_reason: str | None = None
    terminal: str | None = None  # the type of the terminal event once published
    planning_cost_cents: int = 0  # the planner's model calls, charged to the run too
    # When the planner first told of the run (run.accepted, else its plan): the default
    # deadline counts from here. None: known only from a cancel, no deadline yet.
    opened_at: datetime | None = None
    deadline_at: datetime | None = None  # the goal's own deadline, if it set one

    # --- folding ---------------------------------------------------------------------

    def apply(self, event: AnyEvent) -> None:
        if isinstance(event, (RunAccepted, PlanCreated, PlanRejected)):
            self.opened_at = self.opened_at or event.occurred_at
            self.correlation_id = self.correlation_id or event.correlation_id
            if not isinstance(event, PlanRejected):
                self.deadline_at = self.deadline_at or event.deadline_at
        if isinstance(event, PlanCreated):
            if self.plan is None:
                self.plan = event.plan
                self.plan_event_id = event.event_id
                self.correlation_id = event.correlation_id
                self.inputs = dict(event.inputs)
                self.steps = {step.id: StepState(step) for step in event.plan.steps}
                self.planning_cost_cents = event.planning_cost_cents
        elif isinstance(event, PlanRejected):
            if self.rejection is None:
                self.planning_cost_cents = event.planning_cost_cents
            self.rejection = self.rejection or event
            self.correlation_id = self.correlation_id or event.correlation_id
        elif isinstance(event, RunCancelRequested):
            self.cancel_reason = self.cancel_reason or event.reason
        elif isinstance(event, (RunCompleted, RunFailed, RunCancelled)):
            self.terminal = self.terminal or event.type
        elif isinstance(event, BudgetReservationRequested):
            state = self.steps.get(event.step_id)
            if (
                state
                and _is_current_or_later(state, event.attempt)
                and state.status
                in (
                    StepStatus.PENDING,
                    StepStatus.BACKOFF,
                )
            ):
                state.attempt = event.attempt
                state.status = StepStatus.RESERVING
        elif isinstance(event, (BudgetReserved, BudgetDenied)):
            state = self.steps.get(event.step_id)
            if (
                state
                and event.reservation_id
                == reservation_id(self.run_id, state.step.id, state.attempt)
                and state.status in (StepStatus.PENDING, StepStatus.RESERVING)
            ):
                if isinstance(event, BudgetReserved):
                    state.status = StepStatus.RESERVED
                elif state.step.optional:
                    self._skip(state, event.error)
                else:
                    state.status = StepStatus.DENIED
                    state.failure = event.error
        elif isinstance(event, StepStarted):
            state = self.steps.get(event.step_id)
            if (
                state
                and event.attempt == state.attempt
                and state.status
                in (
                    StepStatus.PENDING,
                    StepStatus.RESERVING,
                    StepStatus.RESERVED,
                    StepStatus.INTERRUPTED,
                )
            ):
                state.status = StepStatus.RUNNING
        elif isinstance(event, StepSucceeded):
            state = self.steps.get(event.step_id)
            if (
                state
                and state.status is not StepStatus.SUCCEEDED
                and event.attempt >= state.attempt
            ):
                state.attempt = event.attempt
                state.status = StepStatus.SUCCEEDED
                state.output = event.output
                state.cost_cents += event.cost_cents
        elif isinstance(event, StepFailed):
            state = self.steps.get(event.step_id)
            if state and state.status in _OPEN and event.attempt >= state.attempt:
                state.cost_cents += event.cost_cents
                state.failure = event.error
                if event.will_retry:
                    # After a call that may have had its effect, the retry carries its key.
                    unknown = event.error.outcome_unknown
                    state.key_attempt = (state.key_attempt or event.attempt) if unknown else None
                    state.attempt = event.attempt + 1
                    state.status = StepStatus.BACKOFF
                else:
                    state.attempt = event.attempt
                    state.status = StepStatus.FAILED

    def _skip(self, skipped: StepState, reason: Failure) -> None:
        """Skip an optional step the budget denied, and everything that needs its output:
        optional dependents are skipped too; a required one cannot run, so it fails."""
        skipped.status = StepStatus.SKIPPED
        skipped.failure = reason
        for state in self.steps.values():
            if skipped.step.id not in state.step.depends_on or state.status not in _OPEN:
                continue
            if state.step.optional:
                self._skip(state, reason)
            else:
                state.status = StepStatus.DENIED
                state.failure = Failure.of(
                    reason.code,
                    f"needs the output of optional step {skipped.step.id!r}, which was skipped: "
                    f"{reason.message}",
                )

    def interrupt_running(self) -> list[StepState]:
        """After a rebuild from the log: every step the log shows started without a result
        was cut off mid-call by the executor that died; mark it to be settled."""
        interrupted = [s for s in self.steps.values() if s.status is StepStatus.RUNNING]
        for state in interrupted:
            state.status = StepStatus.INTERRUPTED
        return interrupted

    # --- deciding --------------------------------------------------------------------

    def deadline(self, default_s: float) -> datetime | None:
        """When the run must have ended: the goal's deadline, else `default_s` after the
        planner first told of it; None for a run the planner has not told of."""
        if self.deadline_at is not None:
            return self.deadline_at
        if self.opened_at is None:
            return None
        return self.opened_at + timedelta(seconds=default_s)

    def past_deadline(self, now: datetime, default_s: float) -> bool:
        deadline = self.deadline(default_s)
        return self.terminal is None and deadline is not None and now >= deadline

    def deadline_exceeded(self, default_s: float) -> RunFailed:
        """The end of a run that did not end by its deadline."""
        deadline = self.deadline(default_s)
        where = "before its plan" if self.plan is None else "with steps unfinished"
        error = Failure.of(
            FailureCode.DEADLINE_EXCEEDED,
            f"the run did not end by its deadline {deadline.isoformat() if deadline else '?'} "
            f"({where}); ended and its reservations released",
        )
        unfinished = [s.step.id for s in self.steps.values() if s.status not in _DONE]
        failed = self._terminal(
            RunFailed, error=error, failed_step_id=unfinished[0] if unfinished else None
        )
        assert isinstance(failed, RunFailed)
        return failed

    def may_call_again(self, state: StepState) -> bool:
        """Whether an interrupted step's call may be made again: its skill's declared
        safety, refined by its params (an http_call GET may, a POST may not unless the
        step declares the server deduplicates it)."""
        contract = SKILL_CONTRACTS.get(state.step.skill)
        if contract is None:
            return True  # no skill, no call: the attempt fails with SKILL_UNKNOWN
        return contract.retry_safe(self.resolved_params_or_raw(state))

    def interrupted_failure(self, state: StepState) -> StepFailed:
        failed: StepFailed = self.step_event(
            StepFailed,
            state,
            "result",
            error=Failure.of(
                FailureCode.STEP_INTERRUPTED,
                f"step {state.step.id!r} ({state.step.skill}) attempt {state.attempt} was cut "
                "off mid-call (the executor stopped) and may have had its effect; it is not "
                "safe to call again, so it is not",
            ),
            will_retry=False,
        )
        return failed

    @property
    def cost_cents(self) -> int:
        """What the run cost: its planning and every attempt of every step."""
        return self.planning_cost_cents + sum(state.cost_cents for state in self.steps.values())

    def outputs(self) -> dict[str, Any]:
        return {
            step_id: state.output
            for step_id, state in self.steps.items()
            if state.status is StepStatus.SUCCEEDED
        }

    def next_actions(self) -> tuple[list[EventEnvelope], list[StepState]]:
        """Events to publish now, and steps that may start now (their budget is reserved)."""
        if self.terminal:
            return [], []
        if self.rejection is not None:
            error = Failure.of(self.rejection.code, "; ".join(self.rejection.reasons))
            return [self._terminal(RunFailed, error=error)], []
        if self.plan is None:
            return [], []  # a cancel or budget event before the plan: wait for the plan
        if self.cancel_reason is not None:
            return [self._terminal(RunCancelled, reason=self.cancel_reason)], []
        for state in self.steps.values():
            if state.status in (StepStatus.FAILED, StepStatus.DENIED):
                assert state.failure is not None
                return [
                    self._terminal(RunFailed, error=state.failure, failed_step_id=state.step.id)
                ], []
        finished = (StepStatus.SUCCEEDED, StepStatus.SKIPPED)
        if all(state.status in finished for state in self.steps.values()):
            sinks, omitted = self._sink_outputs()
            skipped = [s.step.id for s in self.steps.values() if s.status is StepStatus.SKIPPED]
            return [
                self._terminal(
                    RunCompleted, outputs=sinks, skipped_steps=skipped, omitted_outputs=omitted
                )
            ], []
        events: list[EventEnvelope] = []
        startable: list[StepState] = []
        for state in self.steps.values():
            if not self._dependencies_met(state):
                continue
            if state.status is StepStatus.PENDING:
                events.append(self._reservation_request(state))
            elif state.status in (StepStatus.RESERVED, StepStatus.INTERRUPTED):
                startable.append(state)
        return events, startable

    def _sink_outputs(self) -> tuple[dict[str, Any], list[str]]:
        """The sinks' outputs that fit in run.completed (in plan order), and the others."""
        assert self.plan is not None
        outputs = self.outputs()
        sinks: dict[str, Any] = {}
        omitted: list[str] = []
        total = 0
        for step_id in self.plan.sinks():
            if step_id not in outputs:
                continue
            size = json_size(outputs[step_id])
            if total + size > RUN_OUTPUTS_MAX_BYTES:
                omitted.append(step_id)
                continue
            total += size
            sinks[step_id] = outputs[step_id]
        return sinks, omitted

    def _dependencies_met(self, state: StepState) -> bool:
        return all(self.steps[dep].status is StepStatus.SUCCEEDED for dep in state.step.depends_on)

    def _reservation_request(self, state: StepState) -> BudgetReservationRequested:
        contract = SKILL_CONTRACTS[state.step.skill]
        try:
            amount = contract.estimate_cents(self.resolved_params_or_raw(state))
        except ValueError:
            # Params that do not validate fail the step with INPUT_INVALID before the
            # skill is called, so nothing can be spent: reserve nothing.
            amount = 0
        step_id = state.step.id
        return BudgetReservationRequested(
            event_id=derive_event_id(self.run_id, f"reserve/{step_id}/{state.attempt}"),
            run_id=self.run_id,
            tenant=self.tenant,
            causation_id=self.plan_event_id,
            correlation_id=self.correlation_id,
            reservation_id=reservation_id(self.run_id, step_id, state.attempt),
            step_id=step_id,
            attempt=state.attempt,
            amount_cents=amount,
        )

    def resolved_params_or_raw(self, state: StepState) -> dict[str, Any]:
        try:
            resolved = resolve(state.step.params, self.inputs, self.outputs())
        except UnresolvedReference:
            return dict(state.step.params)
        return resolved if isinstance(resolved, dict) else dict(state.step.params)

    def abandoned(self, failure: Failure) -> EventEnvelope:
        """run.failed with `failure`: the end of a run the executor gives up on whatever
        its steps say (a dependency down for too long)."""
        return self._terminal(RunFailed, error=failure)

    def _terminal(self, cls: Callable[..., EventEnvelope], **payload: Any) -> EventEnvelope:
        return cls(
            event_id=derive_event_id(self.run_id, "terminal"),
            run_id=self.run_id,
            tenant=self.tenant,
            causation_id=self.plan_event_id
            or (self.rejection.event_id if self.rejection else None),
            correlation_id=self.correlation_id,
            cost_cents=self.cost_cents,
            **payload,
        )

    def step_event(
        self, cls: Callable[..., EventEnvelope], state: StepState, purpose: str, **payload: Any
    ) -> Any:
        step_id = state.step.id
        return cls(
            event_id=derive_event_id(self.run_id, f"{purpose}/{step_id}/{state.attempt}"),
            run_id=self.run_id,
            tenant=self.tenant,
            causation_id=reservation_id(self.run_id, step_id, state.attempt),
            correlation_id=self.correlation_id,
            step_id=step_id,
            skill=state.step.skill,
            attempt=state.attempt,
            reservation_id=reservation_id(self.run_id, step_id, state.attempt),
            **payload,
        )


_OPEN = (
    StepStatus.PENDING,
    StepStatus.RESERVING,
    StepStatus.RESERVED,
    StepStatus.RUNNING,
    StepStatus.INTERRUPTED,
)
_DONE = (StepStatus.SUCCEEDED, StepStatus.SKIPPED)


def _is_current_or_later(state: StepState, attempt: int) -> bool:
    return attempt >= state.attempt
