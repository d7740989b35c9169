"""Checkpoints: a fold of a log prefix, saved and loaded, continues exactly like the fold
of the whole log."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from aos_contracts import (
    BudgetReserved,
    FailureCode,
    GoalSubmitted,
    Plan,
    PlanCreated,
    PlanRejected,
    PlanStep,
    RunCancelRequested,
    StepStarted,
    StepSucceeded,
    encode_event,
)
from aos_contracts.events import EventEnvelope
from aos_contracts.subjects import run_subject
from aos_executor.checkpoints import (
    Book,
    Checkpoint,
    PostgresCheckpointStore,
    ReadLog,
    fold_log,
    run_from_dict,
    run_to_dict,
)
from aos_executor.runs import RunState, reservation_id


def run_history(steps: int = 3) -> list[tuple[str, EventEnvelope]]:
    """(context, event) pairs of a run whose first steps succeeded."""
    goal = GoalSubmitted(run_id=uuid.uuid4(), tenant="acme", goal="g", budget_cents=10)
    plan = Plan(
        steps=[
            PlanStep(
                id=f"s{i}",
                skill="json_transform",
                params={"op": "merge", "inputs": [{"i": i}]},
                depends_on=[f"s{i - 1}"] if i > 1 else [],
            )
            for i in range(1, steps + 1)
        ]
    )
    created = goal.caused(PlanCreated, "p", plan=plan, estimated_cents=0, budget_cents=10)
    history: list[tuple[str, EventEnvelope]] = [("plans", created)]
    state = RunState(goal.run_id, "acme")
    state.apply(created)
    for step_id in ("s1", "s2"):
        requests, _ = state.next_actions()
        for request in requests:
            state.apply(request)  # type: ignore[arg-type]
            history.append(("runs", request))
        reserved = BudgetReserved(
            run_id=goal.run_id,
            tenant="acme",
            reservation_id=reservation_id(goal.run_id, step_id, 1),
            step_id=step_id,
            attempt=1,
            amount_cents=0,
            remaining_cents=10,
        )
        state.apply(reserved)
        history.append(("budget", reserved))
        step = state.steps[step_id]
        for event in (
            state.step_event(StepStarted, step, "started"),
            state.step_event(StepSucceeded, step, "result", output={"from": step_id}),
        ):
            state.apply(event)
            history.append(("runs", event))
    return history


def reader(history: list[tuple[str, EventEnvelope]]) -> ReadLog:
    """The log of `history`, each event on its run's subject in the given context."""
    by_context: dict[str, list[tuple[int, str, bytes]]] = {}
    for context, event in history:
        log = by_context.setdefault(context, [])
        subject = run_subject(context, event.tenant, event.run_id)
        log.append((len(log) + 1, subject, encode_event(event)))

    async def read(context: str, start: int) -> AsyncIterator[tuple[int, str, bytes]]:
        for seq, subject, data in by_context.get(context, []):
            if seq >= start:
                yield seq, subject, data

    return read


def snapshot(checkpoint: Checkpoint) -> dict[str, object]:
    return {str(k): run_to_dict(v) for k, v in checkpoint.book.runs.items()}


async def test_run_state_round_trips_through_json() -> None:
    history = run_history()
    checkpoint = Checkpoint()
    await fold_log(checkpoint, reader(history))
    (state,) = checkpoint.book.runs.values()
    assert run_to_dict(run_from_dict(run_to_dict(state))) == run_to_dict(state)
    rejected = RunState(uuid.uuid4(), "acme")
    goal = GoalSubmitted(run_id=rejected.run_id, tenant="acme", goal="g", budget_cents=0)
    rejected.apply(goal.caused(PlanRejected, "r", reasons=["no"], code=FailureCode.PLAN_INVALID))
    assert run_to_dict(run_from_dict(run_to_dict(rejected))) == run_to_dict(rejected)


async def test_a_checkpoint_of_a_prefix_plus_the_suffix_equals_the_whole_log(
    database: str,
) -> None:
    history = run_history()
    whole = Checkpoint()
    await fold_log(whole, reader(history))

    store = await PostgresCheckpointStore.connect(database)
    try:
        first = Checkpoint()
        await fold_log(first, reader(history[:4]))
        await store.save(first)
        loaded = await store.load()
        assert snapshot(loaded) == snapshot(first)
        assert loaded.seqs == first.seqs
        await fold_log(loaded, reader(history))
        assert snapshot(loaded) == snapshot(whole)
        assert loaded.seqs == whole.seqs
        # A finished run leaves the checkpoint's runs and joins its finished ids.
        (state,) = loaded.book.runs.values()
        loaded.book.finish(state.run_id)
        await store.save(loaded)
        again = await store.load()
        assert again.book.runs == {}
        assert state.run_id in again.book.finished
    finally:
        await store.close()


def test_a_run_belongs_to_the_tenant_of_its_plan() -> None:
    history = run_history()
    created = history[0][1]
    assert isinstance(created, PlanCreated)
    book = Book()
    # Another tenant names this run id before the plan arrives: void once the plan does.
    book.fold(RunCancelRequested(run_id=created.run_id, tenant="mallory", reason="x"))
    state = book.fold(created)
    assert state is not None and state.tenant == "acme" and state.cancel_reason is None
    # And after the plan, another tenant's cancel is ignored; the run's own is not.
    assert book.fold(RunCancelRequested(run_id=created.run_id, tenant="mallory")) is None
    own = book.fold(RunCancelRequested(run_id=created.run_id, tenant="acme", reason="mine"))
    assert own is not None and own.cancel_reason == "mine"


async def test_a_rebuild_skips_events_that_arrived_where_they_may_not_count() -> None:
    """A plan forged onto the goals stream, or onto another tenant's subject, is parked
    by the live consumers; the rebuild must not fold it either."""
    history = run_history()
    created = history[0][1]
    assert isinstance(created, PlanCreated)
    forged_run = uuid.uuid4()
    forged = created.model_copy(update={"run_id": forged_run, "event_id": uuid.uuid4()})
    read = reader(history)

    async def with_forgeries(context: str, start: int) -> AsyncIterator[tuple[int, str, bytes]]:
        async for item in read(context, start):
            yield item
        if context == "goals":  # a tenant may publish here, but not plans
            yield 1, run_subject("goals", "acme", forged_run), encode_event(forged)
        if context == "plans":  # the right stream, another tenant's subject
            yield 99, run_subject("plans", "globex", forged_run), encode_event(forged)

    checkpoint = Checkpoint()
    await fold_log(checkpoint, with_forgeries)
    assert forged_run not in checkpoint.book.runs
    assert set(checkpoint.book.runs) == {created.run_id}
