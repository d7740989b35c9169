"""infra/nats/nats-server.conf on a real nats-server, line by line: only the owning service
writes each context of the log, a tenant publishes only goals and cancels of its own and
reads only its own runs, and the four services, each with its own user, run a goal to its
end (live progress included) under that file.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
from aiohttp import web
from nats.aio.client import Client

from aos_cli.client import inbox_prefix
from aos_cli.embedded import InfraUrls, nats_server_binary
from aos_contracts import GoalSubmitted, RunCancelRequested, encode_event, event_headers
from aos_contracts.progress import progress_subject
from aos_contracts.subjects import goal_subject
from aos_plumbing.bus import EventBus
from tests.infra.tools import INFRA
from tests.support.http import serve_on_loopback
from tests.support.processes import free_port
from tests.system.conftest import System, aos, make_system

pytestmark = pytest.mark.integration

SERVICES = ("planner", "executor", "ledger", "tracer")
TENANTS = ("acme", "globex")
# The committed config's subjects assume this namespace.
NS = "aos"


def _password(user: str) -> str:
    return f"secret-{user}"


@dataclass(frozen=True)
class SecuredNats:
    port: int

    def url(self, user: str) -> str:
        return f"nats://{user}:{_password(user)}@127.0.0.1:{self.port}"


@pytest.fixture
def secured_nats(tmp_path: Path) -> Iterator[SecuredNats]:
    """A private nats-server running the committed configuration on a free port."""
    env = {f"NATS_{user.upper()}_PASSWORD": _password(user) for user in (*SERVICES, "sys")}
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
        deadline = time.monotonic() + 30
        while "Server is ready" not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"nats-server did not start:\n{log_path.read_text()}")
            time.sleep(0.05)
        yield SecuredNats(port)
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
                # nats-py reports the server's error in lower case.
                if "permissions violation" in error and fragment.lower() in error:
                    return error
            await asyncio.sleep(0.05)

    async def refused(self, fragment: str) -> str:
        try:
            return await asyncio.wait_for(self.violation(fragment), 10)
        except TimeoutError:
            raise AssertionError(f"no violation about {fragment}; errors: {self.errors}") from None


@pytest.fixture
async def connect(secured_nats: SecuredNats) -> AsyncIterator[Any]:
    sessions: list[Session] = []

    async def connect_as(user: str) -> Session:
        session = Session(nc=None)  # type: ignore[arg-type]

        async def on_error(exc: Exception) -> None:
            session.errors.append(str(exc).lower())

        url = secured_nats.url(user)
        # Services keep nats-py's default inbox; a tenant's replies come to its own.
        prefix = inbox_prefix(url) if user in TENANTS else "_INBOX"
        session.nc = await nats.connect(
            url, error_cb=on_error, inbox_prefix=prefix, allow_reconnect=False
        )
        sessions.append(session)
        return session

    await _streams_ready(secured_nats)
    yield connect_as
    for session in sessions:
        if not session.nc.is_closed:
            await session.nc.close()


async def _streams_ready(nats_server: SecuredNats) -> None:
    bus = await EventBus.connect(nats_server.url("planner"), NS, "planner")
    try:
        await bus.ensure_streams()  # a service may declare the log's streams
    finally:
        await bus.close()


def _goal(tenant: str) -> GoalSubmitted:
    return GoalSubmitted(run_id=uuid.uuid4(), tenant=tenant, goal="summarize", budget_cents=5)


async def _nothing_arrives(sub: Any) -> None:
    with pytest.raises(nats.errors.TimeoutError):
        await sub.next_msg(timeout=0.5)


# --- tenants: publish ------------------------------------------------------------------


async def test_a_tenant_publishes_goals_and_cancels_on_its_own_subject(connect) -> None:
    acme = await connect("acme")
    js = acme.nc.jetstream()
    own = _goal("acme")
    subject = goal_subject("acme", own.run_id)
    ack = await js.publish(subject, encode_event(own), headers=event_headers(own))
    assert ack.stream == "AOS_GOALS"  # the ack reached the tenant's own inbox
    cancel = RunCancelRequested(run_id=own.run_id, tenant="acme", reason="changed my mind")
    ack = await js.publish(subject, encode_event(cancel), headers=event_headers(cancel))
    assert ack.seq == 2
    assert acme.errors == []


@pytest.mark.parametrize(
    "subject",
    [
        "aos.goals.globex.r1",  # another tenant's goals
        "aos.plans.acme.r1",  # the services' contexts, even about its own runs
        "aos.runs.acme.r1",
        "aos.budget.acme.r1",
        "aos.progress.acme.r1",
        "aos.parked.planner",
        "aos.goals.acme.r1.extra",  # not a run subject
        "$JS.ACK.AOS_GOALS.executor.1.1.1.1.0",  # acknowledging the services' messages
    ],
)
async def test_a_tenant_publishes_nothing_else(connect, subject: str) -> None:
    acme = await connect("acme")
    await acme.nc.publish(subject, b"{}")
    assert "publish" in (await acme.refused(subject)).lower()
    executor = await connect("executor")
    for stream in ("AOS_GOALS", "AOS_PLANS", "AOS_RUNS", "AOS_BUDGET", "AOS_PARKED"):
        assert (await executor.nc.jetstream().stream_info(stream)).state.messages == 0


# --- tenants: read ---------------------------------------------------------------------


async def test_a_tenant_reads_every_context_of_its_own_runs(connect) -> None:
    acme = await connect("acme")
    mine = await acme.nc.subscribe("aos.*.acme.>")  # what `aos goal submit --wait` does
    await acme.nc.flush()
    writers = {
        "planner": "aos.plans.acme.r1",  # incl. request.refused answers to its goals
        "executor": "aos.runs.acme.r1",
        "ledger": "aos.budget.acme.r1",
    }
    for writer, subject in writers.items():
        session = await connect(writer)
        await session.nc.publish(subject, subject.encode())
        await session.nc.flush()
    executor = await connect("executor")
    await executor.nc.publish(progress_subject("acme", "r1"), b"aos.progress.acme.r1")
    await executor.nc.flush()
    got = {(await mine.next_msg(timeout=5)).data.decode() for _ in range(4)}
    assert got == {*writers.values(), "aos.progress.acme.r1"}
    assert acme.errors == []


@pytest.mark.parametrize(
    "subject",
    [
        "aos.*.globex.>",
        "aos.runs.globex.>",
        "aos.progress.globex.>",
        "aos.plans.globex.>",
        "aos.runs.>",
        "aos.>",
        ">",
        # Replies to the services: their pull consumers' fetches carry every event.
        "_INBOX.>",
        "_INBOX_globex.>",
        "$JS.API.>",
    ],
)
async def test_a_tenant_cannot_read_another_tenants_events(connect, subject: str) -> None:
    acme = await connect("acme")
    spying = await acme.nc.subscribe(subject)
    await acme.refused(f'"{subject}"')
    globex = await connect("globex")
    theirs = await globex.nc.subscribe("aos.*.globex.>")
    await globex.nc.flush()
    executor = await connect("executor")
    await executor.nc.publish("aos.runs.globex.r1", b"globex's run")
    await executor.nc.publish("aos.progress.globex.r1", b"globex's progress")
    await executor.nc.flush()
    assert (await theirs.next_msg(timeout=5)).data == b"globex's run"
    await _nothing_arrives(spying)


async def test_a_tenant_gets_the_last_event_of_its_own_runs_only(connect) -> None:
    executor = await connect("executor")
    js = executor.nc.jetstream()
    await js.publish("aos.runs.globex.r1", b"globex's run")
    await js.publish("aos.runs.acme.r2", b"acme's run")
    acme = await connect("acme")
    acme_js = acme.nc.jetstream()
    # What the CLI does to see whether a resubmitted goal's run has already ended.
    own = await acme_js.get_last_msg("AOS_RUNS", "aos.runs.acme.r2", direct=True)
    assert own.data == b"acme's run"
    # And what it does before a cancel: has acme a goal, and the planner's answer, for it?
    planner = await connect("planner")
    await planner.nc.jetstream().publish("aos.plans.acme.r2", b"acme's plan")
    await planner.nc.jetstream().publish("aos.plans.globex.r1", b"globex's plan")
    plan = await acme_js.get_last_msg("AOS_PLANS", "aos.plans.acme.r2", direct=True)
    assert plan.data == b"acme's plan"
    with pytest.raises(nats.errors.Error):
        await acme_js.get_last_msg("AOS_PLANS", "aos.plans.globex.r1", direct=True)
    await acme_js.publish("aos.goals.acme.r2", b"acme's goal")
    goal = await acme_js.get_last_msg("AOS_GOALS", "aos.goals.acme.r2", direct=True)
    assert goal.data == b"acme's goal"

    # Another tenant's subject, the same by sequence, or through the non-direct API.
    with pytest.raises(nats.errors.Error):
        await acme_js.get_last_msg("AOS_RUNS", "aos.runs.globex.r1", direct=True)
    await acme.refused("$JS.API.DIRECT.GET.AOS_RUNS.aos.runs.globex.r1")
    with pytest.raises(nats.errors.Error):
        await acme_js.get_msg("AOS_RUNS", seq=1, direct=True)
    await acme.refused('"$JS.API.DIRECT.GET.AOS_RUNS"')
    with pytest.raises(nats.errors.Error):
        await acme_js.get_msg("AOS_RUNS", seq=1)
    await acme.refused("$JS.API.STREAM.MSG.GET.AOS_RUNS")

    # A body asking for sequence 1 (globex's) on its own last-by-subject form: the
    # server answers by the subject in the request's subject, or not at all.
    reply = await acme.nc.request(
        "$JS.API.DIRECT.GET.AOS_RUNS.aos.runs.acme.r2", json.dumps({"seq": 1}).encode(), timeout=5
    )
    assert reply.data != b"globex's run"


async def test_a_tenant_creates_no_consumer_and_reads_none_of_the_services(connect) -> None:
    """A consumer filtered on the tenant's own subjects would be harmless, but its messages
    are then fetched with CONSUMER.MSG.NEXT by consumer name, and a name cannot be
    confined to a tenant in a permission: so tenants get no consumer API at all."""
    globex = await connect("globex")
    await globex.nc.jetstream().publish("aos.goals.globex.r1", b"globex's goal")
    acme = await connect("acme")
    js = acme.nc.jetstream()
    with pytest.raises(nats.errors.Error):
        await js.pull_subscribe("aos.goals.acme.*", durable="mine", stream="AOS_GOALS")
    await acme.refused("$JS.API.CONSUMER")
    # Not even filtered on its own subjects (the API form with the filter in the subject).
    filtered = "$JS.API.CONSUMER.CREATE.AOS_GOALS.mine.aos.goals.acme.*"
    await acme.nc.publish(filtered, b'{"stream_name":"AOS_GOALS","config":{}}')
    await acme.refused(filtered)
    # Nor take the executor's durable consumer's messages.
    next_msg = "$JS.API.CONSUMER.MSG.NEXT.AOS_GOALS.executor"
    await acme.nc.publish(next_msg, b'{"batch":1}')
    await acme.refused(next_msg)
    executor = await connect("executor")
    info = await executor.nc.jetstream().stream_info("AOS_GOALS")
    assert info.state.consumer_count == 0


# --- services --------------------------------------------------------------------------

OWNED = {
    "planner": ["aos.plans.acme.r1", "aos.parked.planner"],
    "executor": ["aos.runs.acme.r1", "aos.parked.executor"],
    "ledger": ["aos.budget.acme.r1", "aos.parked.ledger"],
    "tracer": ["aos.parked.tracer"],
}
LOG_SUBJECTS = [
    "aos.goals.acme.r1",
    "aos.plans.acme.r1",
    "aos.runs.acme.r1",
    "aos.budget.acme.r1",
    *(f"aos.parked.{service}" for service in SERVICES),
]


@pytest.mark.parametrize("service", SERVICES)
async def test_a_service_writes_only_its_own_context(connect, service: str) -> None:
    session = await connect(service)
    js = session.nc.jetstream()
    for subject in OWNED[service]:
        assert (await js.publish(subject, b"{}")).seq == 1
    for foreign in (s for s in LOG_SUBJECTS if s not in OWNED[service]):
        await session.nc.publish(foreign, b"{}")
        await session.refused(foreign)


@pytest.mark.parametrize("service", SERVICES)
async def test_only_the_executor_publishes_live_progress(connect, service: str) -> None:
    acme = await connect("acme")
    progress = await acme.nc.subscribe("aos.progress.acme.>")
    await acme.nc.flush()
    session = await connect(service)
    subject = progress_subject("acme", "r1")
    await session.nc.publish(subject, b"chunk")
    await session.nc.flush()
    if service == "executor":
        assert (await progress.next_msg(timeout=5)).data == b"chunk"
    else:
        await session.refused(subject)
        await _nothing_arrives(progress)


@pytest.mark.parametrize("service", SERVICES)
async def test_no_service_deletes_or_purges_the_log(connect, service: str) -> None:
    session = await connect(service)
    js = session.nc.jetstream()
    await js.publish("aos.parked.executor", b"{}") if service == "executor" else None
    for request in (
        "$JS.API.STREAM.PURGE.AOS_RUNS",
        "$JS.API.STREAM.DELETE.AOS_RUNS",
        "$JS.API.STREAM.MSG.DELETE.AOS_RUNS",
    ):
        await session.nc.publish(request, b"{}")
        await session.refused(request)
    assert (await js.stream_info("AOS_RUNS")).config.name == "AOS_RUNS"


# --- the four services under the committed config --------------------------------------


@pytest.fixture
async def page() -> AsyncIterator[str]:
    async def handle(request: web.Request) -> web.Response:
        return web.json_response({"notes": ["AOS plans goals.", "It traces runs."]})

    app = web.Application()
    app.router.add_get("/notes", handle)
    runner, port = await serve_on_loopback(app)
    try:
        yield f"http://127.0.0.1:{port}/notes"
    finally:
        await runner.cleanup()


@pytest.fixture
def secured_system(
    secured_nats: SecuredNats, infra: InfraUrls, database: str, log_dir: Path
) -> Iterator[System]:
    """The four services, each connected as its own NATS user; the system's NATS URL (the
    CLI's) is tenant acme's."""
    services = make_system(
        infra,
        NS,
        database,
        log_dir,
        {"AOS_HTTP_ALLOW_HOSTS": "127.0.0.1", "DISABLE_EXTERNAL_CALLS": "0"},
    )
    services.nats_url = secured_nats.url("acme")
    try:
        for service in services.all:
            service.env["AOS_NATS_URL"] = secured_nats.url(service.name)
            service.start()
        yield services
    finally:
        for service in services.all:
            service.stop()


async def test_a_goal_runs_to_its_end_with_live_progress_under_the_config(
    secured_system: System, secured_nats: SecuredNats, page: str
) -> None:
    acme_url = secured_nats.url("acme")
    submit = ("goal", "submit", f"fetch {page}", "--tenant", "acme", "--budget-cents", "50")
    key = ("--idempotency-key", uuid.uuid4().hex, "--wait", "--json")
    async with await nats.connect(acme_url, inbox_prefix=inbox_prefix(acme_url)) as nc:
        progress = await nc.subscribe("aos.progress.acme.>")
        await nc.flush()
        submitted = await asyncio.to_thread(aos, secured_system, *submit, *key)
        assert submitted.returncode == 0, submitted.stderr
        end = json.loads(submitted.stdout)
        chunk = json.loads((await progress.next_msg(timeout=10)).data)
    assert end["type"] == "run.completed", end
    assert chunk["run_id"] == end["run_id"] and chunk["kind"] == "http.chunk"
    assert "It traces runs." in chunk["text"]
    # Submitted again with the same key: the CLI finds the run's end by a direct get.
    again = await asyncio.to_thread(aos, secured_system, *submit, *key)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["event_id"] == end["event_id"]
    for service in secured_system.all:
        assert "permissions violation" not in service.log_path.read_text().lower(), service.name
