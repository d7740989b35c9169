"""Golden canonicalisation and the HTML timeline, as pure functions."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from aos_tracer.golden import canonical_events, render_golden
from aos_tracer.rows import EventRow, RunRow, StepRow
from aos_tracer.timeline_html import render_timeline_html

T0 = datetime(2025, 6, 1, tzinfo=UTC)


def run_events(seq_offset: int, *, output: str = "done") -> list[EventRow]:
    """A one-step run as the tracer stores it; ids, times and sequences vary per call."""
    run, goal, req, rid, reserved, started, ok = (str(uuid.uuid4()) for _ in range(7))
    at = T0 + timedelta(seconds=random.random())

    def row(stream: str, seq: int, payload: dict[str, Any]) -> EventRow:
        body = {"run_id": run, "occurred_at": at.isoformat(), **payload}
        return EventRow(f"T{seq_offset}_{stream}", seq + seq_offset, body["type"], at, body)

    return [
        row("GOALS", 1, {"type": "goal.submitted", "event_id": goal}),
        row(
            "RUNS",
            1,
            {
                "type": "budget.reservation_requested",
                "event_id": req,
                "causation_id": goal,
                "reservation_id": rid,
                "step_id": "a",
            },
        ),
        row(
            "RUNS",
            2,
            {
                "type": "step.started",
                "event_id": started,
                "causation_id": rid,
                "reservation_id": rid,
                "step_id": "a",
            },
        ),
        row(
            "RUNS",
            3,
            {
                "type": "step.succeeded",
                "event_id": ok,
                "causation_id": rid,
                "reservation_id": rid,
                "step_id": "a",
                "output": output,
                "duration_ms": random.random() * 100,
            },
        ),
        row(
            "BUDGET",
            1,
            {
                "type": "budget.reserved",
                "event_id": reserved,
                "causation_id": req,
                "reservation_id": rid,
                "tenant_period": "month:2025-06",
            },
        ),
    ]


def test_two_runs_of_the_same_work_give_the_same_golden_text() -> None:
    first, second = run_events(0), run_events(1000)
    random.shuffle(second)  # the store's order across streams does not matter

    assert render_golden(first) == render_golden(second)
    assert render_golden(first) != render_golden(run_events(0, output="other"))


def test_ids_become_placeholders_that_keep_the_references() -> None:
    events = canonical_events(run_events(0))

    types = [item["event"]["type"] for item in events]
    # The step waits for its budget decision, which waits for its request.
    assert types == [
        "goal.submitted",
        "budget.reservation_requested",
        "budget.reserved",
        "step.started",
        "step.succeeded",
    ]
    request, reserved, started = (events[i]["event"] for i in (1, 2, 3))
    assert reserved["causation_id"] == request["event_id"]
    assert started["reservation_id"] == request["reservation_id"] == reserved["reservation_id"]
    assert request["run_id"] == "<id:1>" and request["occurred_at"] == "<time>"
    assert events[4]["event"]["duration_ms"] == "<duration>"
    assert reserved["tenant_period"] == "<period>"
    assert events[0]["stream"] == "goals"


def test_the_html_timeline_draws_a_bar_per_started_step_and_escapes_text() -> None:
    run = RunRow(
        uuid.uuid4(),
        "acme",
        "<script>x</script>",
        "completed",
        50,
        7,
        T0,
        T0,
        T0 + timedelta(seconds=1),
    )
    steps = [
        StepRow(
            run.run_id,
            "a",
            "json_transform",
            "succeeded",
            1,
            T0,
            T0 + timedelta(milliseconds=400),
            400.0,
            0,
        ),
        StepRow(
            run.run_id,
            "b",
            "llm_invoke",
            "succeeded",
            2,
            T0 + timedelta(milliseconds=400),
            T0 + timedelta(seconds=1),
            600.0,
            7,
        ),
        StepRow(run.run_id, "c", None, "denied", 0),
    ]

    page = render_timeline_html(run, steps, [])

    assert page.count('class="bar"') == 2
    assert "left:0.00%;width:40.00%" in page and "left:40.00%;width:60.00%" in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert '<td class="num">7</td>' in page
