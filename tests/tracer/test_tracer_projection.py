"""The runs and steps projections, through the in-memory store."""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import timedelta

from aos_contracts import (
    BudgetDenied,
    Failure,
    FailureCode,
    PlanRejected,
    RunCancelled,
    RunFailed,
    StepSucceeded,
)
from aos_tracer.rows import RunRow, TracedEvent
from aos_tracer.store import InMemoryTraceStore
from aos_tracer.timeline import render_timeline
from tests.tracer.tracer_events import (
    START,
    RunStory,
    happy_run,
    in_log,
    retried_then_failed_run,
)


async def apply_one_by_one(store: InMemoryTraceStore, traced: list[TracedEvent]) -> None:
    for item in traced:
        await store.apply(item.stream, [item])


async def test_a_completed_run_has_its_status_cost_and_steps() -> None:
    story = happy_run()
    store = InMemoryTraceStore()
    await apply_one_by_one(store, in_log(story.events))

    run = await store.get_run(story.run_id)
    assert run is not None
    assert (run.status, run.tenant, run.goal) == ("completed", "acme", story.goal.goal)
    assert (run.budget_cents, run.cost_cents) == (100, 7)
    assert run.created_at == START
    assert run.ended_at == story.events[-1].occurred_at

    steps = {step.step_id: step for step in await store.run_steps(story.run_id)}
    assert [step.step_id for step in await store.run_steps(story.run_id)] == ["fetch", "summarise"]
    fetch, summarise = steps["fetch"], steps["summarise"]
    assert (fetch.skill, fetch.status, fetch.attempts, fetch.cost_cents) == (
        "http_call",
        "succeeded",
        1,
        3,
    )
    assert fetch.duration_ms == 40
    assert fetch.tokens is None
    assert (summarise.status, summarise.cost_cents, summarise.tokens) == ("succeeded", 4, 120)
    assert fetch.started_at is not None and fetch.ended_at is not None
    assert fetch.ended_at - fetch.started_at == timedelta(milliseconds=40)

    events = await store.run_events(story.run_id)
    assert [event.type for event in events] == [e.type for e in story.events]
    assert events[0].payload["goal"] == story.goal.goal


async def test_a_retried_step_counts_every_attempt_and_keeps_the_last_error() -> None:
    story = retried_then_failed_run()
    store = InMemoryTraceStore()
    await apply_one_by_one(store, in_log(story.events))

    run = await store.get_run(story.run_id)
    assert run is not None and (run.status, run.cost_cents) == ("failed", 2)
    [fetch] = await store.run_steps(story.run_id)
    assert (fetch.status, fetch.attempts, fetch.error_code) == ("failed", 2, "HTTP_5XX")
    assert (fetch.cost_cents, fetch.duration_ms) == (2, 80)


async def test_a_terminal_status_is_never_overwritten_by_a_late_event() -> None:
    story = happy_run()
    ended_at = story.events[-1].occurred_at
    story.add(RunFailed, error=Failure.of(FailureCode.SKILL_ERROR, "late"), cost_cents=50)
    story.add(RunCancelled, reason="too late", cost_cents=60)
    story.add(
        StepSucceeded,
        step_id="fetch",
        skill="http_call",
        attempt=1,
        reservation_id=story.goal.event_id,
        cost_cents=9,
    )
    store = InMemoryTraceStore()
    await apply_one_by_one(store, in_log(story.events))

    run = await store.get_run(story.run_id)
    assert run is not None
    assert (run.status, run.cost_cents, run.ended_at) == ("completed", 7, ended_at)


async def test_the_projection_does_not_depend_on_how_the_streams_interleave() -> None:
    stories = [happy_run(), retried_then_failed_run("globex")]
    traced = in_log([event for story in stories for event in story.events])
    in_order = InMemoryTraceStore()
    await apply_one_by_one(in_order, traced)

    # One batch per stream, the executor's stream first and the users' last: the order
    # a tracer sees after a rebuild when one consumer runs ahead of the others.
    by_stream: dict[str, list[TracedEvent]] = defaultdict(list)
    for item in traced:
        by_stream[item.stream].append(item)
    reordered = InMemoryTraceStore()
    for stream in ("AOS_RUNS", "AOS_BUDGET", "AOS_PLANS", "AOS_GOALS"):
        await reordered.apply(stream, by_stream[stream])

    assert reordered.runs == in_order.runs
    assert reordered.steps == in_order.steps


async def test_applying_a_batch_again_changes_nothing() -> None:
    traced = in_log(happy_run().events)
    store = InMemoryTraceStore()
    runs_stream = [item for item in traced if item.stream == "AOS_RUNS"]
    assert await store.apply("AOS_RUNS", runs_stream) == len(runs_stream)
    snapshot = (dict(store.events), {k: str(v) for k, v in store.runs.items()})

    assert await store.apply("AOS_RUNS", runs_stream) == 0  # a redelivery after a crash
    assert await store.last_seq("AOS_RUNS") == runs_stream[-1].stream_seq
    # The same event published again past the duplicate window: a new sequence, same id.
    republished = TracedEvent("AOS_RUNS", 1000, runs_stream[0].subject, runs_stream[0].event)
    assert await store.apply("AOS_RUNS", [republished]) == 0
    assert await store.last_seq("AOS_RUNS") == 1000
    assert (dict(store.events), {k: str(v) for k, v in store.runs.items()}) == snapshot


async def test_planned_steps_are_pending_until_started_and_a_denial_shows() -> None:
    story = RunStory().plan(("fetch", "http_call"), ("summarise", "llm_invoke"))
    story.add(
        BudgetDenied,
        reservation_id=story.goal.event_id,
        step_id="fetch",
        attempt=1,
        amount_cents=500,
        remaining_cents=100,
        error=Failure.of(FailureCode.BUDGET_EXCEEDED, "over the cap"),
    )
    store = InMemoryTraceStore()
    await apply_one_by_one(store, in_log(story.events))

    steps = {step.step_id: step for step in await store.run_steps(story.run_id)}
    assert (steps["fetch"].status, steps["fetch"].error_code) == ("denied", "BUDGET_EXCEEDED")
    assert (steps["summarise"].status, steps["summarise"].skill) == ("pending", "llm_invoke")
    run = await store.get_run(story.run_id)
    assert run is not None and run.status == "running"


async def test_a_rejected_plan_fails_the_run() -> None:
    story = RunStory()
    story.add(PlanRejected, reasons=["no skill can do that"])
    store = InMemoryTraceStore()
    await apply_one_by_one(store, in_log(story.events))
    run = await store.get_run(story.run_id)
    assert run is not None and run.status == "failed" and run.ended_at is not None


async def test_runs_are_listed_newest_first_and_filtered() -> None:
    older = happy_run("acme")
    newer = retried_then_failed_run("acme", start=START + timedelta(minutes=1))
    other = happy_run("globex", start=START + timedelta(minutes=2))
    store = InMemoryTraceStore()
    await apply_one_by_one(store, in_log([*older.events, *newer.events, *other.events]))

    def ids(runs: list[RunRow]) -> list[uuid.UUID]:
        return [run.run_id for run in runs]

    assert ids(await store.list_runs(tenant=None, status=None, limit=10)) == [
        other.run_id,
        newer.run_id,
        older.run_id,
    ]
    assert ids(await store.list_runs(tenant="acme", status=None, limit=10)) == [
        newer.run_id,
        older.run_id,
    ]
    assert ids(await store.list_runs(tenant="acme", status="completed", limit=10)) == [older.run_id]
    assert ids(await store.list_runs(tenant=None, status=None, limit=1)) == [other.run_id]


async def test_the_timeline_reads_as_header_steps_and_events() -> None:
    story = retried_then_failed_run()
    store = InMemoryTraceStore()
    await apply_one_by_one(store, in_log(story.events))
    run = await store.get_run(story.run_id)
    assert run is not None
    text = render_timeline(
        run, await store.run_steps(story.run_id), await store.run_events(story.run_id)
    )

    lines = text.splitlines()
    assert lines[0] == f"run      {story.run_id}"
    assert "status   failed" in lines
    assert "cost     2 cents of 100" in lines
    wall_ms = (story.events[-1].occurred_at - START).total_seconds() * 1000
    assert f"wall     {wall_ms:.0f} ms" in lines
    [fetch_line] = [line for line in lines if line.startswith("  +") and " fetch " in line[:20]]
    assert fetch_line.split() == [
        "+60ms",
        "fetch",
        "http_call",
        "failed",
        "80",
        "2",
        "2",
        "HTTP_5XX",
    ]
    assert any(line.split()[:2] == ["+0ms", "goal.submitted"] for line in lines)
    assert "+180ms step.failed AOS_RUNS 6 fetch attempt 2 HTTP_5XX" in [
        " ".join(line.split()) for line in lines
    ]
    assert sum(1 for line in lines if line.strip().startswith("+")) == 1 + len(story.events)


async def test_any_order_of_events_gives_the_same_projection() -> None:
    # A redelivered batch comes after later batches of its own stream, so even one
    # stream's events may be applied out of log order: here, all of them backwards.
    stories = [happy_run(), retried_then_failed_run("globex")]
    traced = in_log([event for story in stories for event in story.events])
    in_order = InMemoryTraceStore()
    await apply_one_by_one(in_order, traced)
    backwards = InMemoryTraceStore()
    await apply_one_by_one(backwards, traced[::-1])

    assert backwards.runs == in_order.runs
    assert backwards.steps == in_order.steps


async def test_a_batch_redelivered_after_later_batches_is_still_applied() -> None:
    # The tracer died holding seqs 1-5 unacked; after its restart it applied 6-10 before
    # the ack wait ran out and 1-5 came back.
    runs_stream = [item for item in in_log(happy_run().events) if item.stream == "AOS_RUNS"]
    store = InMemoryTraceStore()
    await store.apply("AOS_RUNS", runs_stream[5:])
    assert await store.apply("AOS_RUNS", runs_stream[:5]) == 5
    assert await store.last_seq("AOS_RUNS") == runs_stream[-1].stream_seq
    assert len(store.events) == len(runs_stream)
