"""Where traces live: the `TraceStore` protocol and the in-memory store (unit tests only).

A store applies one batch of one stream atomically: the new events, the projections they
change and the stream's tracking sequence, all or nothing. An event whose id (or log
position) is already stored is neither stored nor projected again, so a redelivered
batch changes nothing.

Why not skip events at or below the tracked sequence instead: a batch in flight when the
tracer died is redelivered only after its ack wait, by which time the restarted tracer
has applied later batches and moved the tracked sequence past it; skipping by sequence
would lose it. The tracked sequence is the rebuild watermark: the consumer starts after
it, and when it is 0 (an emptied store) from the beginning of the log.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Protocol

from aos_tracer.projection import Projector, StepKey, aware
from aos_tracer.rows import EventRow, ParkedRow, RunRow, StepRow, TracedEvent


class TraceStore(Protocol):
    backend: str  # "postgres" | "memory", shown by /readyz

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> bool: ...

    async def last_seq(self, stream: str) -> int:
        """The last sequence of `stream` this store applied (0: nothing yet)."""
        ...

    async def apply(self, stream: str, batch: Sequence[TracedEvent]) -> int:
        """Store and project a batch of `stream`; returns how many events were new."""
        ...

    async def add_parked(self, stream: str, last_seq: int, rows: Sequence[ParkedRow]) -> None:
        """Store parked messages read from `stream` up to `last_seq`."""
        ...

    async def list_runs(
        self, *, tenant: str | None, status: str | None, limit: int
    ) -> list[RunRow]: ...

    async def get_run(self, run_id: uuid.UUID) -> RunRow | None: ...

    async def run_steps(self, run_id: uuid.UUID) -> list[StepRow]: ...

    async def run_events(self, run_id: uuid.UUID) -> list[EventRow]: ...

    async def list_parked(self, limit: int, status: str | None = None) -> list[ParkedRow]:
        """Parked messages, newest first; `status` "parked" or "replayed" filters."""
        ...

    async def get_parked(self, parked_seq: int) -> ParkedRow | None: ...

    async def mark_replayed(self, parked_seq: int, at: datetime) -> ParkedRow | None:
        """Record that it was replayed (the first time counts); None if unknown."""
        ...

    async def drop_parked(self, parked_seq: int) -> bool:
        """Forget it; False if unknown."""
        ...


def distinct(batch: Sequence[TracedEvent]) -> list[TracedEvent]:
    """The events of a batch, each event id once (the first position wins)."""
    first: dict[uuid.UUID, TracedEvent] = {}
    for traced in batch:
        first.setdefault(traced.event.event_id, traced)
    return list(first.values())


def event_row(traced: TracedEvent) -> EventRow:
    return EventRow(
        stream=traced.stream,
        stream_seq=traced.stream_seq,
        type=traced.event.type,
        occurred_at=aware(traced.event.occurred_at),
        payload=traced.event.model_dump(mode="json"),
    )


_NEVER = datetime.min.replace(tzinfo=UTC)


def step_order(step: StepRow) -> tuple[bool, datetime, str]:
    """Steps in the order they started; steps that never started last."""
    return (step.started_at is None, step.started_at or _NEVER, step.step_id)


class InMemoryTraceStore:
    """Everything in dicts; lost on restart. For unit tests (USE_POSTGRES_TRACES=false)."""

    backend = "memory"

    def __init__(self) -> None:
        self.events: dict[uuid.UUID, EventRow] = {}
        self.positions: set[tuple[str, int]] = set()
        self.run_ids: dict[uuid.UUID, tuple[uuid.UUID, str]] = {}  # event id -> run, tenant
        self.runs: dict[uuid.UUID, RunRow] = {}
        self.steps: dict[StepKey, StepRow] = {}
        self.parked: dict[tuple[str, str, int], ParkedRow] = {}
        self.tracking: dict[str, int] = {}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ping(self) -> bool:
        return True

    async def last_seq(self, stream: str) -> int:
        return self.tracking.get(stream, 0)

    async def apply(self, stream: str, batch: Sequence[TracedEvent]) -> int:
        if not batch:
            return 0
        projector = Projector(self.runs, self.steps)
        stored = 0
        for traced in distinct(batch):
            position = (traced.stream, traced.stream_seq)
            if traced.event.event_id in self.events or position in self.positions:
                continue
            self.events[traced.event.event_id] = event_row(traced)
            self.positions.add(position)
            self.run_ids[traced.event.event_id] = (traced.event.run_id, traced.event.tenant)
            projector.apply(traced.event)
            stored += 1
        last = max(traced.stream_seq for traced in batch)
        self.tracking[stream] = max(self.tracking.get(stream, 0), last)
        return stored

    async def add_parked(self, stream: str, last_seq: int, rows: Sequence[ParkedRow]) -> None:
        for row in rows:
            self.parked.setdefault((row.service, row.stream, row.stream_seq), row)
        self.tracking[stream] = max(self.tracking.get(stream, 0), last_seq)

    async def list_runs(
        self, *, tenant: str | None, status: str | None, limit: int
    ) -> list[RunRow]:
        runs = [
            run
            for run in self.runs.values()
            if (tenant is None or run.tenant == tenant) and (status is None or run.status == status)
        ]
        runs.sort(key=lambda run: (run.created_at, str(run.run_id)), reverse=True)
        return runs[:limit]

    async def get_run(self, run_id: uuid.UUID) -> RunRow | None:
        return self.runs.get(run_id)

    async def run_steps(self, run_id: uuid.UUID) -> list[StepRow]:
        return sorted(
            (step for (owner, _), step in self.steps.items() if owner == run_id), key=step_order
        )

    async def run_events(self, run_id: uuid.UUID) -> list[EventRow]:
        run = self.runs.get(run_id)
        if run is None:
            return []
        owner = (run_id, run.tenant)  # another tenant's events naming this run are not its
        rows = [row for event_id, row in self.events.items() if self.run_ids[event_id] == owner]
        return sorted(rows, key=lambda row: (row.occurred_at, row.stream, row.stream_seq))

    async def list_parked(self, limit: int, status: str | None = None) -> list[ParkedRow]:
        rows = sorted(self.parked.values(), key=lambda row: row.parked_at, reverse=True)
        return [row for row in rows if status is None or row.status == status][:limit]

    def _parked_key(self, parked_seq: int) -> tuple[str, str, int] | None:
        return next((k for k, row in self.parked.items() if row.parked_seq == parked_seq), None)

    async def get_parked(self, parked_seq: int) -> ParkedRow | None:
        key = self._parked_key(parked_seq)
        return None if key is None else self.parked[key]

    async def mark_replayed(self, parked_seq: int, at: datetime) -> ParkedRow | None:
        key = self._parked_key(parked_seq)
        if key is None:
            return None
        row = self.parked[key]
        if row.replayed_at is None:
            row = self.parked[key] = replace(row, replayed_at=at)
        return row

    async def drop_parked(self, parked_seq: int) -> bool:
        key = self._parked_key(parked_seq)
        if key is None:
            return False
        del self.parked[key]
        return True
