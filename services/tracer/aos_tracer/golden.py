"""Golden files: a run's canonical event sequence, with what varies between runs normalised.

Two runs of the same goal on the same backends produce the same golden text, byte for
byte; a changed decision, plan, parameter or output shows up as a readable line diff.

Canonical order. Each stream's own order is kept (the log orders one run's events in a
stream), and the streams are merged causally: the next event is the head of the first
stream (goals, plans, runs, budget) whose cause is already out. That gives a stable
interleaving however the services raced, e.g. a ledger commit versus the run's end.

Normalisation:
- every UUID (event, run, reservation ids, anywhere, also inside outputs) becomes `<id:N>`,
  numbered by first appearance, so the references between events stay visible: the same
  id is the same placeholder everywhere;
- timestamps (ISO 8601 strings) become `<time>`;
- durations and latencies (keys ending in `_ms`, `_s`, `duration`, `latency`) become
  `<duration>`, sequence numbers (`seq`, `*_seq`, `sequence`) become `<seq>`;
- what depends on other runs or the calendar (the tenant's budget period and what is
  left of the tenant's cap) becomes `<period>` / `<tenant-remaining>`;
- the trace context (random per submission) becomes `<trace>`.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aos_tracer.rows import EventRow

GOLDEN_FORMAT = "aos-golden/1"
STREAM_ORDER = ("goals", "plans", "runs", "budget")

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
_ISO_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:?\d{2})?$")
_DURATION_KEY = re.compile(r"(_ms|_s|duration|latency|elapsed)$")
_SEQ_KEY = re.compile(r"^(seq|sequence|.*_seq)$")
_FIXED: dict[str, str] = {
    "tenant_period": "<period>",
    "tenant_remaining_cents": "<tenant-remaining>",
    "trace": "<trace>",
}


def canonical_order(events: Sequence[EventRow]) -> list[EventRow]:
    """The run's events in a stable order: per-stream log order, streams merged causally."""
    by_stream: dict[int, list[EventRow]] = {}
    for event in sorted(events, key=lambda e: (_stream_rank(e.stream), e.stream_seq)):
        by_stream.setdefault(_stream_rank(event.stream), []).append(event)
    queues = [by_stream[rank] for rank in sorted(by_stream)]
    present = {key for event in events for key in _provides(event)}
    out: list[EventRow] = []
    emitted: set[str] = set()
    while any(queues):
        chosen = None
        for queue in queues:
            if queue and all(need in emitted or need not in present for need in _needs(queue[0])):
                chosen = queue
                break
        if chosen is None:  # a cause that never comes out: keep going, in stream order
            chosen = next(queue for queue in queues if queue)
        event = chosen.pop(0)
        emitted.update(_provides(event))
        out.append(event)
    return out


def _provides(event: EventRow) -> set[str]:
    keys = {f"event:{event.payload.get('event_id')}"}
    if event.type in ("budget.reserved", "budget.denied"):
        keys.add(f"decision:{event.payload.get('reservation_id')}")
    return keys


def _needs(event: EventRow) -> set[str]:
    """What must be out before `event`: its cause, and for a step, its budget decision."""
    needs = set()
    if event.payload.get("causation_id") is not None:
        needs.add(f"event:{event.payload['causation_id']}")
    if event.type.startswith("step.") and event.payload.get("reservation_id") is not None:
        needs.add(f"decision:{event.payload['reservation_id']}")
    return needs


class Normaliser:
    """Replaces volatile values; one instance per run, so that ids map consistently."""

    def __init__(self) -> None:
        self.ids: dict[str, str] = {}

    def id_of(self, match: re.Match[str]) -> str:
        key = match.group(0).lower()
        if key not in self.ids:
            self.ids[key] = f"<id:{len(self.ids) + 1}>"
        return self.ids[key]

    def value(self, value: Any, key: str = "") -> Any:
        if key in _FIXED and value is not None:
            return _FIXED[key]
        if isinstance(value, dict):
            return {k: self.value(v, str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(item) for item in value]
        if isinstance(value, bool) or value is None:
            return value
        if isinstance(value, int | float) and (_DURATION_KEY.search(key) or _SEQ_KEY.match(key)):
            return "<duration>" if _DURATION_KEY.search(key) else "<seq>"
        if isinstance(value, str):
            if _ISO_TIME.match(value):
                return "<time>"
            return _UUID.sub(self.id_of, value)
        return value


def canonical_events(events: Sequence[EventRow]) -> list[dict[str, Any]]:
    normaliser = Normaliser()
    canonical = []
    for event in canonical_order(events):
        payload = normaliser.value(event.payload)
        canonical.append({"stream": _stream_name(event.stream), "event": payload})
    return canonical


def render_golden(events: Sequence[EventRow]) -> str:
    """The golden-file text: canonical JSON, one value per line, stable key order."""
    document = {"format": GOLDEN_FORMAT, "events": canonical_events(events)}
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def golden_diff(expected: str, actual: str, expected_name: str, actual_name: str) -> str:
    """A unified diff from the golden text to the run's; empty when they are the same."""
    return "".join(
        difflib.unified_diff(
            expected.splitlines(keepends=True),
            actual.splitlines(keepends=True),
            fromfile=expected_name,
            tofile=actual_name,
        )
    )


class FileGoldenRecorder:
    """Writes runs' golden texts to files under `root`, and compares runs with them."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, name: str) -> Path:
        return self.root / (name if name.endswith(".json") else f"{name}.json")

    def record(self, name: str, events: Sequence[EventRow]) -> Path:
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_golden(events))
        return path

    def verify(self, name: str, events: Sequence[EventRow]) -> str:
        """The diff between the golden file and the run (empty: they match)."""
        path = self.path(name)
        expected = path.read_text() if path.exists() else ""
        return golden_diff(expected, render_golden(events), str(path), "run")


def _stream_rank(stream: str) -> int:
    name = _stream_name(stream)
    return STREAM_ORDER.index(name) if name in STREAM_ORDER else len(STREAM_ORDER)


def _stream_name(stream: str) -> str:
    """`T1234_BUDGET` or `AOS_BUDGET` -> `budget`: the namespace is not part of a golden."""
    return stream.rsplit("_", 1)[-1].lower()
