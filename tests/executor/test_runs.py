"""The executor's run state machine: events in, events out (pure, no broker).

These are the executor's contract tests at the decision level: every event it decides
on is a valid contracts event (it round-trips through bytes), and the decisions follow
the lifecycle in DESIGN.md.
"""

from __future__ import annotations

import uuid

from aos_contracts import (
    BudgetDenied,
    BudgetReservationRequested,
    BudgetReserved,
    Failure,
    FailureCode,
    GoalSubmitted,
    Plan,
    PlanCreated,
    PlanRejected,
    PlanStep,
    RunCancelled,
    RunCancelRequested,
    RunCompleted,
    RunFailed,
    StepFailed,
    StepStarted,
    StepSucceeded,
    decode_event,
    encode_event,
)
from aos_contracts.events import EventEnvelope
from aos_executor.runs import RunState, StepStatus, reservation_id


def two_step_plan() -> Plan:
    return Plan(
        steps=[
            PlanStep(
                id="a",
                skill="json_transform",
                params={"op": "extract", "input": "${goal.inputs}", "path": "x"},
            ),
            PlanStep(
                id="b",
                skill="json_transform",
                params={"op": "pick", "input": "${steps.a.output}", "keys": ["k"]},
                depends_on=["a"],
            ),
        ]
    )


def start(plan: Plan | None = None) -> tuple[RunState, PlanCreated]:
    submitted = GoalSubmitted(
        run_id=uuid.uuid4(), tenant="acme", goal="g", budget_cents=10, inputs={"x": {"k": 1}}
    )
    created = submitted.caused(
        PlanCreated,
        "plan.created",
        plan=plan or two_step_plan(),
        estimated_cents=0,
        budget_cents=10,
        inputs=submitted.inputs,
    )
    state = RunState(submitted.run_id, "acme")
    state.apply(created)
    return state, created


def valid(events: list[EventEnvelope]) -> list[EventEnvelope]:
    for event in events:
        assert decode_event(encode_event(event)) == event
    return events


def reserved_for(state: RunState, step_id: str, attempt: int = 1) -> BudgetReserved:
    return BudgetReserved(
        run_id=state.run_id,
        tenant="acme",
        reservation_id=reservation_id(state.run_id, step_id, attempt),
        step_id=step_id,
        attempt=attempt,
        amount_cents=0,
        remaining_cents=10,
    )


def succeed(state: RunState, step_id: str, output: object) -> None:
    step = state.steps[step_id]
    state.apply(state.step_event(StepStarted, step, "started"))
    state.apply(state.step_event(StepSucceeded, step, "result", output=output, cost_cents=1))


def test_only_steps_whose_dependencies_are_met_ask_for_budget() -> None:
    state, _ = start()
    events, startable = state.next_actions()
    valid(events)
    assert [type(e) for e in events] == [BudgetReservationRequested]
    assert isinstance(events[0], BudgetReservationRequested)
    assert events[0].step_id == "a"
    assert startable == []


def test_deciding_twice_gives_the_same_event_ids() -> None:
    state, _ = start()
    first, _ = state.next_actions()
    again, _ = state.next_actions()
    assert [e.event_id for e in first] == [e.event_id for e in again]


def test_a_step_starts_only_after_its_reservation_and_the_run_completes_with_sink_outputs() -> None:
    state, _ = start()
    events, _ = state.next_actions()
    state.apply(events[0])  # type: ignore[arg-type]
    assert state.next_actions() == ([], [])  # waiting for the ledger
    state.apply(reserved_for(state, "a"))
    _, startable = state.next_actions()
    assert [s.step.id for s in startable] == ["a"]
    succeed(state, "a", {"k": 1})
    events, _ = state.next_actions()
    assert [(type(e), getattr(e, "step_id", None)) for e in events] == [
        (BudgetReservationRequested, "b")
    ]
    state.apply(events[0])  # type: ignore[arg-type]
    state.apply(reserved_for(state, "b"))
    succeed(state, "b", {"k": 1})
    events, _ = state.next_actions()
    valid(events)
    assert len(events) == 1
    completed = events[0]
    assert isinstance(completed, RunCompleted)
    assert completed.outputs == {"b": {"k": 1}}
    assert completed.cost_cents == 2


def test_a_denied_reservation_fails_the_run_with_budget_exceeded() -> None:
    state, _ = start()
    events, _ = state.next_actions()
    state.apply(events[0])  # type: ignore[arg-type]
    state.apply(
        BudgetDenied(
            run_id=state.run_id,
            tenant="acme",
            reservation_id=reservation_id(state.run_id, "a", 1),
            step_id="a",
            attempt=1,
            amount_cents=50,
            remaining_cents=10,
            error=Failure.of(FailureCode.BUDGET_EXCEEDED, "50 > 10"),
        )
    )
    events, startable = state.next_actions()
    assert startable == []
    failed = events[0]
    assert isinstance(failed, RunFailed)
    assert failed.error.code is FailureCode.BUDGET_EXCEEDED
    assert failed.failed_step_id == "a"


def test_a_retryable_failure_asks_for_a_new_reservation_for_the_next_attempt() -> None:
    state, _ = start()
    events, _ = state.next_actions()
    state.apply(events[0])  # type: ignore[arg-type]
    state.apply(reserved_for(state, "a"))
    step = state.steps["a"]
    error = Failure.of(FailureCode.SKILL_TIMEOUT, "slow")
    state.apply(state.step_event(StepFailed, step, "result", error=error, will_retry=True))
    assert step.status is StepStatus.BACKOFF
    assert step.attempt == 2
    step.status = StepStatus.PENDING  # the service does this after the backoff delay
    events, _ = state.next_actions()
    request = events[0]
    assert isinstance(request, BudgetReservationRequested)
    assert request.attempt == 2
    assert request.reservation_id == reservation_id(state.run_id, "a", 2)
    # A late decision for attempt 1 changes nothing.
    state.apply(request)
    state.apply(reserved_for(state, "a", attempt=1))
    assert step.status is StepStatus.RESERVING


def test_a_final_failure_fails_the_run() -> None:
    state, _ = start()
    step = state.steps["a"]
    state.apply(reserved_for(state, "a"))
    error = Failure.of(FailureCode.INPUT_INVALID, "path 'x' not found")
    state.apply(state.step_event(StepFailed, step, "result", error=error, will_retry=False))
    events, _ = state.next_actions()
    failed = events[0]
    assert isinstance(failed, RunFailed)
    assert failed.error.code is FailureCode.INPUT_INVALID


def test_cancellation_ends_the_run_as_cancelled() -> None:
    state, created = start()
    state.apply(created.caused(RunCancelRequested, "cancel", reason="changed my mind"))
    events, _ = state.next_actions()
    valid(events)
    assert isinstance(events[0], RunCancelled)
    assert events[0].reason == "changed my mind"


def test_a_rejected_plan_fails_the_run_with_the_planners_code() -> None:
    submitted = GoalSubmitted(run_id=uuid.uuid4(), tenant="acme", goal="g", budget_cents=0)
    state = RunState(submitted.run_id, "acme")
    state.apply(
        submitted.caused(PlanRejected, "r", reasons=["too dear"], code=FailureCode.BUDGET_EXCEEDED)
    )
    events, _ = state.next_actions()
    failed = events[0]
    assert isinstance(failed, RunFailed)
    assert failed.error.code is FailureCode.BUDGET_EXCEEDED
    assert "too dear" in failed.error.message


def test_replaying_the_same_events_twice_changes_nothing() -> None:
    state, created = start()
    events, _ = state.next_actions()
    history = [created, events[0], reserved_for(state, "a")]
    for event in history:
        state.apply(event)  # type: ignore[arg-type]
    succeed(state, "a", {"k": 1})
    snapshot = {k: (s.status, s.attempt, s.cost_cents) for k, s in state.steps.items()}
    for event in history:
        state.apply(event)  # type: ignore[arg-type]
    succeed(state, "a", {"k": 1})
    assert {k: (s.status, s.attempt, s.cost_cents) for k, s in state.steps.items()} == snapshot


def test_terminal_run_decides_nothing_more() -> None:
    state, _ = start()
    state.apply(state._terminal(RunCancelled, reason="x"))  # type: ignore[arg-type]
    assert state.next_actions() == ([], [])


def optional_plan() -> Plan:
    """a -> (extra, optional) -> (polish, optional); a -> b (required)."""
    merge = {"op": "merge", "inputs": [{"k": 1}]}
    return Plan(
        steps=[
            PlanStep(id="a", skill="json_transform", params=merge),
            PlanStep(
                id="extra",
                skill="llm_invoke",
                params={"prompt": "x"},
                depends_on=["a"],
                optional=True,
            ),
            PlanStep(
                id="polish",
                skill="json_transform",
                params=merge,
                depends_on=["extra"],
                optional=True,
            ),
            PlanStep(id="b", skill="json_transform", params=merge, depends_on=["a"]),
        ]
    )


def deny(state: RunState, step_id: str) -> None:
    state.apply(
        BudgetDenied(
            run_id=state.run_id,
            tenant="acme",
            reservation_id=reservation_id(state.run_id, step_id, 1),
            step_id=step_id,
            attempt=1,
            amount_cents=50,
            remaining_cents=1,
            error=Failure.of(FailureCode.BUDGET_EXCEEDED, "50 > 1"),
        )
    )


def test_a_denied_optional_step_is_skipped_with_its_optional_dependents_and_the_run_completes() -> (
    None
):
    state, _ = start(optional_plan())
    state.apply(reserved_for(state, "a"))
    succeed(state, "a", {"k": 1})
    deny(state, "extra")
    assert state.steps["extra"].status is StepStatus.SKIPPED
    assert state.steps["polish"].status is StepStatus.SKIPPED
    state.apply(reserved_for(state, "b"))
    succeed(state, "b", {"k": 1})
    events, _ = state.next_actions()
    valid(events)
    completed = events[0]
    assert isinstance(completed, RunCompleted)
    assert completed.skipped_steps == ["extra", "polish"]
    assert completed.outputs == {"b": {"k": 1}}


def test_a_required_step_that_needs_a_skipped_step_fails_the_run() -> None:
    plan = Plan(
        steps=[
            PlanStep(id="extra", skill="llm_invoke", params={"prompt": "x"}, optional=True),
            PlanStep(
                id="use",
                skill="json_transform",
                params={"op": "merge", "inputs": []},
                depends_on=["extra"],
            ),
        ]
    )
    state, _ = start(plan)
    deny(state, "extra")
    events, _ = state.next_actions()
    failed = events[0]
    assert isinstance(failed, RunFailed)
    assert failed.error.code is FailureCode.BUDGET_EXCEEDED
    assert failed.failed_step_id == "use"
    assert "optional step 'extra', which was skipped" in failed.error.message
