from __future__ import annotations

from pydantic import Field

from aos_plumbing.settings import CommonSettings


class LedgerSettings(CommonSettings):
    http_port: int = Field(default=8103, alias="AOS_HTTP_PORT")
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", alias="REDIS_URL")
