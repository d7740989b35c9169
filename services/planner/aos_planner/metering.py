"""Planning calls budgeted on the ledger, like any step: reserve, call, commit.

Before each model call the planner publishes `planning.reservation_requested` for the
call's worst case (input estimate plus `max_tokens` at the model's price) and waits for
the ledger's `budget.reserved` or `budget.denied`. A denied call is never made: the goal
is rejected with the ledger's reason. After the call it publishes
`planning.call_finished` with the cost from reported usage and waits for the ledger's
`budget.committed`, so that the run's first step is decided against the actual planning
cost, not against the worst case still held.

Ids derive from the goal and the call's number. A goal planned again (redelivered after
a failed call, a crash, a timeout) first reads the run's planning events: its calls are
numbered after those already made, so every call has its own reservation and is charged
once; what earlier calls cost counts toward the planning cost; and a call that was
reserved but never reported (the planner died during it) is closed at its reserved worst
case, since it may have been made and billed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence

from aos_contracts.events import (
    AnyEvent,
    BudgetCommitted,
    BudgetDenied,
    BudgetReserved,
    EventEnvelope,
    GoalSubmitted,
    PlanningCallFinished,
    PlanningReservationRequested,
    StepTelemetry,
    derive_event_id,
)
from aos_contracts.failures import FailureCode
from aos_planner.backend import CallOutcome, PlanningFailed
from aos_plumbing.bus import EventBus, RunWatch


class LedgerUnavailable(Exception):
    """The ledger did not answer in time: the goal is retried later, not rejected."""


class LedgerMeter:
    def __init__(
        self,
        bus: EventBus,
        goal: GoalSubmitted,
        *,
        backend: str,
        timeout_s: float,
        publish_first: Sequence[EventEnvelope] = (),
    ) -> None:
        self.bus = bus
        self.goal = goal
        self.backend = backend
        self.timeout_s = timeout_s
        # Published with the first reservation request (run.accepted), so that a run
        # whose planning costs nothing publishes it together with its plan instead.
        self._publish_first = list(publish_first)
        self._watch: RunWatch | None = None
        self._calls = 0
        self._spent = 0
        self._reservation: uuid.UUID | None = None
        self._resumed = False

    @property
    def spent_cents(self) -> int:
        return self._spent

    @property
    def published_first(self) -> bool:
        return not self._publish_first

    def reservation_id(self, call: int) -> uuid.UUID:
        return derive_event_id(self.goal.event_id, f"planning/{call}/reservation")

    async def before_call(self, worst_case_cents: int, model: str | None) -> None:
        if not self._resumed:
            await self._resume()
        self._calls += 1
        call = self._calls
        reservation = self.reservation_id(call)
        request = self.goal.caused(
            PlanningReservationRequested,
            f"planning/{call}/requested",
            reservation_id=reservation,
            attempt=call,
            amount_cents=worst_case_cents,
            backend=self.backend,
            model=model,
        )
        watch = await self._watching()
        await self.bus.publish_all([*self._publish_first, request])
        self._publish_first = []
        decision = await self._await(
            watch, _decision_on(reservation), f"the ledger's decision on planning call {call}"
        )
        if isinstance(decision, BudgetDenied):
            raise PlanningFailed(
                [f"the budget refused the planning call: {decision.error.message}"],
                FailureCode.BUDGET_EXCEEDED,
            )
        self._reservation = reservation

    async def after_call(
        self,
        cost_cents: int,
        *,
        outcome: CallOutcome,
        duration_ms: float,
        telemetry: StepTelemetry | None = None,
    ) -> None:
        reservation, call = self._reservation, self._calls
        if reservation is None:
            raise RuntimeError("after_call without a reserved call")
        self._reservation = None
        await self._finish(call, reservation, cost_cents, outcome, duration_ms, telemetry)

    async def _finish(
        self,
        call: int,
        reservation: uuid.UUID,
        cost_cents: int,
        outcome: CallOutcome,
        duration_ms: float,
        telemetry: StepTelemetry | None,
    ) -> None:
        self._spent += cost_cents
        finished = self.goal.caused(
            PlanningCallFinished,
            f"planning/{call}/finished",
            reservation_id=reservation,
            attempt=call,
            cost_cents=cost_cents,
            duration_ms=duration_ms,
            outcome=outcome,
            telemetry=telemetry,
        )
        watch = await self._watching()
        await self.bus.publish_all([finished])
        await self._await(
            watch,
            lambda event: (
                isinstance(event, BudgetCommitted) and event.reservation_id == reservation
            ),
            f"the ledger's commit of planning call {call}",
        )

    async def _resume(self) -> None:
        """Take up where an earlier attempt at this goal left off (see the module doc)."""
        self._resumed = True
        requested: dict[int, PlanningReservationRequested] = {}
        finished: dict[int, PlanningCallFinished] = {}
        for event in await self.bus.run_events("plans", self.goal.tenant, self.goal.run_id):
            if isinstance(event, PlanningReservationRequested):
                requested.setdefault(event.attempt, event)
            elif isinstance(event, PlanningCallFinished):
                finished.setdefault(event.attempt, event)
        if not requested:
            return
        self._calls = max(requested)
        self._spent = sum(event.cost_cents for event in finished.values())
        unfinished = sorted(set(requested) - set(finished))
        if not unfinished:
            return
        watch = await self._watching()
        for call in unfinished:
            request = requested[call]
            decision = await self._await(
                watch,
                _decision_on(request.reservation_id),
                f"the ledger's decision on planning call {call}",
            )
            if isinstance(decision, BudgetReserved):
                # The call may have been made (and billed) before the planner died: it is
                # charged its worst case. A denied call was never made: nothing to close.
                await self._finish(
                    call, request.reservation_id, request.amount_cents, "error", 0.0, None
                )

    async def close(self) -> None:
        if self._watch is not None:
            await self._watch.close()
            self._watch = None

    async def _watching(self) -> RunWatch:
        # Opened before the first request is published; it reads the run's budget events
        # from the first, so an answer can never be missed, however fast it comes.
        if self._watch is None:
            self._watch = await self.bus.watch_run("budget", self.goal.tenant, self.goal.run_id)
        return self._watch

    async def _await(
        self, watch: RunWatch, wanted: Callable[[AnyEvent], bool], what: str
    ) -> AnyEvent:
        try:
            return await watch.wait_for(wanted, self.timeout_s)
        except TimeoutError as exc:
            raise LedgerUnavailable(
                f"no answer from the ledger in {self.timeout_s} s: {what}"
            ) from exc


def _decision_on(reservation: uuid.UUID) -> Callable[[AnyEvent], bool]:
    def wanted(event: AnyEvent) -> bool:
        return isinstance(event, BudgetReserved | BudgetDenied) and (
            event.reservation_id == reservation
        )

    return wanted
