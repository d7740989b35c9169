"""The ledger's budget queries under JWT_VERIFY_SIGNATURE and RBAC_ENFORCE: a tenant
reads its own budgets only, with the `read` role, as it reads its runs in the tracer."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt

from aos_ledger.store import BudgetStore
from tests.ledger.harness import TENANT, LedgerFactory

SECRET = "ledger-test-secret-" + uuid.uuid4().hex


def token(tenant: str, roles: tuple[str, ...] = ("read",)) -> dict[str, str]:
    claims: dict[str, Any] = {
        "sub": f"user-of-{tenant}",
        "tenant": tenant,
        "roles": list(roles),
        "exp": datetime.now(UTC) + timedelta(minutes=5),
    }
    return {"Authorization": f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"}


async def test_budgets_are_read_by_their_own_tenant_with_the_read_role(
    store: BudgetStore, ledger_process: LedgerFactory
) -> None:
    run_id = uuid.uuid4()
    await store.open_budget(run_id, TENANT, 40)
    ledger = ledger_process(JWT_VERIFY_SIGNATURE="true", RBAC_ENFORCE="true", AOS_JWT_SECRET=SECRET)
    await asyncio.to_thread(ledger.start)
    run_path, tenant_path = f"/budgets/runs/{run_id}", f"/budgets/tenants/{TENANT}"
    async with httpx.AsyncClient(base_url=ledger.url) as client:
        mine = await client.get(run_path, headers=token(TENANT))
        assert mine.status_code == 200, mine.text
        assert (mine.json()["tenant"], mine.json()["cap_cents"]) == (TENANT, 40)
        assert (await client.get(tenant_path, headers=token(TENANT))).status_code == 200

        anonymous = await client.get(run_path)
        assert anonymous.status_code == 401 and "bearer token" in anonymous.json()["error"]
        no_role = await client.get(tenant_path, headers=token(TENANT, roles=("submit",)))
        assert no_role.status_code == 403 and "lacks role 'read'" in no_role.json()["error"]

        # Another tenant: refused on the tenant's budget, and the run is not even known.
        other = token("other")
        refused = await client.get(tenant_path, headers=other)
        assert refused.status_code == 403 and "not 'acme'" in refused.json()["error"]
        hidden = await client.get(run_path, headers=other)
        assert hidden.status_code == 404
        assert (await client.get("/budgets/tenants/other", headers=other)).status_code == 200
