"""A run as text a person reads top to bottom: header, steps, then every event."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from aos_tracer.rows import EventRow, RunRow, StepRow


def _offset_ms(at: datetime | None, start: datetime) -> str:
    if at is None:
        return "-"
    return f"+{(at - start).total_seconds() * 1000:.0f}ms"


def render_timeline(run: RunRow, steps: Sequence[StepRow], events: Sequence[EventRow]) -> str:
    start = run.created_at
    end = run.ended_at or run.updated_at
    wall_ms = (end - start).total_seconds() * 1000
    budget = f" of {run.budget_cents}" if run.budget_cents is not None else ""
    lines = [
        f"run      {run.run_id}",
        f"tenant   {run.tenant}",
        f"goal     {run.goal or '-'}",
        f"status   {run.status}",
        f"cost     {run.cost_cents} cents{budget}",
        f"wall     {wall_ms:.0f} ms{'' if run.ended_at else ' (so far)'}",
        f"started  {start.isoformat()}",
        "",
        f"steps ({len(steps)})",
    ]
    header = ("offset", "step", "skill", "status", "ms", "cents", "tries", "error")
    rows = [
        (
            _offset_ms(step.started_at, start),
            step.step_id,
            step.skill or "-",
            step.status,
            f"{step.duration_ms:.0f}",
            str(step.cost_cents),
            str(step.attempts),
            step.error_code or "",
        )
        for step in steps
    ]
    lines.extend(_table(header, rows))
    lines += ["", f"events ({len(events)})"]
    event_rows = [
        (
            _offset_ms(event.occurred_at, start),
            event.type,
            event.stream,
            str(event.stream_seq),
            _detail(event.payload),
        )
        for event in events
    ]
    lines.extend(_table(("offset", "type", "stream", "seq", "detail"), event_rows))
    return "\n".join(lines) + "\n"


def _detail(payload: dict[str, Any]) -> str:
    """What a reader looks for in an event: its step and attempt, its error code."""
    parts = []
    if "step_id" in payload:
        parts.append(str(payload["step_id"]))
    if "attempt" in payload:
        parts.append(f"attempt {payload['attempt']}")
    error = payload.get("error")
    if isinstance(error, dict) and "code" in error:
        parts.append(str(error["code"]))
    return " ".join(parts)


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return [
        "  "
        + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]
