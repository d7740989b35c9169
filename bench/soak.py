"""Soak: every run ends, side effects happen once, the ledger and the tracer agree, while
services are SIGKILLed and restarted at random.

Starts NATS, PostgreSQL, Redis (private ones, unless AOS_NATS_URL, AOS_POSTGRES_URL and
REDIS_URL are set) and the four services as `aos up` does, plus an HTTP server on
loopback that counts the calls it receives per run (its URL names the run) and the
`Idempotency-Key` headers they carry. It submits N goals of the stub planner's kinds
(chained json_transform steps, fetch = http_call + json_transform, fetch and summarise,
summarise, extract) at a steady rate, and meanwhile SIGKILLs a random service every few
seconds and starts it again. Then it waits, bounded, for every run to end, and prints:

    submitted / completed / failed (by code) / never ended / side effects twice /
    ledger-vs-trace mismatches

"side effects twice": runs whose http_call reached the server more than once with no
way for it to tell (no Idempotency-Key, or different keys). "ledger-vs-trace": per ended
run, the ledger's committed cents (GET /budgets/runs/{id}) against the tracer's cost of
the run (GET /runs/{id}). Exits 1 when never ended, twice or mismatches is not 0.

A tool, not a test: `make soak SOAK_ARGS="--goals 100"`.

    python bench/soak.py [--goals 200] [--rate 2] [--kill-every 4] [--wait-s 180] [--seed N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import nats
from aiohttp import web
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from aos_cli.launcher import SERVICES, Stack, tool_stack
from aos_contracts.codec import EventDecodeError, decode_event, encode_event, event_headers
from aos_contracts.events import TERMINAL_RUN_EVENTS, AnyEvent, GoalSubmitted, RunFailed
from aos_contracts.subjects import goal_subject, run_id_of_subject

TENANT = "soak"
IDEMPOTENCY_KEY = "Idempotency-Key"
# What the soak changes from the services' defaults, so that a killed consumer's batch
# comes back within seconds rather than the production 30 s (overridable from the env).
SOAK_ENV = {
    "AOS_ACK_WAIT_S": "5",
    "AOS_EXECUTOR_LEASE_TTL_S": "3",
    "AOS_HTTP_ALLOW_HOSTS": "127.0.0.1",
    "DISABLE_EXTERNAL_CALLS": "0",
}
# After the last run ended, how long the ledger and the tracer may take to agree.
SETTLE_S = 30.0


@dataclass
class Run:
    goal: GoalSubmitted
    submitted_at: float
    events: list[AnyEvent] = field(default_factory=list)

    @property
    def terminal(self) -> AnyEvent | None:
        return next((e for e in self.events if str(e.type) in TERMINAL_RUN_EVENTS), None)

    def last_event(self) -> str:
        if not self.events:
            return "nothing after goal.submitted was seen"
        last = self.events[-1]
        step = getattr(last, "step_id", None)
        return f"{last.type}" + (f" (step {step})" if step else "")


class SideEffects:
    """The HTTP server the runs' http_call steps reach: GET /soak/<run_id>."""

    def __init__(self, delay_s: float) -> None:
        # A slow answer, so that a killed executor is often caught in the middle of a call.
        self.delay_s = delay_s
        self.calls: dict[str, list[str | None]] = defaultdict(list)  # run -> keys seen
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/soak/{run_id}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        run_id = request.match_info["run_id"]
        self.calls[run_id].append(request.headers.get(IDEMPOTENCY_KEY))
        await asyncio.sleep(self.delay_s)
        return web.json_response({"run": run_id, "notes": ["AOS plans.", "It traces."]})

    def url(self, run_id: uuid.UUID) -> str:
        return f"http://127.0.0.1:{self.port}/soak/{run_id}"

    def twice(self) -> dict[str, list[str | None]]:
        """Runs whose call reached the server more than once with nothing to deduplicate
        it by: a call without a key, or more than one distinct key."""
        return {
            run: keys
            for run, keys in self.calls.items()
            if len(keys) > 1 and (None in keys or len(set(keys)) > 1)
        }


def goal_for(index: int, run_id: uuid.UUID, server: SideEffects) -> GoalSubmitted:
    """The stub planner's kinds of goals in turn, one or several steps each."""
    text, inputs = [
        (f"bench {2 + index % 7}", {"index": index}),
        (f"fetch {server.url(run_id)}", {}),
        (f"fetch {server.url(run_id)} and summarize it", {}),
        ("summarize the notes", {"text": f"note {index}: AOS runs goals. " * 5}),
        ("extract name, size from item", {"item": {"name": f"n{index}", "size": index}}),
    ][index % 5]
    return GoalSubmitted(run_id=run_id, tenant=TENANT, goal=text, budget_cents=100, inputs=inputs)


class Soak:
    def __init__(self, stack: Stack, server: SideEffects, args: argparse.Namespace) -> None:
        self.stack = stack
        self.server = server
        self.args = args
        self.random = random.Random(args.seed)
        self.runs: dict[uuid.UUID, Run] = {}
        self.kills: list[str] = []
        self.started = time.monotonic()
        self._ended = asyncio.Event()

    def now(self) -> float:
        return time.monotonic() - self.started

    def say(self, text: str) -> None:
        print(f"t={self.now():7.1f}s {text}", flush=True)

    async def _on_msg(self, msg: Msg) -> None:
        try:
            run = self.runs.get(uuid.UUID(run_id_of_subject(msg.subject)))
            event = decode_event(msg.data)
        except (ValueError, EventDecodeError):
            return
        if run is None or str(event.type) == "goal.submitted":
            return
        run.events.append(event)
        if str(event.type) in TERMINAL_RUN_EVENTS:
            self._ended.set()

    def open_runs(self) -> list[Run]:
        return [run for run in self.runs.values() if run.terminal is None]

    async def submit_all(self, nc: NatsClient) -> None:
        interval = 1.0 / self.args.rate
        for index in range(self.args.goals):
            run_id = uuid.uuid4()
            goal = goal_for(index, run_id, self.server)
            self.runs[run_id] = Run(goal, self.now())
            await nc.jetstream().publish(
                goal_subject(TENANT, run_id, self.stack.namespace),
                encode_event(goal),
                headers=event_headers(goal),
                timeout=10.0,
            )
            await asyncio.sleep(interval)
        self.say(f"submitted {self.args.goals} goals")

    async def kill_one(self) -> None:
        name = self.random.choice(SERVICES)
        service = self.stack.services[name]
        child = service.child
        assert child.proc is not None
        pid = child.proc.pid
        child.proc.kill()
        await asyncio.to_thread(child.proc.wait, 10)
        began = time.monotonic()
        child.start()
        await asyncio.to_thread(child.wait_until, service.ready, 120.0)
        line = f"SIGKILL {name} (pid {pid}); ready again in {time.monotonic() - began:.1f}s"
        self.kills.append(f"t={self.now():7.1f}s {line}")
        self.say(line)

    async def storm(self, submitting: asyncio.Task[None]) -> None:
        """Kill and restart a random service every `kill_every` s (jittered) while goals
        are being submitted or runs are open, and no longer than `storm_s`."""

        def going_on() -> bool:
            busy = not submitting.done() or bool(self.open_runs())
            return busy and self.now() < self.args.storm_s

        while going_on():
            pause = self.args.kill_every * self.random.uniform(0.5, 1.5)
            await asyncio.sleep(max(0.0, min(pause, self.args.storm_s - self.now())))
            if going_on():
                await self.kill_one()

    async def wait_for_ends(self, within_s: float) -> None:
        deadline = time.monotonic() + within_s
        while self.open_runs() and time.monotonic() < deadline:
            self._ended.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ended.wait(), deadline - time.monotonic())

    async def mismatches(self) -> dict[uuid.UUID, tuple[int | None, int | None]]:
        """Ended runs whose ledger-committed cents differ from the tracer's cost, after
        giving both up to SETTLE_S to catch up with the log."""
        ended = [run_id for run_id, run in self.runs.items() if run.terminal is not None]
        found: dict[uuid.UUID, tuple[int | None, int | None]] = {}
        deadline = time.monotonic() + SETTLE_S
        async with httpx.AsyncClient(timeout=10.0) as client:
            while True:
                found = {}
                for run_id in ended:
                    ledger, trace = await self._costs(client, run_id)
                    if ledger != trace:
                        found[run_id] = (ledger, trace)
                if not found or time.monotonic() > deadline:
                    return found
                ended = list(found)
                await asyncio.sleep(1.0)

    async def _costs(
        self, client: httpx.AsyncClient, run_id: uuid.UUID
    ) -> tuple[int | None, int | None]:
        urls = self.stack.urls
        ledger: int | None = None
        trace: int | None = None
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            response = await client.get(f"{urls['ledger']}/budgets/runs/{run_id}")
            if response.status_code == 200:
                ledger = int(response.json()["committed_cents"])
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            response = await client.get(f"{urls['tracer']}/runs/{run_id}")
            if response.status_code == 200:
                trace = int(response.json()["run"]["cost_cents"])
        return ledger, trace

    async def traced_status(self, run_id: uuid.UUID) -> str:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            async with httpx.AsyncClient(timeout=10.0) as client:
                response = await client.get(f"{self.stack.urls['tracer']}/runs/{run_id}")
                if response.status_code == 200:
                    return str(response.json()["run"]["status"])
                return f"HTTP {response.status_code}"
        return "unreachable"

    async def run(self, nats_url: str) -> int:
        nc = await nats.connect(nats_url, name="aos-soak")
        try:
            await nc.subscribe(
                f"{self.stack.namespace}.*.{TENANT}.*",
                cb=self._on_msg,
                pending_msgs_limit=2_000_000,
            )
            await nc.flush()
            submitting = asyncio.create_task(self.submit_all(nc))
            await self.storm(submitting)
            await submitting
            self.say(f"kills over ({len(self.kills)}); {len(self.open_runs())} runs open")
            await self.wait_for_ends(self.args.wait_s)
            return await self.report()
        finally:
            await nc.close()

    async def report(self) -> int:
        runs = list(self.runs.values())
        completed = [r for r in runs if str(getattr(r.terminal, "type", "")) == "run.completed"]
        failed = Counter(
            r.terminal.error.code.value for r in runs if isinstance(r.terminal, RunFailed)
        )
        cancelled = sum(1 for r in runs if str(getattr(r.terminal, "type", "")) == "run.cancelled")
        never = self.open_runs()
        twice = self.server.twice()
        mismatched = await self.mismatches()
        by_code = ", ".join(f"{code} {n}" for code, n in failed.most_common())
        print()
        print(f"submitted {len(runs)}")
        print(f"completed {len(completed)}")
        print(f"failed {sum(failed.values())}" + (f" ({by_code})" if by_code else ""))
        if cancelled:
            print(f"cancelled {cancelled}")
        print(f"never ended {len(never)}")
        calls = self.server.calls.values()
        print(f"side effects twice {len(twice)}")
        print(
            f"  (http calls {sum(map(len, calls))} for {len(calls)} runs; "
            f"{sum(1 for keys in calls for key in keys if key)} with an {IDEMPOTENCY_KEY}; "
            f"{sum(1 for keys in calls if len(keys) > 1)} runs called more than once)"
        )
        print(f"ledger-vs-trace mismatches {len(mismatched)}")
        print(f"kills {len(self.kills)}")
        for line in self.kills:
            print(f"  {line}")
        if never:
            print("never ended:")
        for run in never:
            status = await self.traced_status(run.goal.run_id)
            print(
                f"  {run.goal.run_id} {run.goal.goal.split(' http')[0]!r} submitted at "
                f"t={run.submitted_at:.1f}s; last event {run.last_event()}; tracer: {status}"
            )
        if twice:
            print("side effects twice (run: Idempotency-Key of each call):")
        for run_key, keys in twice.items():
            print(f"  {run_key}: {keys}")
        if mismatched:
            print("ledger-vs-trace mismatches (run: ledger committed, tracer cost):")
        for run_id, (ledger, trace) in mismatched.items():
            print(f"  {run_id}: {ledger}, {trace}")
        return 1 if never or twice or mismatched else 0


async def soak(stack: Stack, nats_url: str, args: argparse.Namespace) -> int:
    server = SideEffects(args.http_delay_s)
    await server.start()
    try:
        return await Soak(stack, server, args).run(nats_url)
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--goals", type=int, default=200, help="goals to submit")
    parser.add_argument("--rate", type=float, default=2.0, help="goals submitted per second")
    parser.add_argument("--kill-every", type=float, default=4.0, help="mean s between kills")
    parser.add_argument(
        "--storm-s", type=float, default=240.0, help="no kill after this many s from the start"
    )
    parser.add_argument(
        "--wait-s", type=float, default=180.0, help="how long runs may take to end after kills"
    )
    parser.add_argument(
        "--http-delay-s", type=float, default=1.0, help="how long each http_call takes"
    )
    parser.add_argument("--seed", type=int, default=None, help="which services are killed")
    parser.add_argument("--data-dir", type=Path, help="keep servers' data and logs here")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1_000_000)

    namespace = f"soak{uuid.uuid4().hex[:8]}"
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="aos-soak-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"AOS soak: {args.goals} goals at {args.rate:g}/s, SIGKILL of a random service every "
        f"~{args.kill_every:g}s for at most {args.storm_s:g}s, then up to {args.wait_s:g}s "
        f"for runs to end; seed {args.seed}; logs in {data_dir / 'logs'}",
        flush=True,
    )
    try:
        with tool_stack(namespace, data_dir, base_env={**SOAK_ENV, **os.environ}) as stack:
            return asyncio.run(soak(stack, stack.infra.nats_url, args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
