from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from aos_plumbing.settings import CommonSettings


class PlannerSettings(CommonSettings):
    http_port: int = Field(default=8101, alias="AOS_HTTP_PORT")
    backend: Literal["stub", "anthropic"] = Field(default="stub", alias="PLANNER_BACKEND")
    anthropic_api_key: SecretStr | None = Field(default=None, alias="ANTHROPIC_API_KEY")
    anthropic_base_url: str | None = Field(default=None, alias="ANTHROPIC_BASE_URL")
    anthropic_max_retries: int = Field(default=3, alias="AOS_ANTHROPIC_MAX_RETRIES", ge=0)
    planner_model: str = Field(default="claude-sonnet-4-6", alias="AOS_PLANNER_MODEL")
    planner_max_tokens: int = Field(default=4096, alias="AOS_PLANNER_MAX_TOKENS", ge=256)
