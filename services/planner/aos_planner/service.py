"""The planner service: goal.submitted in, run.accepted + plan.created/plan.rejected out.

State: its decisions, in its own store (Postgres; in memory without a database), caught
up at start from its own stream, so a resubmitted goal never gets a second plan across
restarts. A decision is recorded before it is published and marked published after: a
goal redelivered after a crash in between republishes the recorded decision instead of
asking a paid backend again. Event ids derive from the goal's, so a republished event is
dropped by JetStream as a duplicate.

Planning calls of a paid backend are budgeted on the ledger like steps (metering.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Sequence

import nats
from anthropic import AsyncAnthropic

from aos_contracts.codec import EventDecodeError, decode_event, encode_event
from aos_contracts.events import (
    AnyEvent,
    EventEnvelope,
    GoalSubmitted,
    PlanRejected,
    type_names,
)
from aos_contracts.failures import FailureCode
from aos_contracts.plans import Plan
from aos_planner.anthropic_planner import AnthropicPlanner
from aos_planner.backend import Planner, Unmetered
from aos_planner.metering import LedgerMeter
from aos_planner.planning import (
    Planned,
    Refused,
    accepted_event,
    decision_event,
    goal_size_refusal,
    plan_goal,
    too_large_refusal,
    validation_problems,
)
from aos_planner.settings import PlannerSettings
from aos_planner.store import DecisionStore, make_store
from aos_planner.stub import StubPlanner
from aos_plumbing import metrics
from aos_plumbing.auth import (
    ROLE_SUBMIT,
    Authenticator,
    AuthError,
    Principal,
    bearer_token,
    message_time,
)
from aos_plumbing.bus import Delivery, EventBus, LogConsumer, per_run
from aos_plumbing.http import ServiceHttp
from aos_plumbing.reachability import AnthropicProbe

log = logging.getLogger(__name__)

PLANS = metrics.counter("aos_planner_decisions_total", "planner decisions", ("outcome", "backend"))
PLANNING_CENTS = metrics.counter(
    "aos_planning_cents_total", "what planning model calls cost, in cents", ("backend",)
)

CATCH_UP_BATCH = 500


class PlannerService:
    name = "planner"

    def __init__(self, settings: PlannerSettings) -> None:
        self.settings = settings
        self.planner = make_planner(settings)
        self.auth = Authenticator.from_settings(settings)
        self.store: DecisionStore = make_store(settings.database_url)
        self._run_locks = RunLocks()
        self.bus: EventBus | None = None
        self.consumer: LogConsumer | None = None
        self.http = ServiceHttp(self.name, settings.http_host, settings.http_port)
        self.http.backends = {
            "planner": self.planner.name,
            "decision_store": self.store.name,
            "auth": self.auth.mode,
            "rbac": self.auth.rbac_mode,
        }

    def validate(self, plan: Plan) -> list[str]:
        return validation_problems(plan, self.settings.plan_limits())

    async def start(self) -> None:
        self.bus = await EventBus.open(self.settings, self.name)
        await self.store.start()
        await self.catch_up()
        self.consumer = self.bus.consumer(
            "goals",
            "planner",
            per_run(self.handle),
            batch_size=self.settings.consumer_batch,
            event_types=type_names(GoalSubmitted),  # cancellations are the executor's
            # A planning call can take a minute: goals that arrive meanwhile are planned
            # in the next batches instead of waiting for it.
            batches_in_flight=self.settings.batches_in_flight,
        )
        await self.consumer.start()
        bus = self.bus
        self.http.add_check("nats", lambda: _true(bus.connected))
        self.http.add_check("decision_store", self.store.ping)
        key = self.settings.anthropic_api_key
        if self.settings.backend == "anthropic" and key is not None:
            probe = AnthropicProbe(key.get_secret_value(), self.settings.anthropic_base_url)
            self.http.add_check("anthropic", probe.check)
        await self.http.start()

    async def catch_up(self) -> None:
        """Bring the store up to the end of the plans stream: nothing to do when it is
        current, the whole stream when it is new or was wiped."""
        assert self.bus is not None
        start = await self.store.applied_through() + 1
        batch: list[tuple[int, AnyEvent]] = []
        changed = 0
        async for seq, msg in self.bus.replay("plans", start_seq=start):
            try:
                batch.append((seq, decode_event(msg.data)))
            except EventDecodeError:
                continue  # parked by the consumers that read it
            if len(batch) >= CATCH_UP_BATCH:
                changed += await self.store.apply_log(batch)
                batch = []
        changed += await self.store.apply_log(batch)
        log.info("planner store caught up from seq %d: %d decisions added", start, changed)

    async def stop(self) -> None:
        if self.consumer:
            await self.consumer.stop()
        await self.http.stop()
        if self.bus:
            await self.bus.close()
        await self.store.close()

    async def handle(self, delivery: Delivery) -> None:
        goal = delivery.event
        if not isinstance(goal, GoalSubmitted):
            return  # run.cancel_requested is the executor's business
        # Batches are handled concurrently: one run's goals (a redelivery, a reused run
        # id) are decided one at a time, so the second finds the first's decision.
        async with self._run_locks.hold(goal.run_id):
            await self._handle_goal(delivery, goal)

    async def _handle_goal(self, delivery: Delivery, goal: GoalSubmitted) -> None:
        assert self.bus is not None
        recorded = await self.store.decision(goal.run_id)
        if recorded is not None:
            if recorded.tenant != goal.tenant:
                # Another tenant's goal naming this run id: it must neither see nor change
                # the run, so it gets no answer at all.
                log.warning("run %s belongs to another tenant; goal ignored", goal.run_id)
            elif recorded.published_seq is None:
                # Decided before a crash, perhaps not published: publish what was decided
                # (same ids, so the log keeps one copy), never decide again.
                log.info("run %s: publishing the decision recorded before a restart", goal.run_id)
                await self._publish(goal, recorded.events)
            else:
                log.info("run %s already planned; goal redelivered or resubmitted", goal.run_id)
            return
        refusal, principal = self._admit(delivery, goal)
        if refusal is None:
            refusal = goal_size_refusal(goal, len(delivery.msg.data))
        if refusal is not None:
            events: list[EventEnvelope] = [refusal]
        else:
            events = await self._decide(goal, delivery.num_delivered, principal)
        decision = await self.store.record(goal.run_id, goal.tenant, events)
        await self._publish(goal, decision.events)
        if decision.recorded_now:  # another replica's decision was counted by it
            last = decision.events[-1]
            PLANS.labels(_outcome_label(last), self.planner.name).inc()
            cost = getattr(last, "planning_cost_cents", 0)
            if cost:
                PLANNING_CENTS.labels(self.planner.name).inc(cost)

    def _admit(
        self, delivery: Delivery, goal: GoalSubmitted
    ) -> tuple[PlanRejected | None, Principal | None]:
        """plan.rejected for a goal whose token does not allow it, or who the token names
        (None when tokens are not required).

        Refused at the door: no run.accepted, and the executor answers the rejection
        with run.failed, so the submitter sees why."""
        if not self.auth.enabled:
            return None, None
        try:
            principal = self.auth.authorize(
                bearer_token(delivery.msg.headers),
                tenant=goal.tenant,
                role=ROLE_SUBMIT,
                at=message_time(delivery.msg),
            )
        except AuthError as exc:
            log.warning("run %s: goal refused: %s", goal.run_id, exc.reason)
            refusal = goal.caused(
                PlanRejected, "plan.rejected", reasons=[exc.reason], code=exc.code
            )
            return refusal, None
        return None, principal

    def _skill_roles_refusal(
        self, outcome: Planned | Refused, principal: Principal | None
    ) -> Planned | Refused:
        """The outcome, or a FORBIDDEN refusal when the plan uses a skill whose role
        (AOS_SKILL_ROLES) the goal's token does not hold. Judged on the plan, so after
        planning: what planning cost stays charged."""
        if not isinstance(outcome, Planned) or principal is None or not self.auth.rbac_enforce:
            return outcome
        missing = [
            f"step {step.id!r} uses {step.skill}, which needs role {role!r}"
            for step in outcome.plan.steps
            if (role := self.settings.skill_roles.get(step.skill)) is not None
            and role not in principal.roles
        ]
        if not missing:
            return outcome
        return Refused(
            [f"the token may not use every skill of the plan: {'; '.join(missing)}"],
            FailureCode.FORBIDDEN,
            outcome.planning_cost_cents,
        )

    async def _decide(
        self, goal: GoalSubmitted, delivery_count: int, principal: Principal | None = None
    ) -> list[EventEnvelope]:
        """run.accepted (unless the meter published it already) and the decision.

        What keeps planning from finishing (the ledger or the model API not answering)
        raises, so the goal is tried again later, up to AOS_PLANNING_ATTEMPTS times;
        then the goal is rejected with DEPENDENCY_UNAVAILABLE (retryable), so that its
        submitter learns why instead of waiting on a run that never moves."""
        assert self.bus is not None
        accepted = accepted_event(goal, self.planner.name)
        if goal.reuse_plan_of is not None:
            return [accepted, await self._reuse(goal, goal.reuse_plan_of, principal)]
        meter = LedgerMeter(
            self.bus,
            goal,
            backend=self.planner.name,
            timeout_s=self.settings.ledger_timeout_s,
            publish_first=[accepted],
        )
        outcome: Planned | Refused
        try:
            outcome = await plan_goal(goal, self.planner, meter, validate=self.validate)
        except Exception as exc:  # any cause: re-raised, or reported in the rejection
            if delivery_count < self.settings.planning_attempts:
                raise
            log.warning("run %s: planning gave up after %d attempts", goal.run_id, delivery_count)
            outcome = Refused(
                [
                    f"planning did not finish after {delivery_count} attempts; the last "
                    f"failed with {type(exc).__name__}: {exc}"
                ],
                FailureCode.DEPENDENCY_UNAVAILABLE,
                meter.spent_cents,
            )
        finally:
            await meter.close()
        decision = decision_event(goal, self._skill_roles_refusal(outcome, principal))
        return [decision] if meter.published_first else [accepted, decision]

    async def _reuse(
        self, goal: GoalSubmitted, earlier: uuid.UUID, principal: Principal | None
    ) -> EventEnvelope:
        """The decision for a goal that names an earlier run's plan: that plan, validated
        and estimated again (skills and prices may have changed), with no backend call."""
        previous = await self.store.recorded_plan(goal.tenant, earlier)
        outcome: Planned | Refused
        if previous is None:
            outcome = Refused(
                [f"run {earlier} has no recorded plan for tenant {goal.tenant!r} to reuse"],
                FailureCode.PLAN_INVALID,
                0,
            )
            return decision_event(goal, outcome)
        outcome = await plan_goal(
            goal, self.planner, Unmetered(), validate=self.validate, recorded=previous.plan
        )
        outcome = self._skill_roles_refusal(outcome, principal)
        return decision_event(goal, outcome, reused_plan_of=earlier)

    async def _publish(self, goal: GoalSubmitted, events: Sequence[EventEnvelope]) -> None:
        assert self.bus is not None
        try:
            acks = await self.bus.publish_all(events)
        except nats.errors.MaxPayloadError as exc:
            # An event above the bus's max payload can never be published: retrying
            # would loop forever. The run ends rejected instead (what fit is published).
            sizes = ", ".join(f"{getattr(e, 'type')} {len(encode_event(e))} bytes" for e in events)
            log.error("run %s: decision too large for the bus (%s)", goal.run_id, sizes)
            refusal = too_large_refusal(
                goal, f"the planner's answer does not fit on the bus ({sizes}): {exc}"
            )
            acks = [await self.bus.publish(refusal)]
        await self.store.mark_published(goal.run_id, max(ack.seq for ack in acks))


class RunLocks:
    """A lock per run, kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[uuid.UUID, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, run_id: uuid.UUID) -> AsyncIterator[None]:
        lock, users = self._locks.get(run_id, (asyncio.Lock(), 0))
        self._locks[run_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[run_id]
            if users == 1:
                del self._locks[run_id]
            else:
                self._locks[run_id] = (lock, users - 1)


def _outcome_label(event: EventEnvelope) -> str:
    if isinstance(event, PlanRejected) and event.code in (
        FailureCode.UNAUTHORIZED,
        FailureCode.FORBIDDEN,
    ):
        return event.code.value.lower()
    return str(getattr(event, "type"))


def make_planner(settings: PlannerSettings) -> Planner:
    """The backend PLANNER_BACKEND names; a misconfiguration stops the service at start."""
    if settings.backend == "stub":
        return StubPlanner()
    if settings.anthropic_api_key is None:
        raise SystemExit("PLANNER_BACKEND=anthropic needs ANTHROPIC_API_KEY")
    client = AsyncAnthropic(
        api_key=settings.anthropic_api_key.get_secret_value(),
        base_url=settings.anthropic_base_url,
        max_retries=settings.anthropic_max_retries,
    )
    return AnthropicPlanner(
        client,
        model=settings.planner_model,
        max_tokens=settings.planner_max_tokens,
        limits=settings.plan_limits(),
    )


async def _true(value: bool) -> bool:
    return value
