"""The planner's store of its decisions: for each run, the events it answered the goal with.

Why it exists:

- **Outbox.** The planner records a decision before publishing it and marks it published
  after. A goal redelivered after a crash (anywhere between the two) republishes the
  recorded events, with their ids, instead of asking the planning backend again: a
  Claude call costs money and need not give the same plan twice. First recorded wins, so
  two replicas racing on one goal publish the same decision.
- **Start-up.** `applied_through` says how far the store reflects the plans stream, so at
  start the planner reads only the tail of the stream, not all of it.
- **Reuse.** `GoalSubmitted.reuse_plan_of` plans a run with the recorded plan of an
  earlier run of the same tenant.

How it is rebuilt: like every AOS store, from the log. `apply_log` folds the plans
stream into it (each plan.created / plan.rejected is a published decision) and writes
how far it got in the same transaction, so a wiped store, or the in-memory one at each
start, catches up by replaying the stream from `applied_through() + 1`. What only the
store knows are decisions recorded but not yet published: their goals are still
unacknowledged, so JetStream redelivers them and the planner decides them again.

Without a database (`AOS_PLANNER_DATABASE_URL` unset) the store lives in memory and is
rebuilt from the whole plans stream at each start: fine for tests and demos, not for
production (a crash between recording and publishing re-asks the backend).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import asyncpg

from aos_contracts.codec import decode_event, encode_event
from aos_contracts.events import AnyEvent, EventEnvelope, PlanCreated, PlanRejected
from aos_plumbing.postgres import connect_pool

# The events that end a decision: the last event of every decision is one of these.
DECIDING = (PlanCreated, PlanRejected)


@dataclass(frozen=True)
class Decision:
    """The planner's answer to one goal."""

    run_id: uuid.UUID
    tenant: str
    # In publish order; the last is plan.created or plan.rejected.
    events: tuple[EventEnvelope, ...]
    # Plans-stream seq of the last event once published; None: recorded, not yet published.
    published_seq: int | None
    # True only in what `record` returns when this call recorded it (not another replica
    # or an earlier attempt): whoever recorded a decision is the one to count it.
    recorded_now: bool = field(default=False, compare=False)

    @property
    def outcome(self) -> str:
        return self.events[-1].type

    @property
    def plan_created(self) -> PlanCreated | None:
        last = self.events[-1]
        return last if isinstance(last, PlanCreated) else None

    @property
    def idempotency_key(self) -> str | None:
        last = self.events[-1]
        return last.idempotency_key if isinstance(last, DECIDING) else None


class DecisionStore(Protocol):
    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> bool: ...

    async def decision(self, run_id: uuid.UUID) -> Decision | None: ...

    async def record(
        self, run_id: uuid.UUID, tenant: str, events: Sequence[EventEnvelope]
    ) -> Decision: ...

    async def mark_published(self, run_id: uuid.UUID, seq: int) -> None: ...

    async def recorded_plan(self, tenant: str, run_id: uuid.UUID) -> PlanCreated | None: ...

    async def run_for_key(self, tenant: str, key: str) -> uuid.UUID | None:
        """The run the tenant's first decided goal with this idempotency key started."""
        ...

    async def applied_through(self) -> int: ...

    async def apply_log(self, batch: Sequence[tuple[int, AnyEvent]]) -> int: ...


def _checked(run_id: uuid.UUID, tenant: str, events: Sequence[EventEnvelope]) -> None:
    """A decision is the events of one run of one tenant, ending in its outcome."""
    if not events:
        raise ValueError(f"run {run_id}: a decision needs at least one event")
    if not isinstance(events[-1], DECIDING):
        raise ValueError(f"run {run_id}: a decision ends with plan.created or plan.rejected")
    for event in events:
        if event.run_id != run_id or event.tenant != tenant:
            raise ValueError(f"run {run_id}: event {event.event_id} is of another run or tenant")


def _log_decisions(batch: Sequence[tuple[int, AnyEvent]]) -> list[tuple[int, AnyEvent]]:
    """The deciding events of a log batch, the first one per run: a decision republished
    after JetStream's duplicate window is in the log twice, and the first one counts."""
    seen: set[uuid.UUID] = set()
    found: list[tuple[int, AnyEvent]] = []
    for seq, event in sorted(batch, key=lambda item: item[0]):
        if isinstance(event, DECIDING) and event.run_id not in seen:
            seen.add(event.run_id)
            found.append((seq, event))
    return found


def _roundtrip(event: EventEnvelope) -> EventEnvelope:
    return decode_event(encode_event(event))


class MemoryDecisionStore:
    """Dicts: for unit tests, and when no database is configured (rebuilt at each start)."""

    name = "memory (rebuilt from the log at start)"

    def __init__(self) -> None:
        self._decisions: dict[uuid.UUID, Decision] = {}
        self._runs_by_key: dict[tuple[str, str], uuid.UUID] = {}
        self._applied_through = 0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> bool:
        return True

    async def decision(self, run_id: uuid.UUID) -> Decision | None:
        return self._decisions.get(run_id)

    async def record(
        self, run_id: uuid.UUID, tenant: str, events: Sequence[EventEnvelope]
    ) -> Decision:
        _checked(run_id, tenant, events)
        existing = self._decisions.get(run_id)
        if existing is not None:
            return existing
        # Through the codec, as the Postgres store does: both return what decoding gives.
        decision = Decision(run_id, tenant, tuple(_roundtrip(e) for e in events), None)
        self._add(decision)
        return replace(decision, recorded_now=True)

    def _add(self, decision: Decision) -> None:
        self._decisions[decision.run_id] = decision
        if decision.idempotency_key is not None:
            key = (decision.tenant, decision.idempotency_key)
            self._runs_by_key.setdefault(key, decision.run_id)

    async def mark_published(self, run_id: uuid.UUID, seq: int) -> None:
        decision = self._decisions.get(run_id)
        if decision is None:
            raise KeyError(f"run {run_id} has no recorded decision")
        if decision.published_seq is None:
            self._decisions[run_id] = replace(decision, published_seq=seq)
        self._applied_through = max(self._applied_through, seq)

    async def recorded_plan(self, tenant: str, run_id: uuid.UUID) -> PlanCreated | None:
        decision = self._decisions.get(run_id)
        if decision is None or decision.tenant != tenant:
            return None
        return decision.plan_created

    async def run_for_key(self, tenant: str, key: str) -> uuid.UUID | None:
        return self._runs_by_key.get((tenant, key))

    async def applied_through(self) -> int:
        return self._applied_through

    async def apply_log(self, batch: Sequence[tuple[int, AnyEvent]]) -> int:
        if not batch:
            return 0
        changed = 0
        for seq, event in _log_decisions(batch):
            existing = self._decisions.get(event.run_id)
            if existing is None:
                self._add(Decision(event.run_id, event.tenant, (event,), seq))
                changed += 1
            elif existing.published_seq is None and existing.tenant == event.tenant:
                self._decisions[event.run_id] = replace(existing, published_seq=seq)
                changed += 1
        self._applied_through = max(self._applied_through, max(seq for seq, _ in batch))
        return changed


# Advisory lock key (arbitrary, unique within the planner's database): replicas starting
# together create the schema in turn, so CREATE TABLE IF NOT EXISTS cannot race.
_SCHEMA_LOCK = 7_461_101

# Every query names the run id (a decision for another tenant's run is filtered out after
# that lookup), except the idempotency-key lookup, which has its own partial index. Not a
# unique one: the log may hold two decisions for one key (two planner replicas racing on
# two goals with one key), and rebuilding from the log must never fail on that; the
# first decision is the one a key names.
SCHEMA = """
CREATE TABLE IF NOT EXISTS planner_decisions (
    run_id        uuid PRIMARY KEY,
    tenant        text NOT NULL,
    outcome       text NOT NULL,
    events        jsonb NOT NULL,
    published_seq bigint,
    recorded_at   timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE planner_decisions ADD COLUMN IF NOT EXISTS idempotency_key text;
CREATE INDEX IF NOT EXISTS planner_decisions_key_idx
    ON planner_decisions (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS planner_tracking (
    id       integer PRIMARY KEY CHECK (id = 1),
    last_seq bigint NOT NULL
);
"""

SELECT_DECISION = """
SELECT run_id, tenant, events, published_seq FROM planner_decisions WHERE run_id = $1
"""

SELECT_RUN_FOR_KEY = """
SELECT run_id FROM planner_decisions WHERE tenant = $1 AND idempotency_key = $2
ORDER BY published_seq NULLS LAST, recorded_at LIMIT 1
"""

INSERT_DECISION = """
INSERT INTO planner_decisions (run_id, tenant, outcome, events, idempotency_key)
VALUES ($1, $2, $3, $4::jsonb, $5)
ON CONFLICT (run_id) DO NOTHING
RETURNING run_id, tenant, events, published_seq
"""

# One statement, so the decision and how far the store reflects the stream move together.
# A decision already published keeps its seq: the first copy in the log is the one.
MARK_PUBLISHED = """
WITH marked AS (
    UPDATE planner_decisions SET published_seq = coalesce(published_seq, $2)
    WHERE run_id = $1
    RETURNING run_id
)
INSERT INTO planner_tracking (id, last_seq) SELECT 1, $2 FROM marked
ON CONFLICT (id) DO UPDATE SET last_seq = GREATEST(planner_tracking.last_seq, EXCLUDED.last_seq)
RETURNING last_seq
"""

# A deciding event of the log is a published decision: inserted when the run has none,
# otherwise only its missing published_seq is filled in (the recorded events stay).
APPLY_DECISIONS = """
INSERT INTO planner_decisions (run_id, tenant, outcome, events, published_seq, idempotency_key)
SELECT d.run_id, d.tenant, d.outcome, d.events::jsonb, d.seq, d.idempotency_key
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[])
     AS d(run_id, tenant, outcome, events, seq, idempotency_key)
ON CONFLICT (run_id) DO UPDATE SET published_seq = EXCLUDED.published_seq
WHERE planner_decisions.published_seq IS NULL AND planner_decisions.tenant = EXCLUDED.tenant
RETURNING run_id
"""

ADVANCE_TRACKING = """
INSERT INTO planner_tracking (id, last_seq) VALUES (1, $1)
ON CONFLICT (id) DO UPDATE SET last_seq = GREATEST(planner_tracking.last_seq, EXCLUDED.last_seq)
"""


def _events_json(events: Sequence[EventEnvelope]) -> str:
    # Each event is kept as its encoded JSON text (a jsonb array of strings), not as a
    # jsonb object: jsonb cannot hold the \u0000 escape a goal's text or inputs may carry,
    # and the text decodes back to the very events that were (or will be) published.
    return json.dumps([encode_event(event).decode() for event in events])


def _decision(record: asyncpg.Record) -> Decision:
    events = tuple(decode_event(text.encode()) for text in json.loads(record["events"]))
    seq = record["published_seq"]
    return Decision(record["run_id"], record["tenant"], events, None if seq is None else int(seq))


class PostgresDecisionStore:
    """The decisions in the planner's own PostgreSQL database, through a small pool."""

    name = "postgres"

    def __init__(self, url: str, *, connect_timeout_s: float = 30.0) -> None:
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("PostgresDecisionStore.start() was not called")
        return self._pool

    async def start(self) -> None:
        self._pool = await connect_pool(self.url, max_size=4, timeout_s=self.connect_timeout_s)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
            await conn.execute(SCHEMA)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def ping(self) -> bool:
        return bool(await self.pool.fetchval("SELECT 1") == 1)

    async def decision(self, run_id: uuid.UUID) -> Decision | None:
        record = await self.pool.fetchrow(SELECT_DECISION, run_id)
        return _decision(record) if record is not None else None

    async def record(
        self, run_id: uuid.UUID, tenant: str, events: Sequence[EventEnvelope]
    ) -> Decision:
        _checked(run_id, tenant, events)
        outcome = events[-1].type
        async with self.pool.acquire() as conn:
            record = await conn.fetchrow(
                INSERT_DECISION,
                run_id,
                tenant,
                outcome,
                _events_json(events),
                getattr(events[-1], "idempotency_key", None),
            )
            if record is not None:
                return replace(_decision(record), recorded_now=True)
            # Another replica (or an earlier attempt) recorded first. ON CONFLICT waited
            # for its transaction, so this new statement sees its row.
            record = await conn.fetchrow(SELECT_DECISION, run_id)
        if record is None:
            raise RuntimeError(f"run {run_id}: decision neither inserted nor found")
        return _decision(record)

    async def mark_published(self, run_id: uuid.UUID, seq: int) -> None:
        if await self.pool.fetchval(MARK_PUBLISHED, run_id, seq) is None:
            raise KeyError(f"run {run_id} has no recorded decision")

    async def recorded_plan(self, tenant: str, run_id: uuid.UUID) -> PlanCreated | None:
        record = await self.pool.fetchrow(
            SELECT_DECISION + " AND tenant = $2 AND outcome = 'plan.created'", run_id, tenant
        )
        return _decision(record).plan_created if record is not None else None

    async def run_for_key(self, tenant: str, key: str) -> uuid.UUID | None:
        run_id = await self.pool.fetchval(SELECT_RUN_FOR_KEY, tenant, key)
        return run_id if isinstance(run_id, uuid.UUID) else None

    async def applied_through(self) -> int:
        seq = await self.pool.fetchval("SELECT last_seq FROM planner_tracking WHERE id = 1")
        return int(seq or 0)

    async def apply_log(self, batch: Sequence[tuple[int, AnyEvent]]) -> int:
        if not batch:
            return 0
        found = _log_decisions(batch)
        columns: list[list[Any]] = [
            [event.run_id for _, event in found],
            [event.tenant for _, event in found],
            [event.type for _, event in found],
            [_events_json([event]) for _, event in found],
            [seq for seq, _ in found],
            [getattr(event, "idempotency_key", None) for _, event in found],
        ]
        # One transaction: the decisions and the seq they reach are applied together, so a
        # crash midway leaves the store where it was and the batch is read again.
        async with self.pool.acquire() as conn, conn.transaction():
            changed = len(await conn.fetch(APPLY_DECISIONS, *columns)) if found else 0
            await conn.execute(ADVANCE_TRACKING, max(seq for seq, _ in batch))
        return changed


def make_store(database_url: str | None) -> DecisionStore:
    if not database_url:
        return MemoryDecisionStore()
    return PostgresDecisionStore(database_url)
