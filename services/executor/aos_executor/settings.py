from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator

from aos_contracts.events import MAX_RUN_DEADLINE_S
from aos_executor.runs import RUN_OUTPUTS_MAX_BYTES
from aos_plumbing.settings import CommonSettings


class ExecutorSettings(CommonSettings):
    http_port: int = Field(default=8102, alias="AOS_HTTP_PORT")
    database_url: str | None = Field(
        default=None,
        alias="AOS_EXECUTOR_DATABASE_URL",
        description="checkpoints; unset: every start folds the whole log (tests, demos)",
    )
    checkpoint_interval_s: float = Field(default=60.0, alias="AOS_CHECKPOINT_INTERVAL_S", gt=0)
    redis_url: str | None = Field(
        default=None,
        alias="REDIS_URL",
        description="idempotency claims of unsafe steps; unset: in memory (one process only)",
    )
    lease_ttl_s: float = Field(
        default=10.0,
        alias="AOS_EXECUTOR_LEASE_TTL_S",
        gt=0,
        description="how long a crashed active executor blocks a standby from taking over",
    )
    idempotency_ttl_s: float = Field(
        default=24 * 3600.0,
        alias="AOS_IDEMPOTENCY_TTL_S",
        gt=0,
        description="how long an unsafe step's recorded result is kept",
    )
    retry_backoff_s: float = Field(
        default=0.2, alias="AOS_RETRY_BACKOFF_S", ge=0, description="first retry delay; doubles"
    )

    # --- every run ends; nothing outgrows the bus ------------------------------------------
    run_deadline_s: float = Field(
        default=3600.0,
        alias="AOS_RUN_DEADLINE_S",
        gt=0,
        le=MAX_RUN_DEADLINE_S,
        description="a run whose goal sets no deadline_s is ended run.failed DEADLINE_EXCEEDED "
        "this long after run.accepted",
    )
    deadline_sweep_s: float = Field(
        default=5.0,
        alias="AOS_DEADLINE_SWEEP_S",
        gt=0,
        description="how often the executor looks for runs past their deadline (it also "
        "wakes at the next deadline it knows)",
    )
    max_step_output_bytes: int = Field(
        default=512 * 1024,
        alias="AOS_MAX_STEP_OUTPUT_BYTES",
        ge=1024,
        le=RUN_OUTPUTS_MAX_BYTES,
        description="a step whose output is larger as JSON fails with OUTPUT_TOO_LARGE "
        "(not retryable); at most 768 KiB, so step.succeeded stays under NATS' 1 MiB",
    )

    # --- skills: which backends (docs/SKILLS.md) ---------------------------------------
    anthropic_api_key: SecretStr | None = Field(
        default=None,
        alias="ANTHROPIC_API_KEY",
        description="set: llm_invoke runs on Claude; unset: the deterministic stub",
    )
    anthropic_base_url: str | None = Field(default=None, alias="ANTHROPIC_BASE_URL")
    http_backend: Literal["httpx", "stub"] = Field(default="httpx", alias="AOS_HTTP_BACKEND")

    # --- http_call: what it may reach ----------------------------------------------------
    disable_external_calls: bool = Field(default=False, alias="DISABLE_EXTERNAL_CALLS")
    http_allow_hosts: str = Field(
        default="",
        alias="AOS_HTTP_ALLOW_HOSTS",
        description="comma separated hosts, *.suffixes, IPs or CIDRs that http_call may "
        "reach even when external calls are disabled or the address is private",
    )
    http_max_bytes: int = Field(default=256 * 1024, alias="AOS_HTTP_MAX_BYTES", ge=1)

    # --- retries and circuit breakers inside skills ----------------------------------------
    skill_max_retries: int = Field(default=2, alias="AOS_SKILL_MAX_RETRIES", ge=0, le=10)
    skill_retry_base_s: float = Field(default=0.25, alias="AOS_SKILL_RETRY_BASE_S", ge=0)
    skill_max_retry_after_s: float = Field(default=30.0, alias="AOS_SKILL_MAX_RETRY_AFTER_S", ge=0)
    circuit_failure_threshold: int = Field(default=5, alias="AOS_CIRCUIT_FAILURE_THRESHOLD", ge=1)
    circuit_cooldown_s: float = Field(default=30.0, alias="AOS_CIRCUIT_COOLDOWN_S", ge=0)

    @field_validator("anthropic_api_key", "anthropic_base_url", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value
