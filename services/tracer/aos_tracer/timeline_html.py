"""A run's timeline as one self-contained HTML page: steps as bars on a time axis.

No JavaScript and no external assets: inline CSS, so the page can be saved, mailed or
attached to a ticket and still reads the same. Every value from the run is escaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from html import escape

from aos_tracer.rows import EventRow, RunRow, StepRow

_STATUS_COLOURS = {
    "succeeded": "#2e7d32",
    "failed": "#c62828",
    "denied": "#ef6c00",
    "retrying": "#f9a825",
    "running": "#1565c0",
    "pending": "#9e9e9e",
}

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.3em; margin-bottom: .2em; }
dl { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; }
dt { color: #666; } dd { margin: 0; }
table { border-collapse: collapse; width: 100%; margin-top: 1em; }
th, td { text-align: left; padding: .3em .6em; border-bottom: 1px solid #eee; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.track { position: relative; height: 1.2em; background: #f5f5f5; min-width: 20em; }
.bar { position: absolute; top: 0; bottom: 0; min-width: 2px; border-radius: 2px; }
.axis { display: flex; justify-content: space-between; color: #888; font-size: .85em; }
code { font-size: .9em; }
"""


def render_timeline_html(run: RunRow, steps: Sequence[StepRow], events: Sequence[EventRow]) -> str:
    start = run.created_at
    end = run.ended_at or run.updated_at
    for step in steps:
        if step.ended_at is not None and step.ended_at > end:
            end = step.ended_at
    span_ms = max((end - start).total_seconds() * 1000, 1.0)
    budget = f" of {run.budget_cents}" if run.budget_cents is not None else ""
    rows = "\n".join(_step_row(step, start, span_ms) for step in steps)
    facts = [
        ("run", f"<code>{escape(str(run.run_id))}</code>"),
        ("tenant", escape(run.tenant)),
        ("goal", escape(run.goal or "-")),
        ("status", escape(run.status)),
        ("cost", f"{run.cost_cents} cents{budget}"),
        ("wall", f"{span_ms:.0f} ms{'' if run.ended_at else ' (so far)'}"),
        ("started", escape(start.isoformat())),
        ("events", str(len(events))),
    ]
    facts_html = "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in facts)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>AOS run {escape(str(run.run_id))}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>Run {escape(run.goal or str(run.run_id))}</h1>
<dl>{facts_html}</dl>
<table>
<thead><tr><th>step</th><th>skill</th><th>status</th><th>tries</th><th class="num">ms</th>
<th class="num">cents</th><th style="width:50%">time axis
<div class="axis"><span>0 ms</span><span>{span_ms / 2:.0f} ms</span>
<span>{span_ms:.0f} ms</span></div></th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
</body>
</html>
"""


def _step_row(step: StepRow, start: datetime, span_ms: float) -> str:
    colour = _STATUS_COLOURS.get(step.status, "#616161")
    bar = ""
    if step.started_at is not None:
        left_ms = (step.started_at - start).total_seconds() * 1000
        ended = step.ended_at or step.started_at
        width_ms = max((ended - step.started_at).total_seconds() * 1000, 0.0)
        left = min(max(left_ms / span_ms * 100, 0.0), 100.0)
        width = min(width_ms / span_ms * 100, 100.0 - left)
        title = (
            f"{step.step_id}: +{left_ms:.0f} ms, {step.duration_ms:.0f} ms, {step.cost_cents} cents"
        )
        bar = (
            f'<div class="bar" style="left:{left:.2f}%;width:{width:.2f}%;'
            f'background:{colour}" title="{escape(title)}"></div>'
        )
    error = f" ({escape(step.error_code)})" if step.error_code else ""
    return (
        f"<tr><td><code>{escape(step.step_id)}</code></td><td>{escape(step.skill or '-')}</td>"
        f'<td style="color:{colour}">{escape(step.status)}{error}</td>'
        f'<td class="num">{step.attempts}</td><td class="num">{step.duration_ms:.0f}</td>'
        f'<td class="num">{step.cost_cents}</td><td><div class="track">{bar}</div></td></tr>'
    )
