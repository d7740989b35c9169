"""Every run ends (issue 11), with the four services as processes: a step cut off by
SIGKILL mid-call is settled after the restart by its safety, a run past its deadline is
ended with its reservations released, and an output over the limit fails its step."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from aos_cli.embedded import InfraUrls
from tests.support.bus import RunWatcher, connected, read_stream, submit_goal
from tests.support.http import serving_every_path
from tests.system.conftest import System, make_system

OUTPUT_LIMIT = 2048


class HeldEndpoint:
    """Counts its calls and their Idempotency-Key headers; holds the first call open
    (the executor is killed during it) and answers the others at once. `held` answers
    nothing until the test ends: a call that never returns."""

    def __init__(self, *, hold_every_call: bool = False) -> None:
        self.keys: list[str | None] = []
        self.hold_every_call = hold_every_call
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.port = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/v1/models":  # the executor's readiness probe of a model API
            return web.json_response({"data": []})
        self.keys.append(request.headers.get("Idempotency-Key"))
        if len(self.keys) == 1 or self.hold_every_call:
            self.arrived.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), 120)
            return web.json_response({"error": "released"}, status=500)
        return web.json_response({"calls": len(self.keys)})


@pytest.fixture
async def endpoint() -> AsyncIterator[HeldEndpoint]:
    server = HeldEndpoint()
    async with serving_every_path(server.handle) as server.port:
        try:
            yield server
        finally:
            server.release.set()  # a held request ends before the server stops


@pytest.fixture
def services(infra: InfraUrls, namespace: str, database: str, log_dir: Path) -> Iterator[System]:
    """The four services, not started: a test may set the executor's env first."""
    system = make_system(
        infra,
        namespace,
        database,
        log_dir,
        {
            "AOS_HTTP_ALLOW_HOSTS": "127.0.0.1",
            "AOS_MAX_STEP_OUTPUT_BYTES": str(OUTPUT_LIMIT),
            "AOS_DEADLINE_SWEEP_S": "1",
        },
    )
    try:
        yield system
    finally:
        for service in system.all:
            service.stop()


async def start(system: System) -> None:
    for service in system.all:
        await asyncio.to_thread(service.start)


def of_run(events: list[dict[str, Any]], run_id: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["run_id"] == run_id and e["type"] == kind]


@pytest.mark.parametrize(
    ("method", "calls", "end"),
    [("GET", 2, "run.completed"), ("POST", 1, "run.failed")],
)
async def test_a_step_cut_off_by_sigkill_is_settled_after_the_restart(
    services: System, endpoint: HeldEndpoint, method: str, calls: int, end: str
) -> None:
    """GET is retry-safe: made again, with the same Idempotency-Key (the server sees 2
    calls). POST is not: the step fails STEP_INTERRUPTED (the server sees 1 call), after
    the dead executor's claim has expired (the step's 3 s timeout bounds it)."""
    await start(services)
    ns = services.namespace
    async with connected(services.nats_url) as nc, RunWatcher(nc, ns) as watcher:
        run_id = await submit_goal(nc, ns, f"call {method} {endpoint.url('/effect')} within 3s")
        await asyncio.wait_for(endpoint.arrived.wait(), 30)
        services.executor.kill()
        await asyncio.to_thread(services.executor.start)
        ends = await watcher.wait([run_id], within_s=60)
        runs = await read_stream(nc, ns, "runs")

    assert ends[run_id]["type"] == end
    assert len(endpoint.keys) == calls
    key = endpoint.keys[0]
    assert key is not None and key.startswith('"') and key.endswith('"')
    uuid.UUID(key.strip('"'))
    assert set(endpoint.keys) == {key}  # a call made again carries the same key
    # The attempt started once in the log; it ended once.
    assert len(of_run(runs, run_id, "step.started")) == 1
    results = of_run(runs, run_id, "step.succeeded") + of_run(runs, run_id, "step.failed")
    assert len(results) == 1
    if end == "run.failed":
        assert ends[run_id]["error"]["code"] == "STEP_INTERRUPTED"
        assert results[0]["error"]["code"] == "STEP_INTERRUPTED"
        assert results[0]["error"]["retryable"] is False
        assert results[0]["will_retry"] is False


async def test_a_run_past_its_deadline_ends_and_its_reservations_are_released(
    services: System, endpoint: HeldEndpoint
) -> None:
    """A model call that never returns holds a reservation; the goal's 3 s deadline ends
    the run DEADLINE_EXCEEDED and the ledger releases what it had reserved."""
    endpoint.hold_every_call = True
    services.executor.env.update(
        {"ANTHROPIC_API_KEY": "sk-test", "ANTHROPIC_BASE_URL": endpoint.url("")}
    )
    await start(services)
    ns = services.namespace
    async with connected(services.nats_url) as nc, RunWatcher(nc, ns) as watcher:
        run_id = await submit_goal(
            nc, ns, "summarise", inputs={"text": "a long text"}, deadline_s=3
        )
        ends = await watcher.wait([run_id], within_s=60)
        assert ends[run_id]["type"] == "run.failed"
        assert ends[run_id]["error"]["code"] == "DEADLINE_EXCEEDED"
        assert endpoint.arrived.is_set()  # it ended with the model call still open

        budget: list[dict[str, Any]] = []
        for _ in range(150):
            budget = await read_stream(nc, ns, "budget")
            if of_run(budget, run_id, "budget.released"):
                break
            await asyncio.sleep(0.2)
    reserved = [e for e in of_run(budget, run_id, "budget.reserved") if e["amount_cents"] > 0]
    assert [e["step_id"] for e in reserved] == ["summary"]
    released = of_run(budget, run_id, "budget.released")
    assert [e["reservation_id"] for e in released] == [reserved[0]["reservation_id"]]
    assert released[0]["reason"] == "run.failed"
    async with httpx.AsyncClient(base_url=services.ledger.url) as client:
        balances = (await client.get(f"/budgets/runs/{run_id}")).json()
    assert balances["reserved_cents"] == 0, balances


@pytest.mark.parametrize(("extra", "end"), [(0, "run.completed"), (1, "run.failed")])
async def test_a_step_output_over_the_limit_fails_the_step_and_one_at_it_succeeds(
    services: System, extra: int, end: str
) -> None:
    """`bench 1` outputs the goal's inputs: {"text": "x..."} is 11 bytes of JSON plus the
    text, so the output is exactly the limit, or one byte over it."""
    await start(services)
    ns = services.namespace
    inputs = {"text": "x" * (OUTPUT_LIMIT - 11 + extra)}
    async with connected(services.nats_url) as nc, RunWatcher(nc, ns) as watcher:
        run_id = await submit_goal(nc, ns, "bench 1", inputs=inputs)
        ends = await watcher.wait([run_id], within_s=60)
        runs = await read_stream(nc, ns, "runs")
    assert ends[run_id]["type"] == end
    if end == "run.completed":
        assert ends[run_id]["outputs"] == {"s1": inputs}
    else:
        (failed,) = of_run(runs, run_id, "step.failed")
        assert failed["error"]["code"] == "OUTPUT_TOO_LARGE"
        assert failed["error"]["retryable"] is False and failed["will_retry"] is False
        assert ends[run_id]["error"]["code"] == "OUTPUT_TOO_LARGE"
