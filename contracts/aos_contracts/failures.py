"""The failure catalog: every failure in AOS is data with a code from this list."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class FailureCode(StrEnum):
    BUDGET_EXCEEDED = "BUDGET_EXCEEDED"
    PLAN_INVALID = "PLAN_INVALID"
    INPUT_INVALID = "INPUT_INVALID"
    SKILL_UNKNOWN = "SKILL_UNKNOWN"
    SKILL_TIMEOUT = "SKILL_TIMEOUT"
    SKILL_ERROR = "SKILL_ERROR"
    HTTP_4XX = "HTTP_4XX"
    HTTP_5XX = "HTTP_5XX"
    LLM_RATE_LIMITED = "LLM_RATE_LIMITED"
    LLM_OVERLOADED = "LLM_OVERLOADED"
    CIRCUIT_OPEN = "CIRCUIT_OPEN"
    EXTERNAL_CALLS_DISABLED = "EXTERNAL_CALLS_DISABLED"
    CANCELLED = "CANCELLED"
    UNAUTHORIZED = "UNAUTHORIZED"  # no valid token: missing, bad signature, expired, ...
    FORBIDDEN = "FORBIDDEN"  # a valid token that may not do this (tenant, role)
    # a service AOS needs (the ledger, a model API) did not answer, however often asked
    DEPENDENCY_UNAVAILABLE = "DEPENDENCY_UNAVAILABLE"
    # a step's call was cut off (the executor died mid-call) and its skill may not be
    # called again without risking the effect twice
    STEP_INTERRUPTED = "STEP_INTERRUPTED"
    # the run did not end by its deadline; it was ended and its money released
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    # a goal, its inputs or a step's output is over its documented size limit
    GOAL_TOO_LARGE = "GOAL_TOO_LARGE"
    OUTPUT_TOO_LARGE = "OUTPUT_TOO_LARGE"
    # an event that does not belong where it arrived: wrong stream, wrong tenant, or a
    # run of another tenant (see docs/SECURITY.md)
    EVENT_REFUSED = "EVENT_REFUSED"
    # the tenant already submitted a goal with this idempotency key: see existing_run_id
    DUPLICATE_GOAL = "DUPLICATE_GOAL"
    # no run with that id for this tenant (unknown, or another tenant's)
    RUN_NOT_FOUND = "RUN_NOT_FOUND"


# Whether trying the same thing again may succeed. A retryable failure is retried by the
# executor within the step's retry policy; a non-retryable one fails the step at once.
RETRYABLE: dict[FailureCode, bool] = {
    FailureCode.BUDGET_EXCEEDED: False,
    FailureCode.PLAN_INVALID: False,
    FailureCode.INPUT_INVALID: False,
    FailureCode.SKILL_UNKNOWN: False,
    FailureCode.SKILL_TIMEOUT: True,
    FailureCode.SKILL_ERROR: True,
    FailureCode.HTTP_4XX: False,
    FailureCode.HTTP_5XX: True,
    FailureCode.LLM_RATE_LIMITED: True,
    FailureCode.LLM_OVERLOADED: True,
    FailureCode.CIRCUIT_OPEN: True,
    FailureCode.EXTERNAL_CALLS_DISABLED: False,
    FailureCode.CANCELLED: False,
    FailureCode.UNAUTHORIZED: False,
    FailureCode.FORBIDDEN: False,
    FailureCode.DEPENDENCY_UNAVAILABLE: True,
    FailureCode.STEP_INTERRUPTED: False,
    FailureCode.DEADLINE_EXCEEDED: False,
    FailureCode.GOAL_TOO_LARGE: False,
    FailureCode.OUTPUT_TOO_LARGE: False,
    FailureCode.EVENT_REFUSED: False,
    FailureCode.DUPLICATE_GOAL: False,
    FailureCode.RUN_NOT_FOUND: False,
}


class Failure(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    code: FailureCode
    message: str
    retryable: bool = Field(description="whether the same call may succeed if tried again")
    outcome_unknown: bool = Field(
        default=False,
        description="the call may have had its effect (a timeout or a lost response): a "
        "retry must carry the same Idempotency-Key, so the server can deduplicate it",
    )

    @classmethod
    def of(cls, code: FailureCode, message: str) -> Failure:
        return cls(code=code, message=message, retryable=RETRYABLE[code])

    def unknown_outcome(self) -> Failure:
        """This failure, marked as one whose call may have had its effect."""
        return self.model_copy(update={"outcome_unknown": True})

    def final(self, why: str) -> Failure:
        """This failure, never to be retried (`why` says why): e.g. a call whose outcome is
        unknown and whose effect must not happen twice."""
        return self.model_copy(update={"retryable": False, "message": f"{self.message}; {why}"})
