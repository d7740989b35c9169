"""Live progress of a running step: core NATS messages, not events of the log.

While a step runs, its skill may publish what it has so far (an HTTP body's chunks, a
model's text deltas) to `<namespace>.progress.<tenant>.<run_id>`. Nothing is stored:
a subscriber sees progress only while it listens, and the step's result event in the
log stays the single source of truth.
"""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from aos_contracts.subjects import DEFAULT_NAMESPACE

PROGRESS = "progress"


class StepProgress(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["step.progress"] = "step.progress"
    run_id: uuid.UUID
    tenant: str
    step_id: str
    skill: str
    attempt: int
    seq: int = Field(description="0, 1, 2, ... within one attempt")
    kind: Literal["http.chunk", "llm.text"]
    text: str = Field(description="the chunk (decoded, replacement characters if binary)")
    total_bytes: int | None = Field(default=None, description="bytes received so far")


def progress_subject(
    tenant: str, run_id: uuid.UUID | str, namespace: str = DEFAULT_NAMESPACE
) -> str:
    return f"{namespace}.{PROGRESS}.{tenant}.{run_id}"
