"""Typed settings: one object per service, read from the environment.

Every service shares `CommonSettings`; each adds its own fields in its own package.
Flags keep the names the deployment documents use (`REDIS_URL`, `PLANNER_BACKEND`, ...).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from aos_contracts.subjects import check_namespace


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True)

    nats_url: str = Field(default="nats://127.0.0.1:4222", alias="AOS_NATS_URL")
    namespace: str = Field(
        default="aos",
        alias="AOS_NAMESPACE",
        description="subject prefix and stream-name prefix; tests sharing a server use their own",
    )
    http_host: str = Field(default="0.0.0.0", alias="AOS_HTTP_HOST")
    http_port: int = Field(default=8080, alias="AOS_HTTP_PORT")
    log_level: str = Field(default="INFO", alias="AOS_LOG_LEVEL")
    ack_wait_s: float = Field(
        default=30.0,
        alias="AOS_ACK_WAIT_S",
        gt=0,
        description="seconds before an unacknowledged message is redelivered (a handler "
        "still at work reports progress, up to AOS_MAX_HANDLING_S)",
    )
    max_handling_s: float = Field(
        default=600.0,
        alias="AOS_MAX_HANDLING_S",
        gt=0,
        description="how long a handler may hold a batch by reporting progress; then the "
        "batch is redelivered as if the handler had died",
    )
    consumer_batch: int = Field(default=256, alias="AOS_CONSUMER_BATCH", ge=1, le=10_000)
    outage_give_up_s: float = Field(
        default=300.0,
        alias="AOS_OUTAGE_GIVE_UP_S",
        gt=0,
        description="how long a message whose handling fails because PostgreSQL, Redis or "
        "NATS is down is retried before the run is ended with DEPENDENCY_UNAVAILABLE "
        "(planner, executor); the ledger and the tracer wait for the dependency however long",
    )
    prometheus_available: bool | None = Field(
        default=None,
        alias="PROMETHEUS_AVAILABLE",
        description="unset: auto-detect prometheus-client",
    )

    # --- security (aos_plumbing.auth; docs/OPERATIONS.md, Security) --------------------
    jwt_verify_signature: bool = Field(
        default=False,
        alias="JWT_VERIFY_SIGNATURE",
        description="require a signed JWT on goals and cancels (and on the tracer's API)",
    )
    rbac_enforce: bool = Field(
        default=False, alias="RBAC_ENFORCE", description="enforce the token's roles"
    )
    jwt_secret: SecretStr | None = Field(
        default=None, alias="AOS_JWT_SECRET", description="HS256 key"
    )
    jwt_jwks_file: Path | None = Field(
        default=None,
        alias="AOS_JWT_JWKS_FILE",
        description="RS256/ES256 public keys: a JWKS JSON file or one PEM public key",
    )
    jwt_audience: str | None = Field(
        default=None, alias="AOS_JWT_AUDIENCE", description="set: tokens must name it in aud"
    )
    jwt_issuer: str | None = Field(
        default=None, alias="AOS_JWT_ISSUER", description="set: tokens must have this iss"
    )
    jwt_leeway_s: float = Field(default=30.0, ge=0, alias="AOS_JWT_LEEWAY_S")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return check_namespace(value)
