"""The Postgres trace store: events, runs, steps, parked, tracking, in the tracer's own DB.

Each batch is one transaction of a handful of statements whatever its size (arrays
through `unnest`, not a round trip per event), so tracing keeps up with the bus.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import asyncpg

from aos_plumbing.postgres import connect_pool
from aos_tracer.projection import Projector, StepKey, aware, no_nul
from aos_tracer.rows import EventRow, ParkedRow, RunRow, StepRow, TracedEvent
from aos_tracer.store import distinct, step_order

log = logging.getLogger(__name__)

# Applied in order, once each; a released migration is never edited, only followed.
MIGRATIONS: list[str] = [
    # 1: the event log as the tracer saw it
    """
    CREATE TABLE events (
        event_id    uuid PRIMARY KEY,
        stream      text NOT NULL,
        stream_seq  bigint NOT NULL,
        subject     text NOT NULL,
        type        text NOT NULL,
        run_id      uuid NOT NULL,
        tenant      text NOT NULL,
        occurred_at timestamptz NOT NULL,
        payload     jsonb NOT NULL,
        UNIQUE (stream, stream_seq)
    );
    CREATE INDEX events_run_idx ON events (run_id, occurred_at);
    """,
    # 2: the runs projection
    """
    CREATE TABLE runs (
        run_id       uuid PRIMARY KEY,
        tenant       text NOT NULL,
        goal         text,
        status       text NOT NULL
                     CHECK (status IN ('submitted', 'running', 'completed', 'failed', 'cancelled')),
        budget_cents bigint,
        cost_cents   bigint NOT NULL DEFAULT 0,
        created_at   timestamptz NOT NULL,
        updated_at   timestamptz NOT NULL,
        ended_at     timestamptz
    );
    CREATE INDEX runs_created_idx ON runs (created_at DESC);
    CREATE INDEX runs_tenant_created_idx ON runs (tenant, created_at DESC);
    """,
    # 3: the steps projection
    """
    CREATE TABLE steps (
        run_id      uuid NOT NULL,
        step_id     text NOT NULL,
        skill       text,
        status      text NOT NULL,
        attempts    integer NOT NULL DEFAULT 0,
        started_at  timestamptz,
        ended_at    timestamptz,
        duration_ms double precision NOT NULL DEFAULT 0,
        cost_cents  bigint NOT NULL DEFAULT 0,
        tokens      bigint,
        error_code  text,
        PRIMARY KEY (run_id, step_id)
    );
    """,
    # 4: parked messages, and how far each stream has been applied
    """
    CREATE TABLE parked (
        service    text NOT NULL,
        reason     text NOT NULL,
        stream     text NOT NULL,
        stream_seq bigint NOT NULL,
        subject    text NOT NULL,
        payload    jsonb NOT NULL,
        parked_at  timestamptz NOT NULL,
        UNIQUE (service, stream, stream_seq)
    );
    CREATE INDEX parked_at_idx ON parked (parked_at DESC);
    CREATE TABLE tracking (
        stream   text PRIMARY KEY,
        last_seq bigint NOT NULL
    );
    """,
    # 5: parked messages get their id (the parked stream's sequence) and a replay mark.
    # Rows from before have no id: they are dropped with the parked stream's tracking,
    # so the parked consumer reads them again from the stream, ids and all.
    """
    ALTER TABLE parked ADD COLUMN parked_seq bigint, ADD COLUMN replayed_at timestamptz;
    DELETE FROM parked;
    DELETE FROM tracking WHERE stream LIKE '%\\_PARKED';
    CREATE UNIQUE INDEX parked_seq_idx ON parked (parked_seq);
    """,
]

# Advisory lock keys (arbitrary constants, unique within the tracer's database).
_MIGRATION_LOCK = 7_461_001
# Projections are read-modify-write: batches from the four streams (and from several
# tracer replicas) take turns, so two batches touching one run cannot lose an update.
_PROJECTION_LOCK = 7_461_002

# Column -> Postgres type, for the projections' batched upserts through unnest.
RUN_COLUMNS = {
    "run_id": "uuid",
    "tenant": "text",
    "goal": "text",
    "status": "text",
    "budget_cents": "bigint",
    "cost_cents": "bigint",
    "created_at": "timestamptz",
    "updated_at": "timestamptz",
    "ended_at": "timestamptz",
}
STEP_COLUMNS = {
    "run_id": "uuid",
    "step_id": "text",
    "skill": "text",
    "status": "text",
    "attempts": "integer",
    "started_at": "timestamptz",
    "ended_at": "timestamptz",
    "duration_ms": "double precision",
    "cost_cents": "bigint",
    "tokens": "bigint",
    "error_code": "text",
}


def _upsert(table: str, columns: dict[str, str], key: str) -> str:
    arrays = ", ".join(
        f"${index}::{kind}[]" for index, kind in enumerate(columns.values(), start=1)
    )
    updates = ", ".join(f"{column} = EXCLUDED.{column}" for column in columns)
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM unnest({arrays}) "
        f"ON CONFLICT ({key}) DO UPDATE SET {updates}"
    )


UPSERT_RUNS = _upsert("runs", RUN_COLUMNS, "run_id")
UPSERT_STEPS = _upsert("steps", STEP_COLUMNS, "run_id, step_id")
SELECT_RUNS = f"SELECT {', '.join(RUN_COLUMNS)} FROM runs"
SELECT_STEPS = f"SELECT {', '.join(STEP_COLUMNS)} FROM steps"

INSERT_EVENTS = """
INSERT INTO events
    (event_id, stream, stream_seq, subject, type, run_id, tenant, occurred_at, payload)
SELECT e.event_id, $1, e.stream_seq, e.subject, e.type, e.run_id, e.tenant, e.occurred_at,
       e.payload::jsonb
FROM unnest($2::uuid[], $3::bigint[], $4::text[], $5::text[], $6::uuid[], $7::text[],
            $8::timestamptz[], $9::text[])
     AS e(event_id, stream_seq, subject, type, run_id, tenant, occurred_at, payload)
ON CONFLICT DO NOTHING
RETURNING event_id
"""

INSERT_PARKED = """
INSERT INTO parked
    (service, reason, stream, stream_seq, subject, payload, parked_at, parked_seq)
SELECT p.service, p.reason, p.stream, p.stream_seq, p.subject, p.payload::jsonb, p.parked_at,
       p.parked_seq
FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[],
            $7::timestamptz[], $8::bigint[])
     AS p(service, reason, stream, stream_seq, subject, payload, parked_at, parked_seq)
ON CONFLICT DO NOTHING
"""

SELECT_PARKED = (
    "SELECT service, reason, stream, stream_seq, subject, parked_at, payload, parked_seq,"
    " replayed_at FROM parked"
)

ADVANCE_TRACKING = """
INSERT INTO tracking (stream, last_seq) VALUES ($1, $2)
ON CONFLICT (stream) DO UPDATE SET last_seq = GREATEST(tracking.last_seq, EXCLUDED.last_seq)
"""


def pg_json(value: Any) -> str:
    """JSON text jsonb accepts: jsonb refuses the \\u0000 escape, so NULs become U+FFFD."""
    text = json.dumps(value, separators=(",", ":"))
    if "\\u0000" in text:
        text = json.dumps(_without_nul(value), separators=(",", ":"))
    return text


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return no_nul(value)
    if isinstance(value, dict):
        return {no_nul(str(key)): _without_nul(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_nul(item) for item in value]
    return value


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


class PostgresTraceStore:
    backend = "postgres"

    def __init__(self, dsn: str, *, connect_timeout_s: float = 30.0) -> None:
        self.dsn = dsn
        self.connect_timeout_s = connect_timeout_s
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("PostgresTraceStore.start() was not called")
        return self._pool

    async def start(self) -> None:
        self._pool = await connect_pool(
            self.dsn, max_size=8, init=_init_connection, timeout_s=self.connect_timeout_s
        )
        async with self.pool.acquire() as conn:
            await migrate(conn)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def ping(self) -> bool:
        return bool(await self.pool.fetchval("SELECT 1") == 1)

    async def last_seq(self, stream: str) -> int:
        seq = await self.pool.fetchval("SELECT last_seq FROM tracking WHERE stream = $1", stream)
        return int(seq or 0)

    async def apply(self, stream: str, batch: Sequence[TracedEvent]) -> int:
        if not batch:
            return 0
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _PROJECTION_LOCK)
            batch = distinct(batch)
            inserted = {
                record["event_id"]
                for record in await conn.fetch(INSERT_EVENTS, stream, *_event_columns(batch))
            }
            stored = [traced for traced in batch if traced.event.event_id in inserted]
            if stored:
                await _project(conn, stored)
            await conn.execute(ADVANCE_TRACKING, stream, max(t.stream_seq for t in batch))
        return len(stored)

    async def add_parked(self, stream: str, last_seq: int, rows: Sequence[ParkedRow]) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            if rows:
                await conn.execute(
                    INSERT_PARKED,
                    [no_nul(row.service) for row in rows],
                    [no_nul(row.reason) for row in rows],
                    [no_nul(row.stream) for row in rows],
                    [row.stream_seq for row in rows],
                    [no_nul(row.subject) for row in rows],
                    [pg_json(row.payload) for row in rows],
                    [row.parked_at for row in rows],
                    [row.parked_seq for row in rows],
                )
            await conn.execute(ADVANCE_TRACKING, stream, last_seq)

    async def list_runs(
        self, *, tenant: str | None, status: str | None, limit: int
    ) -> list[RunRow]:
        records = await self.pool.fetch(
            SELECT_RUNS
            + " WHERE ($1::text IS NULL OR tenant = $1) AND ($2::text IS NULL OR status = $2)"
            " ORDER BY created_at DESC, run_id DESC LIMIT $3",
            tenant,
            status,
            limit,
        )
        return [RunRow(**dict(record)) for record in records]

    async def get_run(self, run_id: uuid.UUID) -> RunRow | None:
        record = await self.pool.fetchrow(SELECT_RUNS + " WHERE run_id = $1", run_id)
        return RunRow(**dict(record)) if record is not None else None

    async def run_steps(self, run_id: uuid.UUID) -> list[StepRow]:
        records = await self.pool.fetch(SELECT_STEPS + " WHERE run_id = $1", run_id)
        return sorted((StepRow(**dict(record)) for record in records), key=step_order)

    async def run_events(self, run_id: uuid.UUID) -> list[EventRow]:
        records = await self.pool.fetch(
            # Another tenant's events naming this run id are not the run's.
            "SELECT stream, stream_seq, type, occurred_at, payload FROM events"
            " WHERE run_id = $1 AND tenant = (SELECT tenant FROM runs WHERE run_id = $1)"
            " ORDER BY occurred_at, stream, stream_seq",
            run_id,
        )
        return [EventRow(**dict(record)) for record in records]

    async def list_parked(self, limit: int, status: str | None = None) -> list[ParkedRow]:
        records = await self.pool.fetch(
            SELECT_PARKED + " WHERE ($2::text IS NULL OR (replayed_at IS NULL) = ($2 = 'parked'))"
            " ORDER BY parked_at DESC, stream, stream_seq LIMIT $1",
            limit,
            status,
        )
        return [ParkedRow(**dict(record)) for record in records]

    async def get_parked(self, parked_seq: int) -> ParkedRow | None:
        record = await self.pool.fetchrow(SELECT_PARKED + " WHERE parked_seq = $1", parked_seq)
        return ParkedRow(**dict(record)) if record is not None else None

    async def mark_replayed(self, parked_seq: int, at: datetime) -> ParkedRow | None:
        await self.pool.execute(
            "UPDATE parked SET replayed_at = $2 WHERE parked_seq = $1 AND replayed_at IS NULL",
            parked_seq,
            at,
        )
        return await self.get_parked(parked_seq)

    async def drop_parked(self, parked_seq: int) -> bool:
        status = await self.pool.execute("DELETE FROM parked WHERE parked_seq = $1", parked_seq)
        return bool(status != "DELETE 0")


async def migrate(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        # Replicas starting together take turns; the second finds nothing left to do.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        applied = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
        for version, sql in enumerate(MIGRATIONS, start=1):
            if version > applied:
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
                log.info("tracer schema migrated to version %d", version)


def _event_columns(batch: Sequence[TracedEvent]) -> list[list[Any]]:
    return [
        [traced.event.event_id for traced in batch],
        [traced.stream_seq for traced in batch],
        [no_nul(traced.subject) for traced in batch],
        [traced.event.type for traced in batch],
        [traced.event.run_id for traced in batch],
        [traced.event.tenant for traced in batch],
        [aware(traced.event.occurred_at) for traced in batch],
        [pg_json(traced.event.model_dump(mode="json")) for traced in batch],
    ]


async def _project(conn: asyncpg.Connection, stored: Sequence[TracedEvent]) -> None:
    """Load the rows the events touch, run the projection over them, write back what changed."""
    run_ids = list({traced.event.run_id for traced in stored})
    runs = {
        record["run_id"]: RunRow(**dict(record))
        for record in await conn.fetch(SELECT_RUNS + " WHERE run_id = ANY($1::uuid[])", run_ids)
    }
    steps: dict[StepKey, StepRow] = {}
    for record in await conn.fetch(SELECT_STEPS + " WHERE run_id = ANY($1::uuid[])", run_ids):
        step = StepRow(**dict(record))
        steps[(step.run_id, step.step_id)] = step
    projector = Projector(runs, steps)
    for traced in stored:
        projector.apply(traced.event)
    changed_runs = [runs[run_id] for run_id in projector.touched_runs]
    changed_steps = [steps[key] for key in projector.touched_steps]
    if changed_runs:
        await conn.execute(UPSERT_RUNS, *_columns(changed_runs, RUN_COLUMNS))
    if changed_steps:
        await conn.execute(UPSERT_STEPS, *_columns(changed_steps, STEP_COLUMNS))


def _columns(rows: Sequence[object], columns: Iterable[str]) -> list[list[Any]]:
    return [[getattr(row, column) for row in rows] for column in columns]
