from __future__ import annotations

from pydantic import Field

from aos_plumbing.settings import CommonSettings


class ExecutorSettings(CommonSettings):
    http_port: int = Field(default=8102, alias="AOS_HTTP_PORT")
    disable_external_calls: bool = Field(default=False, alias="DISABLE_EXTERNAL_CALLS")
    database_url: str | None = Field(
        default=None,
        alias="AOS_EXECUTOR_DATABASE_URL",
        description="checkpoints; unset: every start folds the whole log (tests, demos)",
    )
    checkpoint_interval_s: float = Field(default=60.0, alias="AOS_CHECKPOINT_INTERVAL_S", gt=0)
    retry_backoff_s: float = Field(
        default=0.2, alias="AOS_RETRY_BACKOFF_S", ge=0, description="first retry delay; doubles"
    )
