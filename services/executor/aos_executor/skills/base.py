"""What every skill shares: the Skill protocol, its result, its errors, its context.

A skill takes validated params and a SkillContext and returns a SkillResult (output,
actual cost, telemetry), or raises SkillError with a Failure from the catalog (and the
telemetry of what it tried, so a failed step's trace shows its retries too).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel

from aos_contracts.events import StepTelemetry, derive_event_id
from aos_contracts.failures import Failure, FailureCode
from aos_contracts.progress import StepProgress
from aos_contracts.skills import SkillContract

log = logging.getLogger(__name__)

ProgressKind = Literal["http.chunk", "llm.text"]
ProgressSink = Callable[[StepProgress], Awaitable[None]]

# A progress message carries at most this much text: it is a live view, not the result.
MAX_PROGRESS_TEXT = 4096


class SkillError(Exception):
    def __init__(self, failure: Failure, telemetry: StepTelemetry | None = None) -> None:
        super().__init__(failure.message)
        self.failure = failure
        self.telemetry = telemetry

    @classmethod
    def of(
        cls, code: FailureCode, message: str, telemetry: StepTelemetry | None = None
    ) -> SkillError:
        return cls(Failure.of(code, message), telemetry)


@dataclass(frozen=True)
class SkillResult:
    output: Any
    cost_cents: int = 0
    telemetry: StepTelemetry | None = None


@dataclass
class SkillContext:
    """Who is calling (run, step, attempt) and where live progress goes."""

    run_id: uuid.UUID
    tenant: str
    step_id: str
    skill: str
    attempt: int = 1
    sink: ProgressSink | None = None
    # The attempt whose Idempotency-Key this one carries (None: its own).
    key_attempt: int | None = None
    _seq: int = field(default=0, init=False)

    async def progress(self, kind: ProgressKind, text: str, total_bytes: int | None = None) -> None:
        """Publish a progress message; never fails the step (progress is best effort)."""
        if self.sink is None:
            return
        message = StepProgress(
            run_id=self.run_id,
            tenant=self.tenant,
            step_id=self.step_id,
            skill=self.skill,
            attempt=self.attempt,
            seq=self._seq,
            kind=kind,
            text=text[:MAX_PROGRESS_TEXT],
            total_bytes=total_bytes,
        )
        self._seq += 1
        try:
            await self.sink(message)
        except Exception:  # noqa: BLE001 - a lost progress message is not a failed step
            log.debug("progress message for %s/%s dropped", self.run_id, self.step_id)

    @property
    def idempotency_key(self) -> str:
        """Stable for this run, step and attempt: the same call made again carries it. An
        attempt after one whose outcome is unknown carries that attempt's key instead
        (`key_attempt`), so a server that deduplicates by key sees one request."""
        attempt = self.key_attempt or self.attempt
        return str(derive_event_id(self.run_id, f"idempotency-key/{self.step_id}/{attempt}"))

    @classmethod
    def detached(cls, skill: str = "skill") -> SkillContext:
        """A context for calls outside a run (tests, tools): progress goes nowhere."""
        return cls(run_id=uuid.UUID(int=0), tenant="none", step_id="-", skill=skill)


class Skill(Protocol):
    @property
    def contract(self) -> SkillContract: ...

    @property
    def is_stub(self) -> bool: ...

    @property
    def backend(self) -> str:
        """What readiness and `aos stubs` show: "httpx", "claude", "stub", ..."""
        ...

    async def run(self, params: BaseModel, context: SkillContext) -> SkillResult: ...

    async def aclose(self) -> None: ...
