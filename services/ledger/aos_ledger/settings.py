from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from aos_plumbing.settings import CommonSettings


class LedgerSettings(CommonSettings):
    http_port: int = Field(default=8103, alias="AOS_HTTP_PORT")
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", alias="REDIS_URL")
    tenant_cap_cents: int | None = Field(
        default=None,
        ge=0,
        alias="AOS_TENANT_CAP_CENTS",
        description="default cap on a tenant's spend per period; unset: no tenant cap",
    )
    tenant_period: Literal["day", "month"] = Field(
        default="month",
        alias="AOS_TENANT_PERIOD",
        description="the period a tenant cap applies to (UTC days or calendar months)",
    )
    tenant_caps: dict[str, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict,
        alias="AOS_TENANT_CAPS",
        description='per-tenant caps overriding the default, as JSON: {"acme": 50000}',
    )
    reservation_ttl_s: float = Field(
        default=3600.0,
        gt=0,
        alias="AOS_RESERVATION_TTL_S",
        description="a reservation never committed is released this long after its grant",
    )
    expiry_sweep_s: float = Field(
        default=1.0,
        gt=0,
        alias="AOS_RESERVATION_SWEEP_S",
        description="how often each ledger looks for expired reservations",
    )

    def tenant_cap(self, tenant: str) -> int | None:
        """The tenant's cap per period: its override, else the default (None: no cap)."""
        return self.tenant_caps.get(tenant, self.tenant_cap_cents)
