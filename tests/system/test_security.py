"""Security end to end: JWTs on goals and cancels, roles, tenant isolation through the
tracer's API and the CLI, and secrets that never reach a log or a trace.

One system runs with JWT_VERIFY_SIGNATURE=true, RBAC_ENFORCE=true and Claude configured
(ANTHROPIC_API_KEY, pointed at a Messages API server on loopback), as a deployment would.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
from nats.aio.client import Client

from aos_cli.client import publish_request
from aos_cli.embedded import InfraUrls
from aos_contracts.codec import encode_event, event_headers
from aos_contracts.events import GoalSubmitted, RunCancelRequested
from aos_contracts.subjects import PARKED, goal_subject, stream_name
from tests.executor.messages_api import MessagesApi
from tests.support.bus import RunWatcher, connected, read_stream
from tests.system.conftest import System, aos, make_system

pytestmark = pytest.mark.integration

JWT_SECRET = "jwt-secret-" + uuid.uuid4().hex  # unique: found in a log only if leaked
API_KEY = "sk-ant-test-" + uuid.uuid4().hex
AUDIENCE = "aos-test"


def token(tenant: str = "acme", roles: tuple[str, ...] = ("submit",), **claims: Any) -> str:
    body: dict[str, Any] = {
        "sub": f"user-of-{tenant}",
        "tenant": tenant,
        "roles": list(roles),
        "aud": AUDIENCE,
        "exp": datetime.now(UTC) + timedelta(minutes=10),
        "jti": uuid.uuid4().hex,  # every token distinct, so each can be looked for
    }
    body.update(claims)
    return jwt.encode(body, JWT_SECRET, algorithm="HS256")


@pytest.fixture
async def claude() -> AsyncIterator[MessagesApi]:
    api = await MessagesApi().start()
    yield api
    await api.stop()


@pytest.fixture
async def secured(
    infra: InfraUrls, namespace: str, database: str, log_dir: Path, claude: MessagesApi
) -> AsyncIterator[System]:
    services = make_system(
        infra,
        namespace,
        database,
        log_dir,
        {
            "AOS_LOG_LEVEL": "DEBUG",  # the most a service ever says
            "JWT_VERIFY_SIGNATURE": "true",
            "RBAC_ENFORCE": "true",
            "AOS_JWT_SECRET": JWT_SECRET,
            "AOS_JWT_AUDIENCE": AUDIENCE,
            "ANTHROPIC_API_KEY": API_KEY,
            "ANTHROPIC_BASE_URL": claude.base_url,
            "AOS_SKILL_ROLES": '{"http_call": "skill:http"}',
        },
    )
    try:
        for service in services.all:
            # In a thread: the Messages API answers the executor's readiness probe from
            # this event loop.
            await asyncio.to_thread(service.start)
        yield services
    finally:
        for service in services.all:
            service.stop()


def goal(text: str = "bench 1", tenant: str = "acme", **fields: Any) -> GoalSubmitted:
    return GoalSubmitted(
        run_id=uuid.uuid4(),
        tenant=tenant,
        goal=text,
        budget_cents=fields.pop("budget", 5),
        **fields,
    )


async def submit(nc: Client, system: System, submitted: GoalSubmitted, bearer: str | None) -> str:
    await publish_request(nc, system.namespace, submitted, bearer)
    return str(submitted.run_id)


async def cancel(nc: Client, system: System, run_id: str, bearer: str) -> None:
    request = RunCancelRequested(run_id=uuid.UUID(run_id), tenant="acme", reason="stop it")
    headers = {**event_headers(request), "Authorization": f"Bearer {bearer}"}
    await nc.jetstream().publish(
        goal_subject("acme", request.run_id, system.namespace),
        encode_event(request),
        headers=headers,
    )


async def ledger_caught_up(nc: Client, system: System) -> None:
    """Until the ledger has handled every goal in the log (acknowledged, none pending)."""
    for _ in range(200):
        info = await nc.jetstream().consumer_info(stream_name("goals", system.namespace), "ledger")
        if not info.num_pending and not info.num_ack_pending:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the ledger did not catch up with the goals")


async def test_goals_need_a_valid_token_of_their_tenant_with_the_submit_role(
    secured: System,
) -> None:
    system = secured
    refused = {
        "no token": (None, "UNAUTHORIZED", "no bearer token"),
        "expired": (
            token(exp=datetime.now(UTC) - timedelta(minutes=5)),
            "UNAUTHORIZED",
            "expired",
        ),
        "forged": (
            jwt.encode(
                {"tenant": "acme", "roles": ["submit"], "aud": AUDIENCE, "exp": 4102444800},
                "not-the-secret-0123456789-0123456789",
                algorithm="HS256",
            ),
            "UNAUTHORIZED",
            "bad signature",
        ),
        "audience": (token(aud="someone-else"), "UNAUTHORIZED", "wrong audience"),
        "other tenant": (token("globex"), "FORBIDDEN", "tenant mismatch"),
        "no role": (token(roles=("read",)), "FORBIDDEN", "lacks role 'submit'"),
    }
    async with connected(system.nats_url) as nc, RunWatcher(nc, system.namespace) as watcher:
        ids = {
            name: await submit(nc, system, goal(), bearer) for name, (bearer, *_) in refused.items()
        }
        good = await submit(nc, system, goal(), token())
        ends = await watcher.wait([*ids.values(), good])
        await ledger_caught_up(nc, system)
        plans = await read_stream(nc, system.namespace, "plans")
        budget = await read_stream(nc, system.namespace, "budget")

    assert ends[good]["type"] == "run.completed"
    for name, (_bearer, code, words) in refused.items():
        end = ends[ids[name]]
        assert end["type"] == "run.failed", name
        assert end["error"]["code"] == code, name
        assert words in end["error"]["message"], (name, end["error"]["message"])
    refused_ids = set(ids.values())
    # Refused at the door: no run accepted, no budget opened, nothing reserved or spent.
    assert not [p for p in plans if p["run_id"] in refused_ids and p["type"] != "plan.rejected"]
    assert not [b for b in budget if b["run_id"] in refused_ids]
    assert any(b["run_id"] == good and b["type"] == "budget.opened" for b in budget)
    reader = {"Authorization": f"Bearer {token(roles=('read',))}"}
    async with httpx.AsyncClient(base_url=system.ledger.url, headers=reader) as ledger:
        for run_id in refused_ids:
            assert (await ledger.get(f"/budgets/runs/{run_id}")).status_code == 404
        assert (await ledger.get(f"/budgets/runs/{good}")).status_code == 200

    async with httpx.AsyncClient() as client:
        ready = (await client.get(f"{system.planner.url}/readyz")).json()
    assert ready["backends"]["auth"] == "jwt:HS256" and ready["backends"]["rbac"] == "enforced"


async def test_cancels_need_the_cancel_role_and_refusals_are_parked(secured: System) -> None:
    system = secured
    system.executor.kill()  # the plans wait in the log; the cancels land before any step
    async with connected(system.nats_url) as nc, RunWatcher(nc, system.namespace) as watcher:
        kept = await submit(nc, system, goal("bench 2"), token())
        stopped = await submit(nc, system, goal("bench 2"), token())
        for _ in range(100):
            plans = await read_stream(nc, system.namespace, "plans")
            if {kept, stopped} <= {p["run_id"] for p in plans if p["type"] == "plan.created"}:
                break
            await asyncio.sleep(0.1)
        await cancel(nc, system, kept, token(roles=("submit",)))  # no cancel role
        await cancel(nc, system, kept, token("globex", roles=("cancel",)))  # another tenant
        await cancel(nc, system, stopped, token(roles=("cancel",)))
        # The restarted executor rebuilds from the log (which holds the refused cancels)
        # and then consumes them live: neither path applies them.
        await asyncio.to_thread(system.executor.start)
        ends = await watcher.wait([kept, stopped])
        for _ in range(100):
            parked = await read_stream(nc, system.namespace, PARKED)
            if len(parked) >= 2:
                break
            await asyncio.sleep(0.1)
    assert ends[kept]["type"] == "run.completed"
    assert ends[stopped]["type"] == "run.cancelled"
    reasons = sorted(p["reason"] for p in parked)
    assert len(reasons) == 2
    assert any("cancel refused (FORBIDDEN): the token lacks role 'cancel'" in r for r in reasons)
    assert any("cancel refused (FORBIDDEN): tenant mismatch" in r for r in reasons)
    for message in parked:
        assert message["headers"]["Authorization"] == "<redacted>"


async def test_a_tenant_reads_only_its_own_runs_through_the_api_and_the_cli(
    secured: System,
) -> None:
    system = secured
    async with connected(system.nats_url) as nc, RunWatcher(nc, system.namespace) as watcher:
        acme = await submit(nc, system, goal(), token())
        globex = await submit(nc, system, goal(tenant="globex"), token("globex"))
        await watcher.wait([acme, globex])
    reader = token(roles=("read",))
    async with httpx.AsyncClient(base_url=system.tracer.url, timeout=10.0) as api:

        async def get(path: str, bearer: str | None) -> httpx.Response:
            headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
            return await api.get(path, headers=headers)

        for _ in range(100):  # until the tracer has stored both runs
            listed = (await get("/runs", token("globex", roles=("read",)))).json()["runs"]
            mine = (await get("/runs", reader)).json()["runs"]
            if listed and mine:
                break
            await asyncio.sleep(0.1)
        assert [run["run_id"] for run in mine] == [acme]
        assert [run["run_id"] for run in listed] == [globex]
        assert (await get(f"/runs/{acme}", reader)).status_code == 200
        assert (await get(f"/runs/{globex}", reader)).status_code == 404
        assert (await get(f"/runs/{globex}/timeline", reader)).status_code == 404
        assert (await get(f"/runs/{globex}/golden", reader)).status_code == 404
        assert (await get("/runs?tenant=globex", reader)).status_code == 403
        assert (await get("/runs", None)).status_code == 401
        assert (await get("/runs", token(roles=("submit",)))).status_code == 403
        assert (await get("/parked", reader)).status_code == 403
        assert (await get("/parked", token(roles=("admin",)))).status_code == 200

    listed_cli = await asyncio.to_thread(aos, system, "runs", "--json", bearer=reader)
    assert listed_cli.returncode == 0, listed_cli.stderr
    assert [run["run_id"] for run in json.loads(listed_cli.stdout)["runs"]] == [acme]
    other = await asyncio.to_thread(aos, system, "run", "show", globex, bearer=reader)
    assert other.returncode == 2 and f"unknown run {globex}" in other.stderr
    anonymous = await asyncio.to_thread(aos, system, "runs")
    assert anonymous.returncode == 2 and "AOS_TOKEN" in anonymous.stderr
    submitted = await asyncio.to_thread(
        aos, system, "goal", "submit", "bench 1", "--tenant", "acme", "--budget-cents", "5",
        "--wait", "--token", token(),
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr


async def test_secrets_never_reach_a_log_or_a_trace(
    secured: System, claude: MessagesApi, database: str, log_dir: Path
) -> None:
    system = secured
    bearer = token(roles=("submit", "cancel", "read"))
    async with connected(system.nats_url) as nc, RunWatcher(nc, system.namespace) as watcher:
        run_id = await submit(
            nc,
            system,
            goal("summarize the notes", budget=100, inputs={"text": "AOS plans and runs goals."}),
            bearer,
        )
        refused = await submit(nc, system, goal(), token(roles=("read",)))
        ends = await watcher.wait([run_id, refused])
        await cancel(nc, system, run_id, bearer)  # after the end: parked? no, ignored
    assert ends[run_id]["type"] == "run.completed", ends[run_id]
    assert claude.requests, "the run must have used Claude (and so the API key)"
    assert any(API_KEY in " ".join(h.values()) for h in claude.headers), claude.headers
    async with httpx.AsyncClient() as client:
        ready = (await client.get(f"{system.executor.url}/readyz")).json()
    assert ready["advisories"]["anthropic"] is True and ready["degraded"] == {}

    async with httpx.AsyncClient(base_url=system.tracer.url) as api:
        for _ in range(100):
            stored = await api.get(f"/runs/{run_id}", headers={"Authorization": f"Bearer {bearer}"})
            if stored.status_code == 200 and stored.json()["run"].get("ended_at"):
                break
            await asyncio.sleep(0.1)
    traced = stored.text

    conn = await asyncpg.connect(database)
    try:
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
        rows = []
        for table in tables:
            name = table["table_name"]
            rows += [str(dict(r)) for r in await conn.fetch(f'SELECT * FROM "{name}"')]
    finally:
        await conn.close()
    database_text = "\n".join(rows)
    assert str(run_id) in database_text  # the trace is there ...

    for service in system.all:
        service.stop()  # flush and close every log
    logs = await asyncio.to_thread(lambda: {p.name: p.read_text() for p in log_dir.glob("*.log")})
    assert set(logs) >= {"planner.log", "executor.log", "ledger.log", "tracer.log"}
    assert "goal refused" in logs["planner.log"]  # refusals are logged, with reasons ...
    secrets = {"api key": API_KEY, "jwt secret": JWT_SECRET, "token": bearer}
    for what, secret in secrets.items():  # ... and no secret anywhere
        for name, text in logs.items():
            assert secret not in text, f"{what} in {name}"
        assert secret not in traced, f"{what} in the traced run"
        assert secret not in database_text, f"{what} in the tracer's database"
    # nor the signature part of the token (the part that makes it usable)
    signature = bearer.rsplit(".", 1)[1]
    assert all(signature not in text for text in [*logs.values(), traced, database_text])


async def test_a_plan_may_use_only_the_skills_the_token_has_roles_for(
    secured: System,
) -> None:
    system = secured
    fetch = "fetch https://api.example.com/notes.json"
    async with connected(system.nats_url) as nc, RunWatcher(nc, system.namespace) as watcher:
        refused = await submit(nc, system, goal(fetch), token())
        allowed = await submit(nc, system, goal(fetch), token(roles=("submit", "skill:http")))
        ends = await watcher.wait([refused, allowed])
        plans = await read_stream(nc, system.namespace, "plans")
    end = ends[refused]
    assert end["type"] == "run.failed" and end["error"]["code"] == "FORBIDDEN"
    assert "step 'fetch' uses http_call, which needs role 'skill:http'" in (end["error"]["message"])
    decided = {p["run_id"]: p["type"] for p in plans if p["type"].startswith("plan.")}
    assert decided == {refused: "plan.rejected", allowed: "plan.created"}
