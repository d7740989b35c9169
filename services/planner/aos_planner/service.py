"""The planner service: goal.submitted in, run.accepted + plan.created/plan.rejected out.

It is also the gate of the tenants' door (docs/SECURITY.md): a run id belongs to the
tenant of its first admitted goal (`EventBus.run_owner`), an idempotency key names one
run per tenant, and a goal or cancel that names another tenant's run, an unknown run or
a used key is answered with request.refused on the sender's own subjects.

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
from collections.abc import AsyncIterator, Hashable, Sequence

import nats
from anthropic import AsyncAnthropic

from aos_contracts.codec import EventDecodeError, encode_event
from aos_contracts.events import (
    AnyEvent,
    EventEnvelope,
    GoalSubmitted,
    PlanningCallFinished,
    PlanRejected,
    RequestRefused,
    RunCancelRequested,
    type_names,
)
from aos_contracts.failures import Failure, FailureCode
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
from aos_planner.store import DECIDING, DecisionStore, make_store
from aos_planner.stub import StubPlanner
from aos_plumbing import metrics
from aos_plumbing.auth import ROLE_SUBMIT, Authenticator, AuthError, Principal
from aos_plumbing.bus import Delivery, EventBus, LogConsumer, decode_placed, per_run
from aos_plumbing.http import ServiceHttp
from aos_plumbing.outages import describe, is_outage
from aos_plumbing.reachability import AnthropicProbe

log = logging.getLogger(__name__)

PLANS = metrics.counter("aos_planner_decisions_total", "planner decisions", ("outcome", "backend"))
REFUSALS = metrics.counter(
    "aos_requests_refused_total",
    "goals and cancels answered with request.refused, by request type and code",
    ("request", "code"),
)
PLANNING_CENTS = metrics.counter(
    "aos_planning_cents_total", "what planning model calls cost, in cents", ("backend",)
)

CATCH_UP_BATCH = 500
# Recording a decision published while the store was down: first retry after this long.
RECORD_RETRY_S = 1.0


class PlannerService:
    name = "planner"

    def __init__(self, settings: PlannerSettings) -> None:
        self.settings = settings
        self.planner = make_planner(settings)
        self.auth = Authenticator.from_settings(settings)
        self.store: DecisionStore = make_store(settings.database_url)
        self._run_locks = RunLocks()
        self._recording: set[asyncio.Task[None]] = set()
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
            per_run(
                self.handle,
                give_up=self.give_up,
                give_up_after_s=self.settings.outage_give_up_s,
            ),
            batch_size=self.settings.consumer_batch,
            # Cancels are the executor's to apply; the planner answers those it must refuse.
            event_types=type_names(GoalSubmitted, RunCancelRequested),
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
            self.http.add_advisory("anthropic", probe.problem)
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
                batch.append((seq, decode_placed(msg.subject, msg.data)))
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
        for task in self._recording:
            task.cancel()  # the next start's catch-up records them from the log
        await self.http.stop()
        if self.bus:
            await self.bus.close()
        await self.store.close()

    async def handle(self, delivery: Delivery) -> None:
        event = delivery.event
        if isinstance(event, RunCancelRequested):
            async with self._run_locks.hold(event.run_id):
                await self._answer_cancel(event)
            return
        if not isinstance(event, GoalSubmitted):
            return
        # Batches are handled concurrently: one run's goals (a redelivery, a reused run
        # id) are decided one at a time, so the second finds the first's decision; and so
        # are one tenant's goals with one idempotency key (inside the run's lock: always
        # taken in that order, so two goals cannot wait for each other).
        async with contextlib.AsyncExitStack() as locks:
            await locks.enter_async_context(self._run_locks.hold(event.run_id))
            if event.idempotency_key is not None:
                key = ("idempotency", event.tenant, event.idempotency_key)
                await locks.enter_async_context(self._run_locks.hold(key))
            await self._handle_goal(delivery, event)

    async def _handle_goal(self, delivery: Delivery, goal: GoalSubmitted) -> None:
        assert self.bus is not None
        recorded = await self.store.decision(goal.run_id)
        if recorded is not None:
            if recorded.tenant != goal.tenant:
                await self._refuse_run_id(goal)
            elif recorded.published_seq is None:
                # Decided before a crash, perhaps not published: publish what was decided
                # (same ids, so the log keeps one copy), never decide again.
                log.info("run %s: publishing the decision recorded before a restart", goal.run_id)
                await self._publish(goal, recorded.events)
            else:
                log.info("run %s already planned; goal redelivered or resubmitted", goal.run_id)
            return
        owner = await self.bus.run_owner(goal.run_id, self._admits)
        if owner is not None and owner.tenant != goal.tenant:
            await self._refuse_run_id(goal)
            return
        if owner is not None and owner.event_id != goal.event_id:
            # The tenant's own earlier goal for this run id is the run; it is (or will be)
            # decided when it is handled, and this one must not decide it differently.
            log.info("run %s: a later goal for it ignored; the first one decides", goal.run_id)
            return
        refusal, principal = self._admit(delivery, goal)
        if refusal is None:
            refusal = goal_size_refusal(goal, len(delivery.msg.data))
        if refusal is None and goal.idempotency_key is not None:
            # After the token check: a used key names its run only to its own tenant.
            earlier = await self.store.run_for_key(goal.tenant, goal.idempotency_key)
            if earlier is not None and earlier != goal.run_id:
                await self._refuse(
                    goal,
                    FailureCode.DUPLICATE_GOAL,
                    f"tenant {goal.tenant!r} already submitted a goal with idempotency key "
                    f"{goal.idempotency_key!r}: run {earlier}",
                    existing_run_id=earlier,
                    ends_run=True,
                )
                return
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

    def _admits(self, goal: GoalSubmitted, msg: object) -> bool:
        return self.auth.admits_goal(goal.tenant, msg)

    async def _refuse_run_id(self, goal: GoalSubmitted) -> None:
        """Another tenant's goal owns this run id. The sender learns only that the id is
        not available (not whose it is), and the run learns nothing."""
        log.warning(
            "run %s belongs to another tenant; goal from %r refused", goal.run_id, goal.tenant
        )
        await self._refuse(
            goal,
            FailureCode.EVENT_REFUSED,
            f"run id {goal.run_id} is not available: submit the goal with a new run id",
        )

    async def _answer_cancel(self, cancel: RunCancelRequested) -> None:
        """Refuse a cancel that names no run of its tenant; the executor applies the rest.

        The run is the sender's when its decision (or, before one, its owning goal in the
        log) is the sender's. Another tenant's run is refused exactly like an unknown one,
        so a cancel cannot probe which run ids exist."""
        recorded = await self.store.decision(cancel.run_id)
        if recorded is not None:
            tenant: str | None = recorded.tenant
        else:
            assert self.bus is not None
            owner = await self.bus.run_owner(cancel.run_id, self._admits)
            tenant = owner.tenant if owner is not None else None
        if tenant == cancel.tenant:
            return
        await self._refuse(
            cancel,
            FailureCode.RUN_NOT_FOUND,
            f"tenant {cancel.tenant!r} has no run {cancel.run_id}: nothing to cancel",
        )

    async def _refuse(
        self,
        request: GoalSubmitted | RunCancelRequested,
        code: FailureCode,
        message: str,
        *,
        existing_run_id: uuid.UUID | None = None,
        ends_run: bool = False,
    ) -> None:
        """Answer on the sender's subjects. Not recorded in the store: the same request
        gets the same answer (and the same event id, so the log keeps one copy)."""
        assert self.bus is not None
        refused = request.caused(
            RequestRefused,
            "request.refused",
            request_type=request.type,
            request_event_id=request.event_id,
            error=Failure.of(code, message),
            existing_run_id=existing_run_id,
            ends_run=ends_run,
        )
        await self.bus.publish(refused)
        REFUSALS.labels(request.type, code.value).inc()

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
            principal = self.auth.authorize_message(
                delivery.msg, tenant=goal.tenant, role=ROLE_SUBMIT
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
        submitter learns why instead of waiting on a run that never moves. An outage of
        the planner's own dependencies (NATS; outages.is_outage) does not use up attempts:
        it is waited out, up to AOS_OUTAGE_GIVE_UP_S (see `give_up`)."""
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
            if delivery_count < self.settings.planning_attempts or is_outage(exc):
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

    async def give_up(self, delivery: Delivery, exc: BaseException) -> None:
        """plan.rejected DEPENDENCY_UNAVAILABLE for a goal that could not be decided for
        AOS_OUTAGE_GIVE_UP_S because a dependency (the decision store, NATS) stayed down.
        The executor answers it with run.failed, so the run ends and the ledger releases
        what it holds for it.

        Judged from the log, since the store is what is down: a run the log shows decided
        keeps its decision, and a run id the log shows as another tenant's gets no answer
        (as in `_handle_goal`). The rejection is recorded in the store once it is back."""
        goal = delivery.event
        if not isinstance(goal, GoalSubmitted):
            return
        assert self.bus is not None
        async with self._run_locks.hold(goal.run_id):
            owner = await self.bus.run_owner(goal.run_id, self._admits)
            if owner is not None and owner.event_id != goal.event_id:
                # Not the goal that owns the run (another tenant's, or a later one of
                # its own): the owner's goal is decided or given up on by itself.
                log.warning("run %s: goal given up on is not the run's; ignored", goal.run_id)
                return
            logged = [
                event
                for event in await self.bus.run_events("plans", goal.tenant, goal.run_id)
                if not isinstance(event, RequestRefused)
            ]
            if any(isinstance(event, DECIDING) for event in logged):
                return  # decided before the outage; that decision stands
            spent = sum(e.cost_cents for e in logged if isinstance(e, PlanningCallFinished))
            reason = (
                f"a dependency of the planner was unreachable for "
                f"{self.settings.outage_give_up_s:g} s: {describe(exc)}"
            )
            rejection = decision_event(
                goal, Refused([reason], FailureCode.DEPENDENCY_UNAVAILABLE, spent)
            )
            [ack] = await self.bus.publish_all([rejection])
            log.warning("run %s: goal rejected, %s", goal.run_id, reason)
            PLANS.labels(_outcome_label(rejection), self.planner.name).inc()
        task = asyncio.create_task(self._record_when_back(goal, rejection, ack.seq))
        self._recording.add(task)
        task.add_done_callback(self._recording.discard)

    async def _record_when_back(
        self, goal: GoalSubmitted, rejection: EventEnvelope, seq: int
    ) -> None:
        """Record a decision published without the store, once the store answers again:
        a goal resubmitted later then finds it, as it finds any other."""
        delay = RECORD_RETRY_S
        while True:
            try:
                decision = await self.store.record(goal.run_id, goal.tenant, [rejection])
                if decision.events[-1].event_id == rejection.event_id:
                    await self.store.mark_published(goal.run_id, seq)
                else:
                    log.warning(
                        "run %s: the store recorded another decision before the outage; "
                        "the log's rejection stands",
                        goal.run_id,
                    )
                return
            except Exception as exc:
                if not is_outage(exc):
                    log.exception("run %s: recording the rejection failed", goal.run_id)
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

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
            sizes = ", ".join(f"{e.type} {len(encode_event(e))} bytes" for e in events)
            log.error("run %s: decision too large for the bus (%s)", goal.run_id, sizes)
            refusal = too_large_refusal(
                goal, f"the planner's answer does not fit on the bus ({sizes}): {exc}"
            )
            acks = [await self.bus.publish(refusal)]
        await self.store.mark_published(goal.run_id, max(ack.seq for ack in acks))


class RunLocks:
    """A lock per run (or per any other key), kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, run_id: Hashable) -> AsyncIterator[None]:
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
    return event.type


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
