"""What the tracer stores: events with their log position, and the runs/steps/parked views.

The `to_json` methods are the HTTP API's shapes (the CLI is written against them).
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aos_contracts.events import AnyEvent

RUN_STATUSES = ("submitted", "running", "completed", "failed", "cancelled")
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True, slots=True)
class TracedEvent:
    """One event and where it sits in the log."""

    stream: str
    stream_seq: int
    subject: str
    event: AnyEvent


@dataclass(slots=True)
class RunRow:
    run_id: uuid.UUID
    tenant: str
    goal: str | None
    status: str
    budget_cents: int | None
    cost_cents: int
    created_at: datetime
    updated_at: datetime
    ended_at: datetime | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": str(self.run_id),
            "tenant": self.tenant,
            "goal": self.goal,
            "status": self.status,
            "budget_cents": self.budget_cents,
            "cost_cents": self.cost_cents,
            "created_at": iso(self.created_at),
            "ended_at": iso(self.ended_at),
        }


@dataclass(slots=True)
class StepRow:
    run_id: uuid.UUID
    step_id: str
    skill: str | None
    status: str  # pending | running | retrying | succeeded | failed | denied
    attempts: int = 0
    started_at: datetime | None = None
    ended_at: datetime | None = None
    duration_ms: float = 0.0
    cost_cents: int = 0
    tokens: int | None = None
    error_code: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "step_id": self.step_id,
            "skill": self.skill,
            "status": self.status,
            "attempts": self.attempts,
            "started_at": iso(self.started_at),
            "ended_at": iso(self.ended_at),
            "duration_ms": self.duration_ms,
            "cost_cents": self.cost_cents,
            "tokens": self.tokens,
            "error_code": self.error_code,
        }


@dataclass(frozen=True, slots=True)
class EventRow:
    stream: str
    stream_seq: int
    type: str
    occurred_at: datetime
    payload: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "stream_seq": self.stream_seq,
            "type": self.type,
            "occurred_at": iso(self.occurred_at),
            "event": self.payload,
        }


@dataclass(frozen=True, slots=True)
class ParkedRow:
    """A parked message. `payload` is the whole ParkedMessage as JSON (lossless).

    `parked_seq`, its sequence in the parked stream, is the id operators name it by
    (`aos parked show|replay|drop ID`); `replayed_at` is set once it was replayed."""

    service: str
    reason: str
    stream: str
    stream_seq: int
    subject: str
    parked_at: datetime
    payload: dict[str, Any]
    parked_seq: int | None = None
    replayed_at: datetime | None = None

    @property
    def status(self) -> str:
        return "parked" if self.replayed_at is None else "replayed"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.parked_seq,
            "status": self.status,
            "service": self.service,
            "reason": self.reason,
            "stream": self.stream,
            "stream_seq": self.stream_seq,
            "subject": self.subject,
            "parked_at": iso(self.parked_at),
            "replayed_at": iso(self.replayed_at),
            "num_delivered": self.payload.get("num_delivered"),
            "truncated": bool(self.payload.get("truncated", False)),
            "original_size": self.payload.get("original_size"),
            "headers": self.payload.get("headers", {}),
            "data": self.data_text(),
        }

    def to_full_json(self) -> dict[str, Any]:
        """`to_json` plus the bytes exactly (base64), which a replay sends again."""
        return {**self.to_json(), "data_b64": self.payload.get("data_b64")}

    def data_text(self) -> str | None:
        """The parked bytes as text, for people reading /parked (binary shows as U+FFFD)."""
        data_b64 = self.payload.get("data_b64")
        if not isinstance(data_b64, str):
            return None
        try:
            return base64.b64decode(data_b64).decode(errors="replace")
        except ValueError:
            return None
