from __future__ import annotations

from pydantic import Field

from aos_plumbing.settings import CommonSettings


class TracerSettings(CommonSettings):
    http_port: int = Field(default=8104, alias="AOS_HTTP_PORT")
    database_url: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/aos_tracer",
        alias="AOS_TRACER_DATABASE_URL",
        description="asyncpg DSN; unix sockets work too (postgresql://user:@/db?host=/dir)",
    )
    use_postgres_traces: bool = Field(
        default=True,
        alias="USE_POSTGRES_TRACES",
        description="false keeps traces in memory: for unit tests only, lost on restart",
    )
