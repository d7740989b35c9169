"""Checkpoints: the executor's state at a known position of the log, in Postgres.

A checkpoint is a pure function of a prefix of the log: the runs in progress (plan, each
step's status, attempt, output, cost), the ids of finished runs, and for each stream the
last sequence folded in. It is never taken from the live state (which holds claims the
log does not know yet); it is computed by folding the log from the previous checkpoint.
At start the executor loads the checkpoint and folds only what came after it, so a
restart costs the events since the last checkpoint, not the whole history.

Without a database (`AOS_EXECUTOR_DATABASE_URL` unset) the store keeps nothing and the
executor rebuilds from the whole log: fine for tests and demos, not for production.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import asyncpg

from aos_contracts.codec import EventDecodeError
from aos_contracts.events import (
    AnyEvent,
    PlanCreated,
    PlanRejected,
    RunAccepted,
    RunCancelRequested,
)
from aos_contracts.failures import Failure
from aos_contracts.plans import Plan, PlanStep
from aos_executor.runs import RunState, StepState, StepStatus
from aos_plumbing.bus import decode_placed

CONTEXTS = ("plans", "runs", "budget", "goals")

# Events that create a run in the executor's memory; others for an unknown run wait.
# run.accepted opens it before its plan, so that a run whose plan never comes (a stuck
# planner) still ends by its deadline.
OPENING = (RunAccepted, PlanCreated, PlanRejected, RunCancelRequested)
# The planner's events: they name the run's tenant for good.
_FROM_PLANNER = (RunAccepted, PlanCreated, PlanRejected)


@dataclass
class Book:
    """Runs in progress and the ids of finished ones: what the executor knows."""

    runs: dict[uuid.UUID, RunState] = field(default_factory=dict)
    finished: set[uuid.UUID] = field(default_factory=set)

    def fold(self, event: AnyEvent) -> RunState | None:
        if event.run_id in self.finished:
            return None
        state = self.runs.get(event.run_id)
        if state is not None and event.tenant != state.tenant:
            # A run belongs to the tenant the planner names (run.accepted, its plan).
            # Anything that arrived before under another tenant's name (a cancel naming
            # someone else's run id) is void; any later event from another tenant is
            # ignored.
            if isinstance(event, _FROM_PLANNER) and state.opened_at is None:
                state = None
                del self.runs[event.run_id]
            else:
                return None
        if state is None:
            if not isinstance(event, OPENING):
                return None
            state = self.runs[event.run_id] = RunState(event.run_id, event.tenant)
        state.apply(event)
        return state

    def finish(self, run_id: uuid.UUID) -> None:
        self.runs.pop(run_id, None)
        self.finished.add(run_id)

    def finish_terminal(self) -> None:
        for run_id in [run_id for run_id, state in self.runs.items() if state.terminal]:
            self.finish(run_id)


@dataclass
class Checkpoint:
    seqs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CONTEXTS, 0))
    book: Book = field(default_factory=Book)


# (context, first seq) -> (seq, subject, data) of every message from there on
ReadLog = Callable[[str, int], AsyncIterator[tuple[int, str, bytes]]]


async def fold_log(checkpoint: Checkpoint, read: ReadLog) -> int:
    """Fold every event after the checkpoint's sequences into it; returns how many."""
    count = 0
    for context in CONTEXTS:
        async for seq, subject, data in read(context, checkpoint.seqs.get(context, 0) + 1):
            checkpoint.seqs[context] = seq
            try:
                event = decode_placed(subject, data)
            except EventDecodeError:
                continue  # the live consumer parks it (undecodable or misplaced), with why
            count += 1
            checkpoint.book.fold(event)
    checkpoint.book.finish_terminal()
    return count


class CheckpointStore(Protocol):
    name: str

    async def load(self) -> Checkpoint: ...

    async def save(self, checkpoint: Checkpoint) -> None: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


class NoCheckpoints:
    """Keeps nothing: every start folds the whole log."""

    name = "none (full log replay)"

    async def load(self) -> Checkpoint:
        return Checkpoint()

    async def save(self, checkpoint: Checkpoint) -> None:
        return None

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


_MIGRATIONS = [
    """
    CREATE TABLE IF NOT EXISTS executor_checkpoint_seqs (
        stream_context text PRIMARY KEY,
        last_seq bigint NOT NULL
    );
    CREATE TABLE IF NOT EXISTS executor_checkpoint_runs (
        run_id uuid PRIMARY KEY,
        tenant text NOT NULL,
        state jsonb NOT NULL
    );
    CREATE TABLE IF NOT EXISTS executor_finished_runs (
        run_id uuid PRIMARY KEY
    );
    """,
]


class PostgresCheckpointStore:
    name = "postgres"

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def connect(cls, dsn: str) -> PostgresCheckpointStore:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        # One migration list, applied under an advisory lock so replicas starting
        # together do not race.
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(727001)")
            for statement in _MIGRATIONS:
                await conn.execute(statement)
        return cls(pool)

    async def load(self) -> Checkpoint:
        async with self.pool.acquire() as conn:
            seqs = await conn.fetch("SELECT stream_context, last_seq FROM executor_checkpoint_seqs")
            runs = await conn.fetch("SELECT state FROM executor_checkpoint_runs")
            finished = await conn.fetch("SELECT run_id FROM executor_finished_runs")
        checkpoint = Checkpoint()
        checkpoint.seqs.update({row["stream_context"]: int(row["last_seq"]) for row in seqs})
        for row in runs:
            state = run_from_dict(json.loads(row["state"]))
            checkpoint.book.runs[state.run_id] = state
        checkpoint.book.finished = {row["run_id"] for row in finished}
        return checkpoint

    async def save(self, checkpoint: Checkpoint) -> None:
        runs = [
            (state.run_id, state.tenant, json.dumps(run_to_dict(state)))
            for state in checkpoint.book.runs.values()
        ]
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM executor_checkpoint_runs")
            await conn.executemany(
                "INSERT INTO executor_checkpoint_runs (run_id, tenant, state) VALUES ($1, $2, $3)",
                runs,
            )
            await conn.execute(
                "INSERT INTO executor_finished_runs (run_id) SELECT unnest($1::uuid[]) "
                "ON CONFLICT DO NOTHING",
                list(checkpoint.book.finished),
            )
            await conn.executemany(
                "INSERT INTO executor_checkpoint_seqs (stream_context, last_seq) VALUES ($1, $2) "
                "ON CONFLICT (stream_context) DO UPDATE SET last_seq = EXCLUDED.last_seq",
                list(checkpoint.seqs.items()),
            )

    async def ping(self) -> bool:
        async with self.pool.acquire() as conn:
            return bool(await conn.fetchval("SELECT 1") == 1)

    async def close(self) -> None:
        await self.pool.close()


async def open_store(dsn: str | None) -> CheckpointStore:
    if not dsn:
        return NoCheckpoints()
    return await PostgresCheckpointStore.connect(dsn)


# --- RunState <-> JSON ---------------------------------------------------------------------


def run_to_dict(state: RunState) -> dict[str, Any]:
    return {
        "run_id": str(state.run_id),
        "tenant": state.tenant,
        "correlation_id": _str(state.correlation_id),
        "plan": state.plan.model_dump(mode="json") if state.plan else None,
        "plan_event_id": _str(state.plan_event_id),
        "inputs": state.inputs,
        "steps": [
            {
                "step": step.step.model_dump(mode="json"),
                "attempt": step.attempt,
                "status": step.status.value,
                "output": step.output,
                "cost_cents": step.cost_cents,
                "failure": step.failure.model_dump(mode="json") if step.failure else None,
                "key_attempt": step.key_attempt,
            }
            for step in state.steps.values()
        ],
        "rejection": state.rejection.model_dump(mode="json") if state.rejection else None,
        "cancel_reason": state.cancel_reason,
        "terminal": state.terminal,
        "planning_cost_cents": state.planning_cost_cents,
        "opened_at": _iso(state.opened_at),
        "deadline_at": _iso(state.deadline_at),
    }


def run_from_dict(data: dict[str, Any]) -> RunState:
    state = RunState(uuid.UUID(data["run_id"]), data["tenant"])
    state.correlation_id = _uuid(data.get("correlation_id"))
    state.plan = Plan.model_validate(data["plan"]) if data.get("plan") else None
    state.plan_event_id = _uuid(data.get("plan_event_id"))
    state.inputs = dict(data.get("inputs") or {})
    for item in data.get("steps", []):
        step = StepState(
            step=PlanStep.model_validate(item["step"]),
            attempt=int(item["attempt"]),
            status=StepStatus(item["status"]),
            output=item.get("output"),
            cost_cents=int(item.get("cost_cents", 0)),
            failure=Failure.model_validate(item["failure"]) if item.get("failure") else None,
            key_attempt=item.get("key_attempt"),
        )
        state.steps[step.step.id] = step
    if data.get("rejection"):
        state.rejection = PlanRejected.model_validate(data["rejection"])
    state.cancel_reason = data.get("cancel_reason")
    state.terminal = data.get("terminal")
    state.planning_cost_cents = int(data.get("planning_cost_cents", 0))
    state.opened_at = _datetime(data.get("opened_at"))
    if state.opened_at is None and (state.plan is not None or state.rejection is not None):
        # Saved before runs had deadlines: the default deadline counts from now.
        state.opened_at = datetime.now(UTC)
    state.deadline_at = _datetime(data.get("deadline_at"))
    return state


def _str(value: uuid.UUID | None) -> str | None:
    return None if value is None else str(value)


def _uuid(value: str | None) -> uuid.UUID | None:
    return None if value is None else uuid.UUID(value)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _datetime(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)
