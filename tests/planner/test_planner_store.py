"""The planner's decision store, in memory and on PostgreSQL: the same behaviour from both."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import pytest

from aos_cli.embedded import InfraUrls
from aos_contracts.events import (
    AnyEvent,
    EventEnvelope,
    GoalSubmitted,
    PlanCreated,
    PlanRejected,
    RunAccepted,
    RunCompleted,
)
from aos_contracts.failures import FailureCode
from aos_contracts.plans import Plan, PlanStep
from aos_planner.store import (
    DecisionStore,
    MemoryDecisionStore,
    PostgresDecisionStore,
    make_store,
)

MakeStore = Callable[[], Awaitable[DecisionStore]]


@dataclass
class Backend:
    kind: str
    infra: InfraUrls | None = None
    database: str | None = None  # the `database` fixture's fresh database


@pytest.fixture(params=["memory", "postgres"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "memory":
        return Backend("memory")
    return Backend(
        "postgres", request.getfixturevalue("infra"), request.getfixturevalue("database")
    )


@pytest.fixture
async def new_store(backend: Backend) -> AsyncIterator[MakeStore]:
    """Makes stores of one kind. On Postgres the first one is on the `database` fixture's
    database and each further one on a new, empty database: a wiped store."""
    opened: list[DecisionStore] = []
    extra: list[str] = []

    async def make() -> DecisionStore:
        store: DecisionStore
        if backend.kind == "memory":
            store = MemoryDecisionStore()
        else:
            assert backend.infra is not None and backend.database is not None
            url = backend.database
            if opened:
                name = f"aos_test_{uuid.uuid4().hex[:12]}"
                await _admin(backend.infra, f'CREATE DATABASE "{name}"')
                extra.append(name)
                url = backend.infra.database_url(name)
            store = PostgresDecisionStore(url)
        await store.start()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()
    for name in extra:
        assert backend.infra is not None
        await _admin(backend.infra, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _admin(infra: InfraUrls, sql: str) -> None:
    conn = await asyncpg.connect(infra.postgres_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
async def store(new_store: MakeStore) -> DecisionStore:
    return await new_store()


def goal(tenant: str = "acme", budget: int = 10) -> GoalSubmitted:
    return GoalSubmitted(
        run_id=uuid.uuid4(), tenant=tenant, goal="summarize the notes", budget_cents=budget
    )


def accepted(g: GoalSubmitted) -> RunAccepted:
    return g.caused(
        RunAccepted,
        "run.accepted",
        goal=g.goal,
        budget_cents=g.budget_cents,
        planner_backend="stub",
    )


def created(g: GoalSubmitted, text: str = "hello") -> PlanCreated:
    plan = Plan(
        steps=[PlanStep(id="summarize", skill="json_transform", params={"text": text})],
        rationale="one step",
    )
    return g.caused(
        PlanCreated, "plan.created", plan=plan, estimated_cents=0, budget_cents=g.budget_cents
    )


def rejected(g: GoalSubmitted) -> PlanRejected:
    return g.caused(
        PlanRejected, "plan.rejected", reasons=["too dear"], code=FailureCode.BUDGET_EXCEEDED
    )


def planned(tenant: str = "acme", text: str = "hello") -> tuple[GoalSubmitted, list[EventEnvelope]]:
    g = goal(tenant)
    return g, [accepted(g), created(g, text)]


async def test_a_recorded_decision_reads_back_with_the_same_events(store: DecisionStore) -> None:
    g, events = planned()
    decision = await store.record(g.run_id, g.tenant, events)
    assert decision.events == tuple(events)
    assert decision.published_seq is None
    assert decision.outcome == "plan.created"
    assert decision.plan_created == events[-1]
    again = await store.decision(g.run_id)
    assert again == decision
    assert [e.event_id for e in again.events] == [e.event_id for e in events]
    assert [type(e) for e in again.events] == [RunAccepted, PlanCreated]


async def test_events_survive_exactly_even_with_nul_and_unicode(store: DecisionStore) -> None:
    g, events = planned(text="nul \x00 here, ünïcødé ✓")
    await store.record(g.run_id, g.tenant, events)
    decision = await store.decision(g.run_id)
    assert decision is not None and decision.events == tuple(events)


async def test_a_rejection_is_a_decision_too(store: DecisionStore) -> None:
    g = goal()
    refusal = rejected(g)
    decision = await store.record(g.run_id, g.tenant, [refusal])
    assert decision.outcome == "plan.rejected"
    assert decision.plan_created is None
    assert (await store.decision(g.run_id)) == decision


async def test_the_first_recorded_decision_wins(store: DecisionStore) -> None:
    g, first = planned(text="first")
    second = [accepted(g), created(g, "second")]
    kept = await store.record(g.run_id, g.tenant, first)
    answer = await store.record(g.run_id, g.tenant, second)
    assert answer == kept
    assert answer.events == tuple(first)
    stored = await store.decision(g.run_id)
    assert stored is not None and stored.events == tuple(first)


async def test_a_decision_must_end_in_an_outcome_of_its_own_run(store: DecisionStore) -> None:
    g, events = planned()
    with pytest.raises(ValueError):
        await store.record(g.run_id, g.tenant, [])
    with pytest.raises(ValueError):
        await store.record(g.run_id, g.tenant, events[:1])
    with pytest.raises(ValueError):
        await store.record(uuid.uuid4(), g.tenant, events)
    with pytest.raises(ValueError):
        await store.record(g.run_id, "other", events)
    assert await store.decision(g.run_id) is None


async def test_mark_published_sets_the_seq_and_advances_applied_through(
    store: DecisionStore,
) -> None:
    assert await store.applied_through() == 0
    g, events = planned()
    await store.record(g.run_id, g.tenant, events)
    await store.mark_published(g.run_id, 7)
    decision = await store.decision(g.run_id)
    assert decision is not None and decision.published_seq == 7
    assert await store.applied_through() == 7
    # Published once, it stays where the log first holds it; the tracking never goes back.
    await store.mark_published(g.run_id, 5)
    decision = await store.decision(g.run_id)
    assert decision is not None and decision.published_seq == 7
    assert await store.applied_through() == 7
    # A later decision moves the tracking on.
    h, more = planned()
    await store.record(h.run_id, h.tenant, more)
    await store.mark_published(h.run_id, 9)
    assert await store.applied_through() == 9


async def test_mark_published_of_an_unrecorded_run_fails_and_changes_nothing(
    store: DecisionStore,
) -> None:
    with pytest.raises(KeyError):
        await store.mark_published(uuid.uuid4(), 3)
    assert await store.applied_through() == 0


async def test_recorded_plan_only_for_its_tenant_and_only_a_plan(store: DecisionStore) -> None:
    g, events = planned(tenant="acme")
    await store.record(g.run_id, g.tenant, events)
    assert await store.recorded_plan("acme", g.run_id) == events[-1]
    assert await store.recorded_plan("globex", g.run_id) is None
    r = goal("acme")
    await store.record(r.run_id, r.tenant, [accepted(r), rejected(r)])
    assert await store.recorded_plan("acme", r.run_id) is None
    assert await store.recorded_plan("acme", uuid.uuid4()) is None


async def test_an_unknown_run_has_no_decision(store: DecisionStore) -> None:
    assert await store.decision(uuid.uuid4()) is None
    assert await store.ping()


def the_log() -> tuple[list[tuple[int, AnyEvent]], list[GoalSubmitted]]:
    """A plans stream: two plans, one rejection, a refusal, and events that are no decision."""
    a, b, c, d = goal("acme"), goal("globex"), goal("acme"), goal("acme")
    log: list[tuple[int, AnyEvent]] = [
        (1, accepted(a)),
        (2, created(a, "a")),
        (3, accepted(b)),
        (4, created(b, "b")),
        (5, accepted(c)),
        (6, rejected(c)),
        (7, rejected(d)),
        (8, a.caused(RunCompleted, "run.completed", outputs={})),
    ]
    return log, [a, b, c, d]


async def test_apply_log_makes_published_decisions_and_tracks_the_seq(store: DecisionStore) -> None:
    log, (a, b, c, d) = the_log()
    assert await store.apply_log(log[:4]) == 2
    assert await store.applied_through() == 4
    assert await store.apply_log(log[4:]) == 2
    assert await store.applied_through() == 8
    decision = await store.decision(a.run_id)
    assert decision is not None
    assert decision.events == (log[1][1],) and decision.published_seq == 2
    assert (await store.recorded_plan("acme", a.run_id)) == log[1][1]
    assert (await store.recorded_plan("globex", b.run_id)) == log[3][1]
    assert (await store.recorded_plan("acme", b.run_id)) is None
    rejected_c = await store.decision(c.run_id)
    assert rejected_c is not None and rejected_c.outcome == "plan.rejected"
    assert rejected_c.published_seq == 6
    refused_d = await store.decision(d.run_id)
    assert refused_d is not None and refused_d.published_seq == 7


async def test_apply_log_is_idempotent(store: DecisionStore) -> None:
    log, goals = the_log()
    assert await store.apply_log(log) == 4
    before = [await store.decision(g.run_id) for g in goals]
    assert await store.apply_log(log) == 0
    assert await store.apply_log(log[:3]) == 0
    assert [await store.decision(g.run_id) for g in goals] == before
    assert await store.applied_through() == 8  # an older batch does not move it back
    assert await store.apply_log([]) == 0


async def test_apply_log_completes_a_recorded_decision_and_keeps_its_events(
    store: DecisionStore,
) -> None:
    g, events = planned()
    recorded = await store.record(g.run_id, g.tenant, events)
    # The planner crashed after publishing, before marking: the log holds the decision.
    assert await store.apply_log([(11, events[0]), (12, events[1])]) == 1  # type: ignore[list-item]
    decision = await store.decision(g.run_id)
    assert decision is not None
    assert decision.events == recorded.events and decision.published_seq == 12
    assert await store.applied_through() == 12
    # A later copy of the same decision (republished past the duplicate window) is ignored.
    assert await store.apply_log([(20, events[1])]) == 0  # type: ignore[list-item]
    decision = await store.decision(g.run_id)
    assert decision is not None and decision.published_seq == 12


async def test_apply_log_keeps_the_first_copy_within_one_batch(store: DecisionStore) -> None:
    g, events = planned()
    plan = events[1]
    assert await store.apply_log([(30, plan), (31, plan)]) == 1  # type: ignore[list-item]
    decision = await store.decision(g.run_id)
    assert decision is not None and decision.published_seq == 30


async def test_apply_log_rebuilds_what_the_live_path_answers(new_store: MakeStore) -> None:
    """The live path (record, publish, mark) and a wiped store rebuilt from the log agree
    on every question the planner asks."""
    live = await new_store()
    goals: list[GoalSubmitted] = []
    log: list[tuple[int, AnyEvent]] = []
    for tenant, outcome in [("acme", "plan"), ("globex", "plan"), ("acme", "reject")]:
        g = goal(tenant)
        decided: list[EventEnvelope] = [accepted(g)]
        decided.append(created(g, tenant) if outcome == "plan" else rejected(g))
        await live.record(g.run_id, g.tenant, decided)
        for event in decided:
            log.append((len(log) + 1, event))  # type: ignore[arg-type]
        await live.mark_published(g.run_id, len(log))
        goals.append(g)

    rebuilt = await new_store()  # a new database: the store wiped
    assert await rebuilt.applied_through() == 0
    assert await rebuilt.apply_log(log) == len(goals)
    assert await rebuilt.applied_through() == await live.applied_through() == len(log)
    for g in goals:
        before, after = await live.decision(g.run_id), await rebuilt.decision(g.run_id)
        assert before is not None and after is not None
        assert (after.run_id, after.tenant, after.outcome, after.published_seq) == (
            before.run_id,
            before.tenant,
            before.outcome,
            before.published_seq,
        )
        assert after.events[-1] == before.events[-1]
        for tenant in ("acme", "globex"):
            assert await rebuilt.recorded_plan(tenant, g.run_id) == await live.recorded_plan(
                tenant, g.run_id
            )


async def test_the_tracking_seq_moves_with_the_decisions(database: str) -> None:
    """The seq is written in the same transaction as the decisions: a batch that fails
    leaves neither."""
    store = PostgresDecisionStore(database)
    await store.start()
    try:
        log, goals = the_log()
        await store.apply_log(log[:2])
        conn = await asyncpg.connect(database)
        try:
            # Make the decisions' insert fail inside apply_log's transaction.
            await conn.execute(
                "ALTER TABLE planner_decisions ADD CONSTRAINT no_globex CHECK (tenant <> 'globex')"
            )
            with pytest.raises(asyncpg.CheckViolationError):
                await store.apply_log(log[2:])
            assert await store.applied_through() == 2
            assert await store.decision(goals[2].run_id) is None
            await conn.execute("ALTER TABLE planner_decisions DROP CONSTRAINT no_globex")
        finally:
            await conn.close()
        assert await store.apply_log(log[2:]) == 3
        assert await store.applied_through() == 8
    finally:
        await store.close()


async def test_two_replicas_start_on_one_database_at_once(database: str) -> None:
    stores = [PostgresDecisionStore(database) for _ in range(3)]
    await asyncio.gather(*(s.start() for s in stores))
    try:
        g, events = planned()
        answers = await asyncio.gather(
            *(s.record(g.run_id, g.tenant, events) for s in stores),
            stores[0].record(g.run_id, g.tenant, [accepted(g), created(g, "other")]),
        )
        assert len({answer.events[-1].event_id for answer in answers}) == 1
        assert all(answer == answers[0] for answer in answers)
    finally:
        for s in stores:
            await s.close()


def test_make_store_picks_the_backend() -> None:
    assert isinstance(make_store(None), MemoryDecisionStore)
    assert isinstance(make_store(""), MemoryDecisionStore)
    assert isinstance(make_store("postgresql://x@127.0.0.1/db"), PostgresDecisionStore)
