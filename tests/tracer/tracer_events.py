"""Realistic event sequences of runs, built from the contracts' models, for tracer tests."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from nats.js import JetStreamContext

from aos_contracts import (
    BudgetCommitted,
    BudgetOpened,
    BudgetReservationRequested,
    BudgetReserved,
    EventEnvelope,
    Failure,
    FailureCode,
    GoalSubmitted,
    Plan,
    PlanCreated,
    PlanStep,
    RunAccepted,
    RunCancelled,
    RunCompleted,
    RunFailed,
    StepFailed,
    StepStarted,
    StepSucceeded,
    encode_event,
    event_headers,
)
from aos_contracts.events import AnyEvent
from aos_contracts.subjects import CONTEXT_OF_TYPE, stream_name, subject_for_type
from aos_tracer.rows import TracedEvent

START = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


class RunStory:
    """The events of one run, in the order the services would publish them, each 10 ms
    (or `ms`) after the previous one."""

    def __init__(
        self,
        tenant: str = "acme",
        goal: str = "fetch the page and summarise it",
        *,
        budget_cents: int = 100,
        start: datetime = START,
    ) -> None:
        self.at = start
        self.goal = GoalSubmitted(
            run_id=uuid.uuid4(),
            tenant=tenant,
            goal=goal,
            budget_cents=budget_cents,
            occurred_at=start,
        )
        self.events: list[EventEnvelope] = [self.goal]
        self.planned: dict[str, str] = {}

    @property
    def run_id(self) -> uuid.UUID:
        return self.goal.run_id

    def add(self, cls: type[EventEnvelope], ms: float = 10, **payload: Any) -> EventEnvelope:
        self.at += timedelta(milliseconds=ms)
        purpose = f"{cls.__name__}/{len(self.events)}"
        event = self.goal.caused(cls, purpose, occurred_at=self.at, **payload)
        self.events.append(event)
        return event

    def plan(self, *steps: tuple[str, str]) -> RunStory:
        self.add(
            RunAccepted,
            goal=self.goal.goal,
            budget_cents=self.goal.budget_cents,
            planner_backend="stub",
        )
        self.add(BudgetOpened, cap_cents=self.goal.budget_cents)
        plan = Plan(steps=[PlanStep(id=step_id, skill=skill) for step_id, skill in steps])
        self.add(PlanCreated, plan=plan, estimated_cents=10, budget_cents=self.goal.budget_cents)
        self.planned = dict(steps)
        return self

    def attempt(
        self,
        step_id: str,
        *,
        cents: int = 3,
        ms: float = 40,
        attempt: int = 1,
        fail: FailureCode | None = None,
        will_retry: bool = False,
        output: Any = None,
    ) -> RunStory:
        skill = self.planned[step_id]
        reservation = uuid.uuid4()
        common: dict[str, Any] = {
            "step_id": step_id,
            "attempt": attempt,
            "reservation_id": reservation,
        }
        self.add(BudgetReservationRequested, amount_cents=5, **common)
        self.add(BudgetReserved, amount_cents=5, remaining_cents=90, **common)
        self.add(StepStarted, skill=skill, **common)
        if fail is None:
            self.add(
                StepSucceeded,
                ms=ms,
                skill=skill,
                output=output,
                cost_cents=cents,
                duration_ms=ms,
                **common,
            )
        else:
            self.add(
                StepFailed,
                ms=ms,
                skill=skill,
                error=Failure.of(fail, f"{fail} in {step_id}"),
                will_retry=will_retry,
                cost_cents=cents,
                duration_ms=ms,
                **common,
            )
        self.add(
            BudgetCommitted,
            reservation_id=reservation,
            step_id=step_id,
            reserved_cents=5,
            committed_cents=cents,
            released_cents=5 - cents,
        )
        return self

    def completed(self, cost_cents: int) -> RunStory:
        self.add(RunCompleted, cost_cents=cost_cents)
        return self

    def failed(self, code: FailureCode, step_id: str, cost_cents: int) -> RunStory:
        self.add(
            RunFailed,
            error=Failure.of(code, "gave up"),
            failed_step_id=step_id,
            cost_cents=cost_cents,
        )
        return self

    def cancelled(self, cost_cents: int = 0) -> RunStory:
        self.add(RunCancelled, reason="cancelled by user", cost_cents=cost_cents)
        return self


def happy_run(tenant: str = "acme", *, start: datetime = START) -> RunStory:
    """fetch (3c) then summarise (4c, 120 tokens): completed, 7 cents."""
    story = RunStory(tenant, start=start).plan(("fetch", "http_call"), ("summarise", "llm_invoke"))
    usage = {"usage": {"input_tokens": 100, "output_tokens": 20}}
    story.attempt("fetch", cents=3).attempt("summarise", cents=4, output=usage)
    return story.completed(7)


def retried_then_failed_run(tenant: str = "acme", *, start: datetime = START) -> RunStory:
    """fetch fails with HTTP_5XX (retried, 1c each attempt) twice then gives up: failed, 2c."""
    story = RunStory(tenant, "fetch a flaky page", start=start).plan(("fetch", "http_call"))
    story.attempt("fetch", cents=1, fail=FailureCode.HTTP_5XX, will_retry=True)
    story.attempt("fetch", cents=1, attempt=2, fail=FailureCode.HTTP_5XX, will_retry=False)
    return story.failed(FailureCode.HTTP_5XX, "fetch", cost_cents=2)


def in_log(events: Iterable[EventEnvelope], namespace: str = "aos") -> list[TracedEvent]:
    """The events as the log would hold them: each stream numbering its own from 1."""
    seqs: dict[str, int] = defaultdict(int)
    traced = []
    for event in events:
        stream = stream_of(event, namespace)
        seqs[stream] += 1
        subject = subject_for_type(event.type, event.tenant, event.run_id, namespace)
        traced.append(TracedEvent(stream, seqs[stream], subject, cast(AnyEvent, event)))
    return traced


def stream_of(event: EventEnvelope, namespace: str = "aos") -> str:
    return stream_name(CONTEXT_OF_TYPE[event.type], namespace)


async def publish(js: JetStreamContext, namespace: str, events: list[EventEnvelope]) -> None:
    """Publish one by one, each acked before the next: the log holds them in this order."""
    for event in events:
        subject = subject_for_type(event.type, event.tenant, event.run_id, namespace)
        await js.publish(subject, encode_event(event), headers=event_headers(event))
