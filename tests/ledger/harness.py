"""What the ledger tests share: playing the executor on the bus, reading the budget stream
back, folding it independently of the ledger's Lua, and snapshotting Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import httpx
import nats
from nats.js import JetStreamContext
from redis.asyncio import Redis

from aos_contracts import (
    AnyEvent,
    BudgetCommitted,
    BudgetDenied,
    BudgetReleased,
    BudgetReservationRequested,
    BudgetReserved,
    EventEnvelope,
    GoalSubmitted,
    RunCompleted,
    StepSucceeded,
    decode_event,
    encode_event,
    event_headers,
)
from aos_contracts.subjects import stream_name, subject_for_type
from aos_ledger.store import Balances, BudgetStore, Reservation, TenantBalances
from tests.support.processes import ServiceProcess

TENANT = "acme"
DECISIONS = ("budget.reserved", "budget.denied")

# Makes a ledger process of the test's namespace (replica n logs to its own folder).
LedgerFactory = Callable[..., ServiceProcess]


class Executor:
    """Publishes what the executor would, on the namespace's subjects."""

    def __init__(self, js: JetStreamContext, namespace: str) -> None:
        self.js = js
        self.namespace = namespace

    async def publish(self, event: EventEnvelope) -> int:
        subject = subject_for_type(event.type, event.tenant, event.run_id, self.namespace)
        ack = await self.js.publish(subject, encode_event(event), headers=event_headers(event))
        return int(ack.seq)

    async def goal(self, run_id: uuid.UUID, budget_cents: int) -> GoalSubmitted:
        goal = GoalSubmitted(run_id=run_id, tenant=TENANT, goal="test", budget_cents=budget_cents)
        await self.publish(goal)
        return goal

    async def request(
        self,
        run_id: uuid.UUID,
        step_id: str,
        amount_cents: int,
        reservation_id: uuid.UUID | None = None,
    ) -> BudgetReservationRequested:
        request = BudgetReservationRequested(
            run_id=run_id,
            tenant=TENANT,
            reservation_id=reservation_id or uuid.uuid4(),
            step_id=step_id,
            attempt=1,
            amount_cents=amount_cents,
        )
        await self.publish(request)
        return request

    async def succeeded(
        self, request: BudgetReservationRequested, cost_cents: int
    ) -> StepSucceeded:
        step = StepSucceeded(
            run_id=request.run_id,
            tenant=TENANT,
            step_id=request.step_id,
            skill="json_transform",
            attempt=request.attempt,
            reservation_id=request.reservation_id,
            cost_cents=cost_cents,
        )
        await self.publish(step)
        return step

    async def completed(self, run_id: uuid.UUID) -> RunCompleted:
        completed = RunCompleted(run_id=run_id, tenant=TENANT)
        await self.publish(completed)
        return completed


@asynccontextmanager
async def executor(nats_url: str, namespace: str) -> AsyncIterator[Executor]:
    nc = await nats.connect(nats_url)
    try:
        yield Executor(nc.jetstream(), namespace)
    finally:
        await nc.drain()


class BudgetLog:
    """The budget stream as read so far; `refresh` reads what was added since. Every
    message must decode: everything the ledger emits must match the contracts."""

    def __init__(self, js: JetStreamContext, namespace: str) -> None:
        self.js = js
        self.stream = stream_name("budget", namespace)
        self.events: list[tuple[int, AnyEvent]] = []

    async def refresh(self) -> list[tuple[int, AnyEvent]]:
        last = (await self.js.stream_info(self.stream)).state.last_seq
        for seq in range(len(self.events) + 1, last + 1):
            msg = await self.js.get_msg(self.stream, seq)
            self.events.append((seq, decode_event(msg.data or b"")))
        return self.events


async def read_budget_stream(nats_url: str, namespace: str) -> list[tuple[int, AnyEvent]]:
    nc = await nats.connect(nats_url)
    try:
        return await BudgetLog(nc.jetstream(), namespace).refresh()
    finally:
        await nc.drain()


async def eventually(
    check: Callable[[], Awaitable[bool]], give_up_after_s: float = 60.0, what: str = "condition"
) -> None:
    """Wait for a condition of the system (the bound is a safety net, not an assertion)."""
    deadline = time.monotonic() + give_up_after_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def ledger_idle(nats_url: str, namespace: str) -> bool:
    """Whether the ledger has taken and acknowledged every goal and run event."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for context in ("goals", "runs"):
            info = await js.consumer_info(stream_name(context, namespace), "ledger")
            if info.num_pending or info.num_ack_pending:
                return False
        return True
    finally:
        await nc.drain()


def decisions_in(stream: Iterable[tuple[int, AnyEvent]]) -> list[BudgetReserved | BudgetDenied]:
    return [event for _seq, event in stream if isinstance(event, BudgetReserved | BudgetDenied)]


def budget_events(stream: Iterable[tuple[int, AnyEvent]], event_type: str) -> list[Any]:
    return [event for _seq, event in stream if event.type == event_type]


def distinct_ids_per_reservation(
    stream: Iterable[tuple[int, AnyEvent]], event_types: tuple[str, ...]
) -> Counter[uuid.UUID]:
    """How many distinct events of `event_types` the log holds for each reservation."""
    ids: dict[uuid.UUID, set[uuid.UUID]] = defaultdict(set)
    for _seq, event in stream:
        if event.type in event_types:
            ids[getattr(event, "reservation_id")].add(event.event_id)
    return Counter({rid: len(event_ids) for rid, event_ids in ids.items()})


@dataclass(frozen=True)
class Folded:
    cap_cents: int
    reserved_cents: int
    committed_cents: int


def fold(stream: Iterable[tuple[int, AnyEvent]]) -> dict[str, Folded]:
    """Balances per run, folded from the log in Python - written apart from the ledger's
    Lua, so that the two check each other. Events count once per event id, as every
    consumer of the log dedupes them."""
    seen: set[uuid.UUID] = set()
    cap: dict[str, int] = {}
    reserved: Counter[str] = Counter()
    committed: Counter[str] = Counter()
    held: dict[uuid.UUID, int] = {}  # reservation -> cents it still holds
    for _seq, event in stream:
        if event.event_id in seen:
            continue
        seen.add(event.event_id)
        run = str(event.run_id)
        if event.type == "budget.opened":
            cap[run] = event.cap_cents
        elif event.type == "budget.reserved":
            held[event.reservation_id] = event.amount_cents
            reserved[run] += event.amount_cents
        elif event.type == "budget.committed":
            # A commit after a release (redelivery reordered them) gives nothing back.
            reserved[run] -= held.pop(event.reservation_id, 0)
            committed[run] += event.committed_cents
        elif event.type == "budget.released":
            reserved[run] -= held.pop(event.reservation_id, 0)
    return {run: Folded(cap[run], reserved[run], committed[run]) for run in cap}


def fold_tenants(stream: Iterable[tuple[int, AnyEvent]]) -> dict[tuple[str, str], Folded]:
    """Balances per (tenant, period), folded from the log in Python like `fold`; the cap
    is the one the ledger applied (from its decisions), 0 when it had none."""
    seen: set[uuid.UUID] = set()
    caps: dict[tuple[str, str], int] = {}
    reserved: Counter[tuple[str, str]] = Counter()
    committed: Counter[tuple[str, str]] = Counter()
    held: dict[uuid.UUID, tuple[tuple[str, str], int]] = {}
    periods: dict[uuid.UUID, str | None] = {}
    for _seq, event in stream:
        if event.event_id in seen or not event.type.startswith("budget."):
            continue
        seen.add(event.event_id)
        if event.type == "budget.opened":
            continue
        # Besides budget.opened, the budget stream holds only these.
        assert isinstance(event, BudgetReserved | BudgetDenied | BudgetCommitted | BudgetReleased)
        period = periods.setdefault(event.reservation_id, event.tenant_period)
        if period is None:
            continue
        key = (event.tenant, period)
        if isinstance(event, BudgetReserved | BudgetDenied) and event.tenant_cap_cents is not None:
            caps[key] = event.tenant_cap_cents
        if event.type == "budget.reserved":
            held[event.reservation_id] = (key, event.amount_cents)
            reserved[key] += event.amount_cents
        elif event.type == "budget.committed":
            reserved[key] -= held.pop(event.reservation_id, (key, 0))[1]
            committed[key] += event.committed_cents
        elif event.type == "budget.released":
            reserved[key] -= held.pop(event.reservation_id, (key, 0))[1]
    keys = set(reserved) | set(committed)
    return {key: Folded(caps.get(key, 0), reserved[key], committed[key]) for key in keys}


async def tenant_snapshot(store: BudgetStore) -> dict[tuple[str, str], TenantBalances]:
    """Every tenant's balances per period, as Redis holds them."""
    found: dict[tuple[str, str], TenantBalances] = {}
    async for key in store.redis.scan_iter(match=f"{store.prefix}tenant:*", count=1000):
        text = key.decode() if isinstance(key, bytes) else key
        tenant, period = text.removeprefix(f"{store.prefix}tenant:").split(":", 1)
        found[(tenant, period)] = await store.tenant_balances(tenant, period)
    return found


async def expiries(store: BudgetStore) -> dict[str, float]:
    """The expiry index: reservation -> when it expires (epoch ms)."""
    # withscores=True: (member, score) pairs, which redis-py's return annotation leaves open.
    pairs = cast(
        list[tuple[bytes | str, float]],
        await store.redis.zrange(store.expiries_key, 0, -1, withscores=True),
    )
    return {(k.decode() if isinstance(k, bytes) else k): score for k, score in pairs}


@dataclass(frozen=True)
class RunState:
    balances: Balances
    reservations: dict[str, Reservation]


async def snapshot(store: BudgetStore) -> dict[str, RunState]:
    """Every run's balances and reservation records, as Redis holds them."""
    runs: dict[str, RunState] = {}
    pattern = f"{store.prefix}run:*"
    async for key in store.redis.scan_iter(match=pattern, count=1000):
        text = key.decode() if isinstance(key, bytes) else key
        run_id = text.removeprefix(f"{store.prefix}run:")
        if ":" in run_id:
            continue  # run:<id>:reservations and run:<id>:ended
        balances = await store.balances(run_id)
        assert balances is not None
        runs[run_id] = RunState(balances, await store.reservations(run_id))
    return runs


async def wipe(redis: Redis, namespace: str) -> int:
    """Delete every key of the namespace's ledger, marker included."""
    keys = [key async for key in redis.scan_iter(match=f"{namespace}:ledger:*", count=1000)]
    if keys:
        await redis.delete(*keys)
    return len(keys)


def get_budget(url: str, run_id: uuid.UUID | str) -> httpx.Response:
    return httpx.get(f"{url}/budgets/runs/{run_id}", timeout=5.0)
