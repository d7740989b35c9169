"""infra/nats/nats-server.conf on a real nats-server: each service writes only its own
context of the log, and a tenant publishes only its own goals and reads only its own runs.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from aos_cli.embedded import nats_server_binary
from aos_contracts import GoalSubmitted, encode_event, event_headers
from aos_contracts.subjects import goal_subject
from aos_plumbing.bus import EventBus
from tests.infra.tools import INFRA
from tests.support.processes import free_port

pytestmark = pytest.mark.integration

USERS = ("planner", "executor", "ledger", "tracer", "sys")
TENANTS = ("acme", "globex")


def _password(user: str) -> str:
    return f"secret-{user}"


@pytest.fixture
def secured_nats(tmp_path: Path) -> Iterator[int]:
    """A private nats-server running the committed configuration on a free port."""
    env = {f"NATS_{user.upper()}_PASSWORD": _password(user) for user in USERS}
    env |= {f"NATS_TENANT_{t.upper()}_PASSWORD": _password(t) for t in TENANTS}
    # The committed file as it is, but for where JetStream keeps its files.
    config = tmp_path / "nats-server.conf"
    committed = (INFRA / "nats" / "nats-server.conf").read_text()
    assert "store_dir: /data/jetstream" in committed
    config.write_text(committed.replace("/data/jetstream", str(tmp_path / "js")))
    port = free_port()
    log_path = tmp_path / "nats.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [
            nats_server_binary(),
            "-c", str(config),
            "-a", "127.0.0.1", "-p", str(port), "-m", str(free_port()),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        while "Server is ready" not in log_path.read_text(errors="replace"):
            if proc.poll() is not None:
                pytest.fail(f"nats-server refused the configuration:\n{log_path.read_text()}")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@dataclass
class Session:
    nc: Client
    errors: list[str] = field(default_factory=list)

    async def violation(self, fragment: str) -> str:
        """The permissions violation the server reported about `fragment`."""
        while True:
            for error in self.errors:
                if "permissions violation" in error.lower() and fragment in error:
                    return error
            await asyncio.sleep(0.05)


@pytest.fixture
async def connect(secured_nats: int) -> AsyncIterator[object]:
    sessions: list[Session] = []

    async def connect_as(user: str) -> Session:
        session = Session(nc=None)  # type: ignore[arg-type]

        async def on_error(exc: Exception) -> None:
            session.errors.append(str(exc))

        for attempt in range(50):  # the server may still be starting
            try:
                session.nc = await nats.connect(
                    f"nats://{user}:{_password(user)}@127.0.0.1:{secured_nats}",
                    error_cb=on_error,
                    inbox_prefix=f"_INBOX_{user}" if user in TENANTS else "_INBOX",
                    allow_reconnect=False,
                )
                break
            except (OSError, nats.errors.NoServersError):
                if attempt == 49:
                    raise
                await asyncio.sleep(0.1)
        sessions.append(session)
        return session

    yield connect_as
    for session in sessions:
        if not session.nc.is_closed:
            await session.nc.close()


def _goal(tenant: str) -> GoalSubmitted:
    return GoalSubmitted(run_id=uuid.uuid4(), tenant=tenant, goal="summarize", budget_cents=5)


async def _streams_ready(port: int) -> None:
    url = f"nats://planner:{_password('planner')}@127.0.0.1:{port}"
    bus = await EventBus.connect(url, "aos", "planner")
    try:
        await bus.ensure_streams()  # a service may declare the log's streams
    finally:
        await bus.close()


async def test_a_tenant_publishes_its_own_goals_and_nothing_else(
    connect, secured_nats: int
) -> None:
    await _streams_ready(secured_nats)
    acme = await connect("acme")
    js = acme.nc.jetstream()

    own = _goal("acme")
    ack = await js.publish(
        goal_subject("acme", own.run_id), encode_event(own), headers=event_headers(own)
    )
    assert ack.stream == "AOS_GOALS"

    other = _goal("globex")
    foreign = goal_subject("globex", other.run_id)
    await acme.nc.publish(foreign, encode_event(other))
    assert "publish" in await asyncio.wait_for(acme.violation(foreign), 10)
    # Nor can it forge the services' events about its own runs.
    forged = f"aos.runs.acme.{own.run_id}"
    await acme.nc.publish(forged, b"{}")
    await asyncio.wait_for(acme.violation(forged), 10)

    executor = await connect("executor")
    info = await executor.nc.jetstream().stream_info("AOS_GOALS")
    assert info.state.messages == 1  # only acme's own goal got into the log
    assert (await executor.nc.jetstream().stream_info("AOS_RUNS")).state.messages == 0


async def test_a_tenant_cannot_read_another_tenants_runs(connect, secured_nats: int) -> None:
    await _streams_ready(secured_nats)
    acme = await connect("acme")
    globex = await connect("globex")
    executor = await connect("executor")

    mine = await acme.nc.subscribe("aos.runs.acme.>")
    spying = await acme.nc.subscribe("aos.runs.globex.>")
    everything = await acme.nc.subscribe("aos.runs.>")
    await asyncio.wait_for(acme.violation("aos.runs.globex.>"), 10)
    await asyncio.wait_for(acme.violation('"aos.runs.>"'), 10)
    theirs = await globex.nc.subscribe("aos.runs.globex.>")
    # The server must have both subscriptions before anything is published.
    await globex.nc.flush()
    await acme.nc.flush()

    await executor.nc.publish("aos.runs.globex.r1", b"globex's run")
    await executor.nc.publish("aos.runs.acme.r2", b"acme's run")
    await executor.nc.flush()

    assert (await theirs.next_msg(timeout=5)).data == b"globex's run"
    assert (await mine.next_msg(timeout=5)).data == b"acme's run"
    for refused in (spying, everything):
        with pytest.raises(nats.errors.TimeoutError):
            await refused.next_msg(timeout=0.5)


@pytest.mark.parametrize(
    ("service", "own", "foreign"),
    [
        ("planner", "aos.plans.acme.r1", "aos.runs.acme.r1"),
        ("executor", "aos.runs.acme.r1", "aos.budget.acme.r1"),
        ("ledger", "aos.budget.acme.r1", "aos.plans.acme.r1"),
        ("tracer", "aos.parked.tracer", "aos.goals.acme.r1"),
    ],
)
async def test_a_service_writes_only_its_own_context(
    connect, secured_nats: int, service: str, own: str, foreign: str
) -> None:
    await _streams_ready(secured_nats)
    session = await connect(service)
    js = session.nc.jetstream()
    assert (await js.publish(own, b"{}")).seq == 1
    await session.nc.publish(foreign, b"{}")
    await asyncio.wait_for(session.violation(foreign), 10)
