"""The typed events of the AOS bus.

Every event shares one envelope (`EventEnvelope`) and is told apart by its `type`
field; `AnyEvent` is the discriminated union of them all and the one
way in from bytes is `aos_contracts.codec.decode_event` (upcasting old schema versions
first).

Events are facts, named in the past tense, except the two requests that cross a
service boundary (`run.cancel_requested`, `budget.reservation_requested`): they are
facts too ("X asked for Y"), and the owner of Y answers with its own event.
"""

from __future__ import annotations

import builtins
import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from aos_contracts.failures import Failure, FailureCode
from aos_contracts.plans import Plan

TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_TENANT_RE = re.compile(TENANT_PATTERN)

# Deterministic ids for events derived from another event: a service that crashes after
# publishing and re-decides on redelivery produces the same id, which JetStream's
# duplicate window (Nats-Msg-Id) and every consumer's dedup then drop.
_DERIVED_NAMESPACE = uuid.UUID("6f1d6a52-3a53-4a8e-9a3e-2f8f7f0c9b11")


def derive_event_id(cause: uuid.UUID | str, purpose: str) -> uuid.UUID:
    """The id of the event that `cause` leads to for `purpose` (stable across retries)."""
    return uuid.uuid5(_DERIVED_NAMESPACE, f"{cause}/{purpose}")


E = TypeVar("E", bound="EventEnvelope")


def utc_now() -> datetime:
    return datetime.now(UTC)


# The longest deadline a goal may ask for (a week): no run stays open longer than this.
MAX_RUN_DEADLINE_S = 7 * 24 * 3600.0


class TraceContext(BaseModel):
    """W3C trace context, carried so a run can be followed across services."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    traceparent: str | None = None
    tracestate: str | None = None


# The bounded contexts of the log: one stream each, and one owning service each.
Context = Literal["goals", "plans", "runs", "budget"]


class EventEnvelope(BaseModel):
    """Fields every event carries. Subclasses narrow `type` to their literal, declare the
    `context` (stream) that owns them, and add their payload."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Which stream carries events of this type, and so which service may write them.
    context: ClassVar[Context]
    type: str = Field(description="the event type; narrowed to one literal by each event")

    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    schema_version: int = 1
    run_id: uuid.UUID
    tenant: Annotated[str, Field(pattern=TENANT_PATTERN)]
    occurred_at: datetime = Field(default_factory=utc_now)
    causation_id: uuid.UUID | None = Field(
        default=None, description="event_id of the event that caused this one"
    )
    correlation_id: uuid.UUID | None = Field(
        default=None, description="shared by every event of one run (the goal's event_id)"
    )
    trace: TraceContext = Field(default_factory=TraceContext)

    # `builtins.type`: in this class body `type` is the event's field.
    def caused(self, cls: builtins.type[E], purpose: str, **payload: Any) -> E:
        """Build the event `cls` caused by this one, with a deterministic id."""
        return cls(
            event_id=derive_event_id(self.event_id, purpose),
            run_id=self.run_id,
            tenant=self.tenant,
            causation_id=self.event_id,
            correlation_id=self.correlation_id or self.event_id,
            trace=self.trace,
            **payload,
        )


class StepTelemetry(BaseModel):
    """What happened inside one attempt of a skill, for the trace: calls and retries made
    within the skill, the circuit breaker it went through, tokens for a model call."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: str | None = Field(default=None, description="e.g. httpx, claude, stub")
    calls: int = Field(default=0, ge=0, description="calls made inside the skill")
    retries: int = Field(default=0, ge=0, description="calls after the first, within the skill")
    retry_delays_s: list[float] = Field(default_factory=list)
    circuit: str | None = Field(default=None, description="the breaker's key, e.g. http:host:80")
    circuit_state: Literal["closed", "open", "half_open"] | None = Field(
        default=None, description="the breaker's state after the attempt"
    )
    status_code: int | None = None
    response_bytes: int | None = None
    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


# --- ingress: what users and their programs publish ----------------------------------


# The largest budget a goal may have ($1,000,000): clients check it before they publish.
MAX_BUDGET_CENTS = 100_000_000


class GoalSubmitted(EventEnvelope):
    """A user asks AOS to achieve a goal within a budget. The public entry point."""

    context: ClassVar[Context] = "goals"
    type: Literal["goal.submitted"] = "goal.submitted"
    goal: Annotated[str, Field(min_length=1, max_length=10_000)]
    budget_cents: Annotated[int, Field(ge=0, le=MAX_BUDGET_CENTS)]
    inputs: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: Annotated[str, Field(max_length=200)] | None = None
    submitted_by: str | None = None
    replan_within_budget: bool = Field(
        default=False,
        description="when the first plan is estimated above the budget, ask the planner "
        "once more with the budget stated, instead of rejecting the goal",
    )
    reuse_plan_of: uuid.UUID | None = Field(
        default=None,
        description="plan this run with the recorded plan of an earlier run of the same "
        "tenant (validated and estimated again), instead of asking the planning backend",
    )
    deadline_s: Annotated[float, Field(gt=0, le=MAX_RUN_DEADLINE_S)] | None = Field(
        default=None,
        description="the run must end within this many seconds of the goal, or it is ended "
        "run.failed DEADLINE_EXCEEDED; unset: the executor's AOS_RUN_DEADLINE_S",
    )

    @field_validator("goal")
    @classmethod
    def _goal_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("goal must not be blank")
        return value


class RunCancelRequested(EventEnvelope):
    context: ClassVar[Context] = "goals"
    type: Literal["run.cancel_requested"] = "run.cancel_requested"
    reason: str = "cancelled by user"


# --- planner ----------------------------------------------------------------------------

# The step id the planner's own model calls are budgeted under. It cannot be the id of a
# plan step (those match STEP_ID_PATTERN), so planning and steps never share a reservation.
PLANNING_STEP_ID = "@planning"


class RunAccepted(EventEnvelope):
    context: ClassVar[Context] = "plans"
    type: Literal["run.accepted"] = "run.accepted"
    goal: str
    budget_cents: int
    inputs: dict[str, Any] = Field(default_factory=dict)
    planner_backend: str
    deadline_at: datetime | None = Field(
        default=None,
        description="when the executor ends the run if it has not ended (the goal's "
        "deadline_s); None: the executor's default deadline applies",
    )


class PlanningReservationRequested(EventEnvelope):
    """The planner asks the ledger for the worst-case cost of one planning model call,
    before making it. The ledger answers with budget.reserved or budget.denied for
    `reservation_id`, under the step id `@planning`."""

    context: ClassVar[Context] = "plans"
    type: Literal["planning.reservation_requested"] = "planning.reservation_requested"
    reservation_id: uuid.UUID
    step_id: str = PLANNING_STEP_ID
    attempt: Annotated[int, Field(ge=1, description="the planning call's number in this run")]
    amount_cents: Annotated[int, Field(ge=0)]
    backend: str
    model: str | None = None


class PlanningCallFinished(EventEnvelope):
    """One planning model call is over and cost `cost_cents` (from reported usage): the
    ledger commits it against the reservation and releases the rest."""

    context: ClassVar[Context] = "plans"
    type: Literal["planning.call_finished"] = "planning.call_finished"
    reservation_id: uuid.UUID
    step_id: str = PLANNING_STEP_ID
    attempt: Annotated[int, Field(ge=1)]
    cost_cents: Annotated[int, Field(ge=0)] = 0
    duration_ms: float = 0.0
    outcome: Literal["plan", "invalid", "error"] = Field(
        description="plan: the reply held a valid plan; invalid: it did not; error: the "
        "call itself failed (the goal is retried)"
    )
    telemetry: StepTelemetry | None = None


class PlanCreated(EventEnvelope):
    context: ClassVar[Context] = "plans"
    type: Literal["plan.created"] = "plan.created"
    plan: Plan
    estimated_cents: int
    budget_cents: int
    inputs: dict[str, Any] = Field(default_factory=dict)
    planning_cost_cents: Annotated[int, Field(ge=0)] = Field(
        default=0, description="what the planning model calls cost; charged to the run"
    )
    replanned: bool = Field(
        default=False, description="the first plan was above the budget; this is the second"
    )
    idempotency_key: str | None = Field(
        default=None, description="the goal's idempotency key, so a rebuilt planner knows it"
    )
    reused_plan_of: uuid.UUID | None = Field(
        default=None, description="the earlier run whose recorded plan this is"
    )
    deadline_at: datetime | None = Field(
        default=None,
        description="when the executor ends the run if it has not ended (the goal's "
        "deadline_s); None: the executor's default deadline applies",
    )


class PlanRejected(EventEnvelope):
    context: ClassVar[Context] = "plans"
    type: Literal["plan.rejected"] = "plan.rejected"
    reasons: list[str]
    code: FailureCode = FailureCode.PLAN_INVALID
    planning_cost_cents: Annotated[int, Field(ge=0)] = 0
    idempotency_key: str | None = Field(
        default=None, description="the goal's idempotency key, so a rebuilt planner knows it"
    )


class RequestRefused(EventEnvelope):
    """The planner's answer to a goal or cancel it will not act on, published on the
    *sender's* subjects (`aos.plans.<sender tenant>.<run_id>`), so the sender hears why
    instead of nothing. It is not part of any run unless `ends_run` says so."""

    context: ClassVar[Context] = "plans"
    type: Literal["request.refused"] = "request.refused"
    request_type: Literal["goal.submitted", "run.cancel_requested"]
    request_event_id: uuid.UUID = Field(description="event_id of the refused goal or cancel")
    error: Failure
    existing_run_id: uuid.UUID | None = Field(
        default=None,
        description="for DUPLICATE_GOAL: the run the tenant's earlier goal with this "
        "idempotency key started",
    )
    ends_run: bool = Field(
        default=False,
        description="true when the refused goal's run id is the sender's own and will never "
        "run (a duplicate goal): the run ends here. False when the run id is unknown or "
        "another tenant's: the refusal is an answer to the sender only",
    )


# --- executor ---------------------------------------------------------------------------


class BudgetReservationRequested(EventEnvelope):
    context: ClassVar[Context] = "runs"
    type: Literal["budget.reservation_requested"] = "budget.reservation_requested"
    reservation_id: uuid.UUID
    step_id: str
    attempt: int
    amount_cents: Annotated[int, Field(ge=0)]


class StepStarted(EventEnvelope):
    context: ClassVar[Context] = "runs"
    type: Literal["step.started"] = "step.started"
    step_id: str
    skill: str
    attempt: int
    reservation_id: uuid.UUID
    params: dict[str, Any] = Field(default_factory=dict)


class StepSucceeded(EventEnvelope):
    context: ClassVar[Context] = "runs"
    type: Literal["step.succeeded"] = "step.succeeded"
    step_id: str
    skill: str
    attempt: int
    reservation_id: uuid.UUID
    output: Any = None
    cost_cents: Annotated[int, Field(ge=0)] = 0
    duration_ms: float = 0.0
    is_stub: bool = False
    telemetry: StepTelemetry | None = None


class StepFailed(EventEnvelope):
    context: ClassVar[Context] = "runs"
    type: Literal["step.failed"] = "step.failed"
    step_id: str
    skill: str
    attempt: int
    reservation_id: uuid.UUID
    error: Failure
    will_retry: bool = False
    cost_cents: Annotated[int, Field(ge=0)] = 0
    duration_ms: float = 0.0
    telemetry: StepTelemetry | None = None


class RunCompleted(EventEnvelope):
    context: ClassVar[Context] = "runs"
    type: Literal["run.completed"] = "run.completed"
    outputs: dict[str, Any] = Field(
        default_factory=dict, description="output of every step no other step depends on"
    )
    cost_cents: int = 0
    skipped_steps: list[str] = Field(
        default_factory=list, description="optional steps the budget did not allow"
    )
    omitted_outputs: list[str] = Field(
        default_factory=list,
        description="sinks whose output did not fit in this event with the others (the bus "
        "limits an event's size): each is in its step's step.succeeded",
    )


class RunFailed(EventEnvelope):
    context: ClassVar[Context] = "runs"
    type: Literal["run.failed"] = "run.failed"
    error: Failure
    failed_step_id: str | None = None
    cost_cents: int = 0


class RunCancelled(EventEnvelope):
    context: ClassVar[Context] = "runs"
    type: Literal["run.cancelled"] = "run.cancelled"
    reason: str
    cost_cents: int = 0


# --- ledger -----------------------------------------------------------------------------


class BudgetOpened(EventEnvelope):
    context: ClassVar[Context] = "budget"
    type: Literal["budget.opened"] = "budget.opened"
    cap_cents: int


class BudgetReserved(EventEnvelope):
    context: ClassVar[Context] = "budget"
    type: Literal["budget.reserved"] = "budget.reserved"
    reservation_id: uuid.UUID
    step_id: str
    attempt: int
    amount_cents: int
    remaining_cents: int = Field(description="cap minus reserved minus committed, after this")
    tenant_period: str | None = Field(
        default=None, description="the tenant budget period this counts against, e.g. month:2025-06"
    )
    tenant_cap_cents: int | None = Field(
        default=None, description="the tenant's cap for that period; None: no tenant cap"
    )
    tenant_remaining_cents: int | None = Field(
        default=None, description="tenant cap minus reserved minus committed, after this"
    )
    expires_at: datetime | None = Field(
        default=None, description="when the ledger releases the reservation if never committed"
    )


class BudgetDenied(EventEnvelope):
    context: ClassVar[Context] = "budget"
    type: Literal["budget.denied"] = "budget.denied"
    reservation_id: uuid.UUID
    step_id: str
    attempt: int
    amount_cents: int
    remaining_cents: int
    error: Failure
    exceeded_cap: Literal["run", "tenant"] | None = Field(
        default=None, description="which cap the reservation would have crossed"
    )
    tenant_period: str | None = None
    tenant_cap_cents: int | None = None
    tenant_remaining_cents: int | None = None


class BudgetCommitted(EventEnvelope):
    context: ClassVar[Context] = "budget"
    type: Literal["budget.committed"] = "budget.committed"
    reservation_id: uuid.UUID
    step_id: str
    reserved_cents: int
    committed_cents: int
    released_cents: int
    tenant_period: str | None = Field(
        default=None, description="the tenant budget period the spend counts against"
    )


class BudgetReleased(EventEnvelope):
    context: ClassVar[Context] = "budget"
    type: Literal["budget.released"] = "budget.released"
    reservation_id: uuid.UUID
    step_id: str
    released_cents: int
    reason: str = Field(description="the run's terminal event type, or 'expired'")
    tenant_period: str | None = None


# --- the union --------------------------------------------------------------------------

AnyEvent = Annotated[
    GoalSubmitted
    | RunCancelRequested
    | RunAccepted
    | PlanCreated
    | PlanRejected
    | RequestRefused
    | PlanningReservationRequested
    | PlanningCallFinished
    | BudgetReservationRequested
    | StepStarted
    | StepSucceeded
    | StepFailed
    | RunCompleted
    | RunFailed
    | RunCancelled
    | BudgetOpened
    | BudgetReserved
    | BudgetDenied
    | BudgetCommitted
    | BudgetReleased,
    Field(discriminator="type"),
]

EVENT_ADAPTER: TypeAdapter[AnyEvent] = TypeAdapter(AnyEvent)

# Every event type, from the union above: the one list of events there is.
EVENT_TYPES: dict[str, type[EventEnvelope]] = {
    str(cls.model_fields["type"].default): cls for cls in get_args(get_args(AnyEvent)[0])
}

TERMINAL_RUN_EVENTS = frozenset({"run.completed", "run.failed", "run.cancelled"})


def type_names(*classes: type[EventEnvelope]) -> frozenset[str]:
    """The `type` values of event classes, e.g. for a consumer's `event_types`."""
    return frozenset(str(cls.model_fields["type"].default) for cls in classes)


def is_valid_tenant(tenant: str) -> bool:
    return bool(_TENANT_RE.match(tenant))
