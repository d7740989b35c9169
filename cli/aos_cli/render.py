"""How the CLI shows runs and their outcome to a person."""

from __future__ import annotations

import json
from typing import Any

from aos_contracts.events import AnyEvent, RunCompleted, RunFailed


def describe_terminal(event: AnyEvent) -> str:
    if isinstance(event, RunCompleted):
        outputs = json.dumps(event.outputs, indent=2, ensure_ascii=False)
        return f"run {event.run_id} completed, cost {event.cost_cents} cents\noutputs: {outputs}"
    if isinstance(event, RunFailed):
        step = f" at step {event.failed_step_id}" if event.failed_step_id else ""
        return (
            f"run {event.run_id} failed{step}: {event.error.code}: {event.error.message} "
            f"(cost {event.cost_cents} cents)"
        )
    return f"run {event.run_id} {event.type.removeprefix('run.')}: {getattr(event, 'reason', '')}"


def runs_table(runs: list[dict[str, Any]]) -> str:
    header = ("RUN", "TENANT", "STATUS", "CENTS", "CREATED", "GOAL")
    return _table(
        header,
        [
            (
                str(run.get("run_id", "")),
                str(run.get("tenant", "")),
                str(run.get("status", "")),
                f"{run.get('cost_cents', 0)}/{run.get('budget_cents', 0)}",
                str(run.get("created_at", ""))[:19],
                _shorten(str(run.get("goal", "")), 40),
            )
            for run in runs
        ],
    )


def parked_table(parked: list[dict[str, Any]]) -> str:
    header = ("ID", "STATUS", "SERVICE", "PARKED", "SUBJECT", "REASON")
    return _table(
        header,
        [
            (
                str(row.get("id")),
                str(row.get("status", "")),
                str(row.get("service", "")),
                str(row.get("parked_at", ""))[:19],
                str(row.get("subject", "")),
                _shorten(str(row.get("reason", "")), 60),
            )
            for row in parked
        ],
    )


def describe_parked(parked: dict[str, Any]) -> str:
    size = parked.get("original_size")
    data = str(parked.get("data") or "")
    kept = (
        f"the first {len(data.encode())} of {size} bytes (the original is in its stream)"
        if parked.get("truncated")
        else f"{size if size is not None else len(data.encode())} bytes"
    )
    lines = [
        f"parked message {parked.get('id')} ({parked.get('status')})",
        f"  reason     {parked.get('reason')}",
        f"  parked by  {parked.get('service')} at {parked.get('parked_at')}, "
        f"after {parked.get('num_delivered')} deliveries",
        f"  original   {parked.get('stream')} seq {parked.get('stream_seq')} "
        f"on {parked.get('subject')}",
    ]
    if parked.get("replayed_at"):
        lines.append(f"  replayed   {parked.get('replayed_at')}")
    for name, value in sorted((parked.get("headers") or {}).items()):
        lines.append(f"  header     {name}: {value}")
    lines.append(f"  data       {kept}:")
    lines.append(data)
    return "\n".join(lines)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines: list[str] = []
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
