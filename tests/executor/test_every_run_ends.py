"""Every run ends, at the decision level: a step cut off mid-call is settled by its
skill's safety, a run past its deadline is ended, and no output outgrows the bus.

Pure RunState and Book tests, plus the executor's own settle helpers (no broker)."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from aos_contracts import (
    Failure,
    FailureCode,
    GoalSubmitted,
    Plan,
    PlanCreated,
    PlanStep,
    RunAccepted,
    RunCancelRequested,
    RunCompleted,
    RunFailed,
    StepFailed,
    StepStarted,
    StepSucceeded,
)
from aos_executor import runs
from aos_executor.checkpoints import Book, run_from_dict, run_to_dict
from aos_executor.idempotency import InMemoryIdempotencyStore
from aos_executor.runs import RunState, StepStatus
from aos_executor.service import ExecutorService
from aos_executor.settings import ExecutorSettings
from aos_executor.skills import SkillContext, SkillResult
from tests.executor.test_runs import reserved_for, valid

HOUR = 3600.0


def goal(**fields: Any) -> GoalSubmitted:
    return GoalSubmitted(run_id=uuid.uuid4(), tenant="acme", goal="g", budget_cents=10, **fields)


def planned(step: PlanStep, **fields: Any) -> tuple[RunState, PlanCreated]:
    submitted = goal()
    created = submitted.caused(
        PlanCreated,
        "plan.created",
        plan=Plan(steps=[step]),
        estimated_cents=0,
        budget_cents=10,
        **fields,
    )
    state = RunState(submitted.run_id, "acme")
    state.apply(created)
    return state, created


def http_step(method: str, **params: Any) -> PlanStep:
    return PlanStep(
        id="call", skill="http_call", params={"url": "http://h/x", "method": method, **params}
    )


def cut_off_mid_call(state: RunState) -> RunState:
    """The step reserved and started in the log, no result; then the rebuild a new
    executor makes of that log (through its checkpoint form)."""
    step = state.steps["call"]
    state.apply(reserved_for(state, "call"))
    state.apply(state.step_event(StepStarted, step, "started"))
    assert step.status is StepStatus.RUNNING
    rebuilt = run_from_dict(run_to_dict(state))
    assert [s.step.id for s in rebuilt.interrupt_running()] == ["call"]
    return rebuilt


# --- interrupted steps -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "again"),
    [
        (http_step("GET"), True),
        (http_step("HEAD"), True),
        (http_step("PUT"), True),
        (http_step("DELETE"), True),
        (http_step("OPTIONS"), True),
        (http_step("POST"), False),
        (http_step("PATCH"), False),
        (http_step("POST", idempotent=True), True),
        (http_step("PATCH", idempotent=True), True),
        (PlanStep(id="call", skill="llm_invoke", params={"prompt": "p"}), True),
        (PlanStep(id="call", skill="json_transform", params={"op": "pick", "keys": []}), True),
    ],
)
def test_an_interrupted_step_is_offered_again_and_called_again_only_when_retry_safe(
    step: PlanStep, again: bool
) -> None:
    state = cut_off_mid_call(planned(step)[0])
    events, startable = state.next_actions()
    assert events == []
    assert [s.step.id for s in startable] == ["call"]
    assert startable[0].status is StepStatus.INTERRUPTED
    assert state.may_call_again(startable[0]) is again


def test_an_interrupted_unsafe_step_fails_step_interrupted_and_the_run_fails() -> None:
    state = cut_off_mid_call(planned(http_step("POST"))[0])
    failed = state.interrupted_failure(state.steps["call"])
    valid([failed])
    assert failed.error.code is FailureCode.STEP_INTERRUPTED
    assert not failed.error.retryable and not failed.will_retry
    assert failed.attempt == 1
    state.apply(failed)
    assert state.steps["call"].status is StepStatus.FAILED
    (ended,), _ = state.next_actions()
    assert isinstance(ended, RunFailed)
    assert ended.error.code is FailureCode.STEP_INTERRUPTED and ended.failed_step_id == "call"


def test_an_interrupted_step_whose_result_was_recorded_succeeds_with_it() -> None:
    state = cut_off_mid_call(planned(http_step("POST"))[0])
    step = state.steps["call"]
    state.apply(state.step_event(StepSucceeded, step, "result", output={"status": 201}))
    (ended,), _ = state.next_actions()
    assert isinstance(ended, RunCompleted) and ended.outputs == {"call": {"status": 201}}


def test_a_step_running_in_this_process_is_not_interrupted() -> None:
    """Only a rebuild marks steps interrupted; live RUNNING steps are not offered."""
    state, _ = planned(http_step("POST"))
    state.apply(reserved_for(state, "call"))
    state.apply(state.step_event(StepStarted, state.steps["call"], "started"))
    assert state.next_actions() == ([], [])


def test_the_idempotency_key_is_stable_per_run_step_and_attempt() -> None:
    run_id = uuid.uuid4()

    def key(step_id: str = "call", attempt: int = 1, run: uuid.UUID = run_id) -> str:
        return SkillContext(run, "acme", step_id, "http_call", attempt=attempt).idempotency_key

    assert key() == key()
    assert len({key(), key(attempt=2), key(step_id="other"), key(run=uuid.uuid4())}) == 4
    uuid.UUID(key())  # a UUID, as the draft recommends


def service(**env: str) -> ExecutorService:
    return ExecutorService(ExecutorSettings.model_validate(env))


async def test_a_claim_left_in_flight_by_a_dead_executor_is_waited_out_not_forever() -> None:
    executor = service()
    store = InMemoryIdempotencyStore()
    executor.idempotency = store
    assert (await store.claim("run:call", ttl_s=0.3)).state == "claimed"  # then it "dies"
    began = time.monotonic()
    assert await executor._recorded_result("run:call", limit_s=0.3) is None
    assert time.monotonic() - began < 10.0


async def test_a_claim_completed_while_waiting_gives_its_recorded_result() -> None:
    executor = service()
    store = InMemoryIdempotencyStore()
    executor.idempotency = store
    await store.claim("run:call", ttl_s=30)

    async def finish_late() -> None:
        await asyncio.sleep(0.2)
        await store.complete("run:call", {"output": {"status": 201}, "cost_cents": 3}, 60)

    finisher = asyncio.create_task(finish_late())
    recorded = await asyncio.wait_for(executor._recorded_result("run:call", limit_s=30), 10)
    await finisher
    assert recorded == {"output": {"status": 201}, "cost_cents": 3}


async def test_nothing_recorded_means_nothing_to_wait_for() -> None:
    executor = service()
    executor.idempotency = InMemoryIdempotencyStore()
    assert await asyncio.wait_for(executor._recorded_result("none", limit_s=30), 1) is None


# --- deadlines ---------------------------------------------------------------------------


def test_run_accepted_opens_a_run_whose_default_deadline_ends_it_without_a_plan() -> None:
    submitted = goal()
    accepted = submitted.caused(
        RunAccepted, "run.accepted", goal="g", budget_cents=10, planner_backend="stub"
    )
    book = Book()
    state = book.fold(accepted)
    assert state is not None and state.plan is None
    deadline = state.deadline(HOUR)
    assert deadline == accepted.occurred_at + timedelta(hours=1)
    assert not state.past_deadline(deadline - timedelta(seconds=1), HOUR)
    assert state.past_deadline(deadline, HOUR)
    ended = state.deadline_exceeded(HOUR)
    valid([ended])
    assert ended.error.code is FailureCode.DEADLINE_EXCEEDED and not ended.error.retryable
    assert ended.correlation_id == submitted.event_id
    state.apply(ended)
    assert not state.past_deadline(deadline, HOUR)  # ended: nothing more to end
    assert state.next_actions() == ([], [])


def test_the_goals_deadline_wins_over_the_default_and_survives_a_checkpoint() -> None:
    at = datetime(2030, 1, 1, tzinfo=UTC)
    state, _ = planned(http_step("GET"), deadline_at=at)
    restored = run_from_dict(run_to_dict(state))
    assert restored.deadline(HOUR) == at
    assert restored.opened_at == state.opened_at
    assert restored.past_deadline(at, HOUR) and not restored.past_deadline(
        at - timedelta(seconds=1), HOUR
    )
    ended = restored.deadline_exceeded(HOUR)
    assert ended.failed_step_id == "call"  # the step that had not finished


def test_a_run_known_only_from_a_cancel_has_no_deadline_until_the_planner_names_it() -> None:
    run_id = uuid.uuid4()
    book = Book()
    forged = book.fold(RunCancelRequested(run_id=run_id, tenant="mallory"))
    assert forged is not None and forged.deadline(HOUR) is None
    accepted = RunAccepted(
        run_id=run_id, tenant="acme", goal="g", budget_cents=1, planner_backend="stub"
    )
    state = book.fold(accepted)
    assert state is not None and state.tenant == "acme" and state.cancel_reason is None
    assert state.deadline(HOUR) is not None
    # Named by the planner, the run now ignores other tenants' events.
    assert book.fold(RunCancelRequested(run_id=run_id, tenant="mallory")) is None


def test_an_old_checkpoint_without_opened_at_gets_a_deadline_from_now() -> None:
    state, _ = planned(http_step("GET"))
    saved = run_to_dict(state)
    del saved["opened_at"], saved["deadline_at"]
    restored = run_from_dict(saved)
    assert restored.deadline(HOUR) is not None


# --- sizes -------------------------------------------------------------------------------


def test_run_completed_lists_the_sink_outputs_that_do_not_fit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runs, "RUN_OUTPUTS_MAX_BYTES", 100)
    plan = Plan(
        steps=[
            PlanStep(id=name, skill="json_transform", params={"op": "pick", "keys": []})
            for name in ("a", "b", "c")
        ]
    )
    submitted = goal()
    state = RunState(submitted.run_id, "acme")
    state.apply(
        submitted.caused(PlanCreated, "plan.created", plan=plan, estimated_cents=0, budget_cents=1)
    )
    outputs = {"a": "x" * 60, "b": "y" * 60, "c": "z" * 10}  # a and c fit, b does not
    for name, output in outputs.items():
        step = state.steps[name]
        state.apply(state.step_event(StepSucceeded, step, "result", output=output))
    (ended,), _ = state.next_actions()
    assert isinstance(ended, RunCompleted)
    assert ended.outputs == {"a": outputs["a"], "c": outputs["c"]}
    assert ended.omitted_outputs == ["b"]


@pytest.mark.parametrize(("extra", "code"), [(0, None), (1, FailureCode.OUTPUT_TOO_LARGE)])
def test_an_output_at_the_limit_succeeds_and_one_byte_more_fails(
    extra: int, code: FailureCode | None
) -> None:
    executor = service(AOS_MAX_STEP_OUTPUT_BYTES="1024")
    state, _ = planned(PlanStep(id="call", skill="json_transform", params={}))
    output = "x" * (1024 - 2 + extra)  # a JSON string: two quotes around it
    assert runs.json_size(output) == 1024 + extra
    event = executor._outcome(
        state,
        state.steps["call"],
        SkillResult(output, cost_cents=2),
        None,
        None,
        duration_ms=1.0,
        is_stub=False,
    )
    valid([event])
    if code is None:
        assert isinstance(event, StepSucceeded) and event.output == output
    else:
        assert isinstance(event, StepFailed)
        assert event.error.code is code and not event.will_retry
        assert event.cost_cents == 2  # the call was made: its cost is still charged


def test_a_huge_failure_message_is_cut() -> None:
    executor = service()
    state, _ = planned(http_step("GET"))
    event = executor._outcome(
        state,
        state.steps["call"],
        None,
        Failure.of(FailureCode.HTTP_4XX, "x" * 2_000_000),
        None,
        duration_ms=1.0,
        is_stub=False,
    )
    assert isinstance(event, StepFailed) and len(event.error.message) < 5000


# --- the Idempotency-Key across attempts --------------------------------------------------


def test_a_retry_after_an_unknown_outcome_carries_that_attempts_key() -> None:
    """A call that may have had its effect (a timeout, a lost response) is retried with the
    key it was sent with, so a server deduplicating by Idempotency-Key sees one request;
    after a known outcome (the server answered), the next attempt gets a key of its own."""
    state, _ = planned(http_step("POST", idempotent=True))
    step = state.steps["call"]

    def fail(attempt: int, failure: Failure) -> None:
        step.status = StepStatus.PENDING  # its backoff is over (the executor's timer)
        state.apply(reserved_for(state, "call"))
        state.apply(state.step_event(StepFailed, step, "result", error=failure, will_retry=True))
        assert step.attempt == attempt + 1

    def key() -> str:
        context = SkillContext(
            run_id=state.run_id,
            tenant="acme",
            step_id="call",
            skill="http_call",
            attempt=step.attempt,
            key_attempt=step.key_attempt,
        )
        return context.idempotency_key

    first = key()
    fail(1, Failure.of(FailureCode.SKILL_TIMEOUT, "read timeout").unknown_outcome())
    assert key() == first and step.key_attempt == 1
    fail(2, Failure.of(FailureCode.SKILL_TIMEOUT, "again").unknown_outcome())
    assert key() == first  # still the first call's: it may be the one that went through
    assert run_to_dict(run_from_dict(run_to_dict(state))) == run_to_dict(state)
    fail(3, Failure.of(FailureCode.HTTP_5XX, "the server answered 500"))
    assert key() != first and step.key_attempt is None
