"""Orchestration overhead of AOS, measured through the real stack.

Starts NATS, PostgreSQL, Redis (private ones on free ports, unless AOS_NATS_URL,
AOS_POSTGRES_URL and REDIS_URL are set) and the four services, exactly as `aos up` does,
then submits N goals "bench K" (K chained json_transform steps each) at each concurrency
and waits for every run's terminal event.

Per run, the orchestration overhead per step is

    (run end - plan.created - sum of step durations) / K

with the times taken from the events' `occurred_at` (all services share this machine's
clock) and the step durations from `step.succeeded.duration_ms`: what remains is the
time AOS spends between steps (budget reservation round trips, event publishing,
consumer fetches), not in skills.

Prints figures only; nothing here passes or fails on timing.

    python bench/bench.py [--runs 200] [--steps 10] [--concurrency 1 50] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from aos_cli.embedded import InfraUrls
from aos_cli.launcher import tool_stack
from aos_contracts.codec import (
    HEADER_EVENT_TYPE,
    EventDecodeError,
    decode_event,
    encode_event,
    event_headers,
)
from aos_contracts.events import (
    TERMINAL_RUN_EVENTS,
    AnyEvent,
    GoalSubmitted,
    PlanCreated,
    RunCompleted,
    StepFailed,
    StepSucceeded,
)
from aos_contracts.subjects import goal_subject, run_id_of_subject

TENANT = "bench"
RUN_TIMEOUT_S = 300.0
WARMUP_RUNS = 5

_STEP_EVENT_TYPES = (
    "budget.reservation_requested",
    "budget.reserved",
    "step.started",
    "step.succeeded",
)
# The legs of one step, as (name, from event, to event); "next" is the next step's request.
HOPS = (
    ("request>reserved", "budget.reservation_requested", "budget.reserved"),
    ("reserved>started", "budget.reserved", "step.started"),
    ("started>succeeded", "step.started", "step.succeeded"),
    ("succeeded>next", "step.succeeded", "next"),
)


def _step_number(step_id: str) -> tuple[int, str]:
    digits = "".join(ch for ch in step_id if ch.isdigit())
    return (int(digits) if digits else 0, step_id)


@dataclass
class RunRecord:
    run_id: uuid.UUID
    submitted_at: float = 0.0  # monotonic, on this process's clock
    # Kept as bytes while the run is measured and decoded after (`decode`), so that the
    # bench does not take CPU from the services it measures on a machine they share.
    raw: list[bytes] = field(default_factory=list)
    events: list[AnyEvent] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def decode(self) -> None:
        for data in self.raw:
            with contextlib.suppress(EventDecodeError):
                self.events.append(decode_event(data))
        self.raw = []

    @property
    def terminal(self) -> AnyEvent | None:
        for event in reversed(self.events):
            if str(event.type) in TERMINAL_RUN_EVENTS:
                return event
        return None

    def overhead_per_step_ms(self, steps: int) -> float | None:
        plan = next((e for e in self.events if isinstance(e, PlanCreated)), None)
        end = self.terminal
        if plan is None or end is None:
            return None
        span_ms = (end.occurred_at - plan.occurred_at).total_seconds() * 1000.0
        in_skills_ms = sum(
            e.duration_ms for e in self.events if isinstance(e, StepSucceeded | StepFailed)
        )
        return (span_ms - in_skills_ms) / steps

    def hops_ms(self) -> dict[str, list[float]]:
        """Where a step's time goes, from the events' times: for each step, the gaps
        between its reservation request, the ledger's decision, its start, its result,
        and the next step's request."""
        first: dict[tuple[str, str], datetime] = {}
        for event in self.events:
            step_id = getattr(event, "step_id", None)
            if step_id is not None:
                first.setdefault((step_id, str(event.type)), event.occurred_at)
        hops: dict[str, list[float]] = {name: [] for name, _, _ in HOPS}
        step_ids = sorted({step for step, _ in first}, key=_step_number)
        for index, step in enumerate(step_ids):
            times = {kind: first.get((step, kind)) for kind in _STEP_EVENT_TYPES}
            if index + 1 < len(step_ids):
                times["next"] = first.get((step_ids[index + 1], "budget.reservation_requested"))
            for name, start, end in HOPS:
                begin, finish = times.get(start), times.get(end)
                if begin is not None and finish is not None:
                    hops[name].append((finish - begin).total_seconds() * 1000.0)
        return hops

    def latency_ms(self) -> float | None:
        """Goal published to terminal event: what a waiting client sees."""
        end = self.terminal
        goal = next((e for e in self.events if isinstance(e, GoalSubmitted)), None)
        if end is None or goal is None:
            return None
        return (end.occurred_at - goal.occurred_at).total_seconds() * 1000.0


class EventTap:
    """One core NATS subscription to every event of the namespace, made before any goal
    is published; events are filed under their run."""

    def __init__(self, nc: NatsClient, namespace: str) -> None:
        self.nc = nc
        self.namespace = namespace
        self.runs: dict[uuid.UUID, RunRecord] = {}

    async def start(self) -> None:
        await self.nc.subscribe(
            f"{self.namespace}.*.{TENANT}.*", cb=self._on_msg, pending_msgs_limit=2_000_000
        )
        await self.nc.flush()

    async def _on_msg(self, msg: Msg) -> None:
        try:
            run_id = uuid.UUID(run_id_of_subject(msg.subject))
        except ValueError:
            return
        record = self.runs.get(run_id)
        if record is None:
            return  # not one of ours
        record.raw.append(msg.data)
        if (msg.headers or {}).get(HEADER_EVENT_TYPE) in TERMINAL_RUN_EVENTS:
            record.done.set()


async def run_one(tap: EventTap, steps: int, index: int) -> RunRecord:
    goal = GoalSubmitted(
        run_id=uuid.uuid4(),
        tenant=TENANT,
        goal=f"bench {steps}",
        budget_cents=100,
        inputs={"index": index, "payload": {"text": "x" * 64, "values": [1, 2, 3]}},
    )
    record = RunRecord(goal.run_id)
    tap.runs[goal.run_id] = record
    record.submitted_at = time.monotonic()
    await tap.nc.jetstream().publish(
        goal_subject(TENANT, goal.run_id, tap.namespace),
        encode_event(goal),
        headers=event_headers(goal),
    )
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(record.done.wait(), RUN_TIMEOUT_S)
    return record


@dataclass
class PhaseResult:
    concurrency: int
    runs: int
    completed: int
    failed: int
    timed_out: int
    steps: int
    wall_s: float
    steps_per_s: float
    overhead_p50_ms: float
    overhead_p99_ms: float
    run_p50_ms: float
    run_p99_ms: float
    hops_p50_ms: dict[str, float] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN when there is nothing to rank."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def phase(tap: EventTap, runs: int, steps: int, concurrency: int) -> PhaseResult:
    gate = asyncio.Semaphore(concurrency)

    async def gated(index: int) -> RunRecord:
        async with gate:
            return await run_one(tap, steps, index)

    started = time.monotonic()
    records = await asyncio.gather(*(gated(i) for i in range(runs)))
    wall = time.monotonic() - started
    for record in records:
        record.decode()
    completed = [r for r in records if isinstance(r.terminal, RunCompleted)]
    ended = [r for r in records if r.terminal is not None]
    overheads = [o for r in completed if (o := r.overhead_per_step_ms(steps)) is not None]
    latencies = [lat for r in completed if (lat := r.latency_ms()) is not None]
    return PhaseResult(
        concurrency=concurrency,
        runs=runs,
        completed=len(completed),
        failed=len(ended) - len(completed),
        timed_out=runs - len(ended),
        steps=len(completed) * steps,
        wall_s=wall,
        steps_per_s=len(completed) * steps / wall if wall > 0 else math.nan,
        overhead_p50_ms=percentile(overheads, 0.50),
        overhead_p99_ms=percentile(overheads, 0.99),
        run_p50_ms=percentile(latencies, 0.50),
        run_p99_ms=percentile(latencies, 0.99),
        hops_p50_ms={
            name: round(percentile([ms for r in completed for ms in r.hops_ms()[name]], 0.5), 2)
            for name, _, _ in HOPS
        },
    )


async def bench(
    nats_url: str, namespace: str, runs: int, steps: int, concurrencies: list[int]
) -> list[PhaseResult]:
    nc = await nats.connect(nats_url, name="aos-bench")
    try:
        tap = EventTap(nc, namespace)
        await tap.start()
        # Warm-up: first connections, first prepared statements, first consumer fetches.
        await phase(tap, WARMUP_RUNS, steps, WARMUP_RUNS)
        results = []
        for concurrency in concurrencies:
            result = await phase(tap, runs, steps, concurrency)
            print(_row(result), flush=True)
            hops = "  ".join(f"{name} {ms:.2f}" for name, ms in result.hops_p50_ms.items())
            print(f"{'':>5} step legs, p50 ms: {hops}", flush=True)
            results.append(result)
        return results
    finally:
        await nc.close()


HEADER = (
    f"{'conc':>5} {'runs':>5} {'ok':>5} {'fail':>5} {'steps':>6} {'wall_s':>8} {'steps/s':>8} "
    f"{'ovh_p50_ms':>10} {'ovh_p99_ms':>10} {'run_p50_ms':>10} {'run_p99_ms':>10}"
)


def _row(r: PhaseResult) -> str:
    return (
        f"{r.concurrency:>5} {r.runs:>5} {r.completed:>5} {r.failed + r.timed_out:>5} "
        f"{r.steps:>6} {r.wall_s:>8.2f} {r.steps_per_s:>8.1f} "
        f"{r.overhead_p50_ms:>10.2f} {r.overhead_p99_ms:>10.2f} "
        f"{r.run_p50_ms:>10.1f} {r.run_p99_ms:>10.1f}"
    )


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=200, help="goals per concurrency level")
    parser.add_argument("--steps", type=int, default=10, help="json_transform steps per goal")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--data-dir", type=Path, help="keep servers' data and logs here")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args(argv)

    external = InfraUrls.from_env()
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="aos-bench-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(
        f"AOS bench: {args.runs} runs x {args.steps} json_transform steps, "
        f"concurrency {args.concurrency}, "
        f"{'embedded servers' if external is None else 'external servers'} (logs: {data_dir})"
    )
    print(f"machine: {info['os']}, {info['cpu']}, {info['cpus']} CPUs, Python {info['python']}")
    try:
        with tool_stack(namespace, data_dir) as stack:
            print(HEADER, flush=True)
            results = asyncio.run(
                bench(stack.infra.nats_url, namespace, args.runs, args.steps, args.concurrency)
            )
    except KeyboardInterrupt:
        return 130
    print(
        "ovh = per-step orchestration overhead: (run end - plan.created - sum of step "
        "durations) / steps; run = goal.submitted to run end"
    )
    if args.json:
        print(json.dumps({"machine": info, "results": [asdict(r) for r in results]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
