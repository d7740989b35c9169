"""Replay: re-drive a recorded run through the executor's decisions, offline.

The recorded plan is applied to a fresh RunState; every budget decision and every skill
result is taken from the recording instead of the ledger and the skills, so nothing is
called and nothing is charged. At each decision the replay compares what the executor
decides now with what it decided then — reservation requests (ids, amounts), the order
in which steps become ready, each step's params after reference resolution, retries,
and how the run ends — and reports every difference.

A replay with no differences means today's executor would take the same decisions on
the same facts; a difference points at the first decision that changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aos_contracts.events import (
    AnyEvent,
    BudgetDenied,
    BudgetReservationRequested,
    BudgetReserved,
    PlanCreated,
    PlanRejected,
    RunCancelled,
    RunCancelRequested,
    RunCompleted,
    RunFailed,
    StepFailed,
    StepStarted,
    StepSucceeded,
)
from aos_executor.references import UnresolvedReference, resolve
from aos_executor.runs import RunState, StepStatus

MAX_DECISIONS = 10_000  # a plan has at most 200 steps of at most 10 attempts


@dataclass
class ReplayReport:
    run_id: str
    decisions: int = 0
    differences: list[str] = field(default_factory=list)
    recorded_end: str | None = None
    replayed_end: str | None = None

    @property
    def identical(self) -> bool:
        return not self.differences

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "identical": self.identical,
            "decisions": self.decisions,
            "differences": self.differences,
            "recorded_end": self.recorded_end,
            "replayed_end": self.replayed_end,
        }


@dataclass
class _Recording:
    requests: dict[str, BudgetReservationRequested] = field(default_factory=dict)
    decisions: dict[str, BudgetReserved | BudgetDenied] = field(default_factory=dict)
    started: dict[tuple[str, int], StepStarted] = field(default_factory=dict)
    results: dict[tuple[str, int], StepSucceeded | StepFailed] = field(default_factory=dict)
    end: RunCompleted | RunFailed | RunCancelled | None = None
    cancel: RunCancelRequested | None = None

    @classmethod
    def of(cls, events: list[AnyEvent]) -> _Recording:
        recording = cls()
        for event in events:
            if isinstance(event, BudgetReservationRequested):
                recording.requests.setdefault(str(event.reservation_id), event)
            elif isinstance(event, (BudgetReserved, BudgetDenied)):
                recording.decisions.setdefault(str(event.reservation_id), event)
            elif isinstance(event, StepStarted):
                recording.started.setdefault((event.step_id, event.attempt), event)
            elif isinstance(event, (StepSucceeded, StepFailed)):
                recording.results.setdefault((event.step_id, event.attempt), event)
            elif isinstance(event, (RunCompleted, RunFailed, RunCancelled)):
                recording.end = recording.end or event
            elif isinstance(event, RunCancelRequested):
                recording.cancel = recording.cancel or event
        return recording


def replay(events: list[AnyEvent]) -> ReplayReport:
    """Re-drive the run recorded in `events` (all events of one run, any order)."""
    ordered = sorted(events, key=lambda event: event.occurred_at)
    plan = next((e for e in ordered if isinstance(e, (PlanCreated, PlanRejected))), None)
    if plan is None:
        raise ValueError("the recording has no plan.created or plan.rejected: nothing to replay")
    recording = _Recording.of(ordered)
    report = ReplayReport(run_id=str(plan.run_id))
    report.recorded_end = recording.end.type if recording.end else None
    state = RunState(plan.run_id, plan.tenant)
    state.apply(plan)
    if recording.cancel is not None:
        # A cancellation is a fact from outside; the replay takes it as given, at the
        # start, which is only faithful for runs cancelled before their steps ran.
        state.apply(recording.cancel)

    for _ in range(MAX_DECISIONS):
        for step in state.steps.values():
            if step.status is StepStatus.BACKOFF:
                step.status = StepStatus.PENDING  # the backoff delay is not replayed
        decided, startable = state.next_actions()
        if not decided and not startable:
            break
        for event in decided:
            report.decisions += 1
            if isinstance(event, BudgetReservationRequested):
                if not _request_matches(event, recording, report):
                    return _stop(report, state)
                state.apply(event)
                decision = recording.decisions.get(str(event.reservation_id))
                if decision is None:
                    report.differences.append(
                        f"step {event.step_id!r} attempt {event.attempt}: the recording has "
                        "no budget decision for this reservation (the run was still going)"
                    )
                    return _stop(report, state)
                state.apply(decision)
            elif isinstance(event, (RunCompleted, RunFailed, RunCancelled)):
                _compare_end(event, recording, report)
                state.apply(event)
        for step in startable:
            report.decisions += 1
            key = (step.step.id, step.attempt)
            recorded_start = recording.started.get(key)
            result = recording.results.get(key)
            if recorded_start is None or result is None:
                report.differences.append(
                    f"step {step.step.id!r} attempt {step.attempt}: the replay starts it but "
                    "the recording has no result for it"
                )
                return _stop(report, state)
            try:
                params = resolve(step.step.params, state.inputs, state.outputs())
            except UnresolvedReference as exc:
                params = {"_unresolved": str(exc)}
            if recorded_start.params and params != recorded_start.params:
                report.differences.append(
                    f"step {step.step.id!r} attempt {step.attempt}: params after resolution "
                    f"differ: recorded {recorded_start.params!r}, replayed {params!r}"
                )
            state.apply(recorded_start)
            state.apply(result)
    return _stop(report, state)


def _request_matches(
    event: BudgetReservationRequested, recording: _Recording, report: ReplayReport
) -> bool:
    recorded = recording.requests.get(str(event.reservation_id))
    where = f"step {event.step_id!r} attempt {event.attempt}"
    if recorded is None:
        report.differences.append(f"{where}: the replay asks for budget, the recording did not")
        return False
    if recorded.amount_cents != event.amount_cents:
        report.differences.append(
            f"{where}: reservation of {event.amount_cents} cents, recorded {recorded.amount_cents}"
        )
    if recorded.event_id != event.event_id:
        report.differences.append(f"{where}: reservation request id differs from the recording")
    return True


def _compare_end(
    event: RunCompleted | RunFailed | RunCancelled, recording: _Recording, report: ReplayReport
) -> None:
    report.replayed_end = event.type
    recorded = recording.end
    if recorded is None:
        report.differences.append(f"the replay ends the run ({event.type}), the recording did not")
        return
    if recorded.type != event.type:
        report.differences.append(f"run ends as {event.type}, recorded {recorded.type}")
    elif isinstance(event, RunCompleted) and isinstance(recorded, RunCompleted):
        if event.outputs != recorded.outputs:
            report.differences.append("run outputs differ from the recording")
    elif (
        isinstance(event, RunFailed)
        and isinstance(recorded, RunFailed)
        and (event.error.code, event.failed_step_id)
        != (recorded.error.code, recorded.failed_step_id)
    ):
        report.differences.append(
            f"run fails with {event.error.code} at {event.failed_step_id!r}, recorded "
            f"{recorded.error.code} at {recorded.failed_step_id!r}"
        )
    if event.cost_cents != recorded.cost_cents:
        report.differences.append(
            f"run cost {event.cost_cents} cents, recorded {recorded.cost_cents}"
        )


def _stop(report: ReplayReport, state: RunState) -> ReplayReport:
    if state.terminal is None and report.recorded_end is not None and not report.differences:
        report.differences.append(
            f"the replay stops before the run ends; the recording ends with {report.recorded_end}"
        )
    return report
