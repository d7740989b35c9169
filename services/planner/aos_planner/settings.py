from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator

from aos_contracts.plans import MAX_PLAN_STEPS, PlanLimits
from aos_contracts.skills import SKILL_CONTRACTS
from aos_plumbing.settings import CommonSettings


class PlannerSettings(CommonSettings):
    http_port: int = Field(default=8101, alias="AOS_HTTP_PORT")
    backend: Literal["stub", "anthropic"] = Field(default="stub", alias="PLANNER_BACKEND")
    anthropic_api_key: SecretStr | None = Field(default=None, alias="ANTHROPIC_API_KEY")
    anthropic_base_url: str | None = Field(default=None, alias="ANTHROPIC_BASE_URL")
    anthropic_max_retries: int = Field(default=3, alias="AOS_ANTHROPIC_MAX_RETRIES", ge=0)
    planner_model: str = Field(default="claude-sonnet-4-6", alias="AOS_PLANNER_MODEL")
    planner_max_tokens: int = Field(default=4096, alias="AOS_PLANNER_MAX_TOKENS", ge=256)
    database_url: str | None = Field(
        default=None,
        alias="AOS_PLANNER_DATABASE_URL",
        description="the planner's decisions (asyncpg DSN); unset: in memory, rebuilt from "
        "the plans stream at each start (tests, demos; not production)",
    )
    max_plan_steps: int = Field(
        default=MAX_PLAN_STEPS,
        alias="AOS_PLAN_MAX_STEPS",
        ge=1,
        le=MAX_PLAN_STEPS,
        description="a plan with more steps is rejected",
    )
    max_plan_depth: int = Field(
        default=MAX_PLAN_STEPS,
        alias="AOS_PLAN_MAX_DEPTH",
        ge=1,
        le=MAX_PLAN_STEPS,
        description="a plan whose longest dependency chain has more steps is rejected",
    )

    planning_attempts: int = Field(
        default=5,
        alias="AOS_PLANNING_ATTEMPTS",
        ge=1,
        le=9,  # below the 10 deliveries after which a consumer parks a message
        description="deliveries of a goal whose planning fails for want of the ledger or "
        "the model API; then the goal is rejected with DEPENDENCY_UNAVAILABLE",
    )
    batches_in_flight: int = Field(
        default=8,
        alias="AOS_PLANNER_BATCHES_IN_FLIGHT",
        ge=1,
        le=64,
        description="goal batches planned at once: a slow planning call holds back only "
        "its own batch",
    )
    skill_roles: dict[str, str] = Field(
        default_factory=dict,
        alias="AOS_SKILL_ROLES",
        description="JSON: the role a goal's token needs for a plan to use a skill, e.g. "
        '{"http_call": "skill:http"}; skills not named need none. Enforced with RBAC_ENFORCE',
    )
    ledger_timeout_s: float = Field(
        default=10.0,
        alias="AOS_PLANNER_LEDGER_TIMEOUT_S",
        gt=0,
        description="how long to wait for the ledger's answer on a planning call; then the "
        "goal is retried later",
    )

    def plan_limits(self) -> PlanLimits:
        return PlanLimits(max_steps=self.max_plan_steps, max_depth=self.max_plan_depth)

    @field_validator("skill_roles")
    @classmethod
    def _known_skills(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(SKILL_CONTRACTS))
        if unknown:
            raise ValueError(f"AOS_SKILL_ROLES names unknown skills {unknown}")
        return value
