from __future__ import annotations

from pydantic import Field

from aos_plumbing.settings import CommonSettings


class ExecutorSettings(CommonSettings):
    http_port: int = Field(default=8102, alias="AOS_HTTP_PORT")
    disable_external_calls: bool = Field(default=False, alias="DISABLE_EXTERNAL_CALLS")
    retry_backoff_s: float = Field(
        default=0.2, alias="AOS_RETRY_BACKOFF_S", ge=0, description="first retry delay; doubles"
    )
