"""The ledger service: budgets in integer cents, per run and per tenant per period.

In: goal.submitted (opens the run's budget), budget.reservation_requested and the
planner's planning.reservation_requested (reserve or deny, against the run's cap and its
tenant's cap for the current period), step.succeeded / step.failed and
planning.call_finished (commit the actual cost, release the rest of the reservation),
run.completed / run.failed / run.cancelled (release what is still held).
Out: budget.opened, budget.reserved, budget.denied, budget.committed, budget.released
(also with reason "expired", by the expiry sweeper, for a reservation never committed).

Every decision is made and applied to Redis by one Lua script, then published; the
request is acknowledged only after the publish. A crash in between means the request is
redelivered, the script finds the decision already made and returns it unchanged, and
the same event (same id) is published again, which JetStream drops as a duplicate.

Event ids derive from the run and the reservation, not from the message that caused
them: whatever the executor re-sends, a reservation gets one decision, one commit and
one release in the log at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from aiohttp import web
from redis.asyncio import Redis

from aos_contracts.codec import EventDecodeError
from aos_contracts.events import (
    PLANNING_STEP_ID,
    BudgetCommitted,
    BudgetDenied,
    BudgetOpened,
    BudgetReleased,
    BudgetReservationRequested,
    BudgetReserved,
    EventEnvelope,
    GoalSubmitted,
    PlanningCallFinished,
    PlanningReservationRequested,
    RunCancelled,
    RunCompleted,
    RunFailed,
    StepFailed,
    StepSucceeded,
    derive_event_id,
    is_valid_tenant,
    type_names,
)
from aos_contracts.failures import Failure, FailureCode
from aos_ledger.settings import LedgerSettings
from aos_ledger.store import (
    BudgetNotOpen,
    BudgetStore,
    Expired,
    Reservation,
    StoreNotRebuilt,
    epoch_ms,
    from_epoch_ms,
    period_of,
)
from aos_plumbing import metrics
from aos_plumbing.auth import (
    ROLE_READ,
    Authenticator,
    AuthError,
)
from aos_plumbing.bus import Delivery, EventBus, LogConsumer, decode_placed, per_run
from aos_plumbing.http import ServiceHttp

log = logging.getLogger(__name__)

BUDGET_CENTS = metrics.counter(
    "aos_budget_cents_total",
    "cents reserved, committed, denied or released, per tenant",
    ("kind", "tenant"),
)
BUDGET_DECISIONS = metrics.counter(
    "aos_budget_decisions_total", "reservation decisions", ("outcome",)
)

E = TypeVar("E", bound=EventEnvelope)
T = TypeVar("T")

REPLAY_BATCH = 500
# Decisions known to be in the log, so not republished before their commit or release:
# enough for every reservation open at once on a busy ledger.
LOGGED_DECISIONS_KEPT = 100_000


class RecentIds:
    """The last `size` ids added, for membership tests (oldest forgotten first)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ids: OrderedDict[uuid.UUID, None] = OrderedDict()

    def add(self, item: uuid.UUID) -> None:
        self._ids[item] = None
        if len(self._ids) > self.size:
            self._ids.popitem(last=False)

    def __contains__(self, item: object) -> bool:
        return item in self._ids


class PublishedMarker:
    """Raises the store's published-through marker in the background, a write at a time
    with the highest sequence seen, instead of one Redis round trip per batch before its
    acks. A marker that lags is safe: at start the ledger catches up from it, and applying
    events already applied changes nothing."""

    def __init__(self, store: BudgetStore) -> None:
        self.store = store
        self._pending = 0
        self._written = 0
        self._task: asyncio.Task[None] | None = None

    def raise_to(self, seq: int) -> None:
        self._pending = max(self._pending, seq)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._write(), name="published-marker")

    async def _write(self) -> None:
        while self._written < self._pending:
            seq = self._pending
            try:
                await self.store.mark_published(seq)
            except Exception:  # Redis blip: the next publish raises it again
                log.warning("could not raise the published marker to %d", seq, exc_info=True)
                return
            self._written = seq

    async def flush(self) -> None:
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task


class LedgerService:
    name = "ledger"

    def __init__(self, settings: LedgerSettings) -> None:
        self.settings = settings
        self.redis = Redis.from_url(settings.redis_url, decode_responses=True)
        self.store = BudgetStore(self.redis, settings.namespace)
        self.bus: EventBus | None = None
        self.consumers: list[LogConsumer] = []
        self._rebuild_lock = asyncio.Lock()
        self.http = ServiceHttp(self.name, settings.http_host, settings.http_port)
        self.auth = Authenticator.from_settings(settings)
        self.http.backends = {
            "budget_store": "redis",
            "auth": self.auth.mode,
            "rbac": self.auth.rbac_mode,
        }
        self.http.app.router.add_get("/budgets/runs/{run_id}", self._get_budget)
        self.http.app.router.add_get("/budgets/tenants/{tenant}", self._get_tenant_budget)
        self._sweeper: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._logged_decisions = RecentIds(LOGGED_DECISIONS_KEPT)
        self._marker = PublishedMarker(self.store)
        # Rebuilds running or waiting for the lock: while any is, Redis holds a partial
        # fold of the log and the query API answers 503 instead of wrong numbers.
        self._rebuilds = 0
        self._background_rebuild: asyncio.Task[None] | None = None

    def now(self) -> datetime:
        return datetime.now(UTC)

    def current_period(self) -> str:
        return period_of(self.settings.tenant_period, self.now())

    async def start(self) -> None:
        self.bus = await EventBus.open(self.settings, self.name)
        bus = self.bus
        self.http.add_check("nats", lambda: _true(bus.connected))
        self.http.add_check("redis", self.store.ping)
        self.http.add_check("budget_store", lambda: _true(not self.rebuilding))
        # Serving before the rebuild, so that queries meanwhile are told so (503).
        await self.http.start()
        await self.rebuild()
        batch = self.settings.consumer_batch
        self.consumers = [
            self.bus.consumer(
                "goals",
                self.name,
                per_run(self.handle_goal, publish=self._publish),
                batch_size=batch,
                event_types=type_names(GoalSubmitted),
            ),
            self.bus.consumer(
                "plans",
                self.name,
                per_run(self.handle_planning, publish=self._publish),
                batch_size=batch,
                event_types=type_names(PlanningReservationRequested, PlanningCallFinished),
            ),
            self.bus.consumer(
                "runs",
                self.name,
                per_run(self.handle_run, publish=self._publish),
                batch_size=batch,
                # step.started changes no budget: not even decoded
                event_types=type_names(
                    BudgetReservationRequested,
                    StepSucceeded,
                    StepFailed,
                    RunCompleted,
                    RunFailed,
                    RunCancelled,
                ),
            ),
        ]
        for consumer in self.consumers:
            await consumer.start()
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="expiry-sweeper")

    async def stop(self) -> None:
        self._stopping.set()
        for task in (self._sweeper, self._background_rebuild):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for consumer in self.consumers:
            await consumer.stop()
        await self._marker.flush()
        await self.http.stop()
        if self.bus:
            await self.bus.close()
        await self.redis.aclose()

    # --- rebuilding from the log --------------------------------------------------------

    async def rebuild(self) -> None:
        """Bring Redis up to the end of the budget stream.

        Without the marker (Redis new or wiped) that is a replay from the first event;
        with it, a catch-up from the marker, which costs nothing when Redis is current and
        repairs a Redis restored from an older snapshot. Applying is idempotent, so
        replicas rebuilding at once, or events already applied, do no harm."""
        assert self.bus is not None
        self._rebuilds += 1
        try:
            async with self._rebuild_lock:
                await self._rebuild()
        finally:
            self._rebuilds -= 1

    @property
    def rebuilding(self) -> bool:
        return self._rebuilds > 0

    async def _rebuild(self) -> None:
        assert self.bus is not None
        marker = await self.store.applied_through()
        start = 1 if marker is None else marker + 1
        last, changed, pending = start - 1, 0, []
        async for seq, msg in self.bus.replay("budget", start_seq=start):
            last = seq
            try:
                pending.append(decode_placed(msg.subject, msg.data))
            except EventDecodeError:
                continue  # the live consumers park what cannot decode or is misplaced
            if len(pending) >= REPLAY_BATCH:
                changed += await self.store.replay(pending)
                pending = []
        changed += await self.store.replay(pending)
        await self.store.mark_rebuilt(last)
        log.info(
            "budget store %s: applied %d events from seq %d to %d (%d changed it)",
            "rebuilt" if marker is None else "caught up",
            last - start + 1,
            start,
            last,
            changed,
        )

    async def _decide(self, cause: EventEnvelope, decision: Callable[[], Awaitable[T]]) -> T:
        """Run a store decision, first repairing what would make it unsafe or premature."""
        try:
            return await decision()
        except StoreNotRebuilt:
            # Redis lost its state under a running ledger: deciding now could grant money
            # the log says is spent, so rebuild first.
            log.warning("budget store has no marker (wiped?): rebuilding from the log")
            await self.rebuild()
        except BudgetNotOpen:
            await self._open_from_goal_log(cause)
        return await decision()

    async def _open_from_goal_log(self, cause: EventEnvelope) -> None:
        """Open a run's budget from its goal in the goals stream.

        A reservation request can reach the ledger before the goal does (the goals
        consumer lags, or is stuck behind a long batch). Denying would fail a step that
        was within budget, and redelivery with backoff gives up after a few tries, so
        the ledger reads the goal itself: the run's owning goal (`EventBus.run_owner`, the
        first admitted goal for the run id, whichever tenant sent it) is the one the goals
        consumer also opens first, so both open the same cap for the same tenant. With no
        goal in the log this raises BudgetNotOpen and the request is retried, then parked."""
        assert self.bus is not None
        goal = await self.bus.run_owner(cause.run_id, self.goal_allowed)
        if goal is None:
            raise BudgetNotOpen(f"run {cause.run_id}: no goal.submitted in the log")
        log.info("run %s: budget opened from the goals stream ahead of its consumer", cause.run_id)
        # Published here, not returned: the request that led here is decided next,
        # against the budget this opens.
        await self._publish(await self.open_budget(goal))

    # --- handlers -----------------------------------------------------------------------

    # Handlers decide and apply in Redis, and return the events to publish: per_run
    # publishes what one run's events in a batch produced in one round trip, then acks.

    async def handle_goal(self, delivery: Delivery) -> list[EventEnvelope]:
        goal = delivery.event
        if not isinstance(goal, GoalSubmitted) or not self.goal_allowed(goal, delivery.msg):
            return []
        # The budget is the run owner's (the first admitted goal for the run id, as the
        # planner decides it), whichever goal naming the run reaches this handler first:
        # a redelivery can put another tenant's later goal ahead of the owner's.
        assert self.bus is not None
        owner = await self.bus.run_owner(goal.run_id, self.goal_allowed)
        return await self.open_budget(owner or goal)

    def goal_allowed(self, goal: GoalSubmitted, msg: Any) -> bool:
        """Whether the goal's token lets it open a budget: the planner's judgement of the
        same token at the same log time, so a goal the planner refused never gets a budget
        (and nothing can be reserved or spent against it)."""
        if self.auth.admits_goal(goal.tenant, msg):
            return True
        log.warning("run %s: no budget for a goal its token does not allow", goal.run_id)
        return False

    async def handle_run(self, delivery: Delivery) -> list[EventEnvelope]:
        event = delivery.event
        if isinstance(event, BudgetReservationRequested):
            return await self.decide_reservation(event)
        if isinstance(event, StepSucceeded | StepFailed):
            return await self.commit(event)
        if isinstance(event, RunCompleted | RunFailed | RunCancelled):
            return await self.release_all(event)
        return []

    async def handle_planning(self, delivery: Delivery) -> list[EventEnvelope]:
        """The planner's model calls, budgeted like steps (under the step id @planning)."""
        event = delivery.event
        if not isinstance(event, PlanningReservationRequested | PlanningCallFinished):
            return []
        if not await self._same_tenant(event):
            # The planner plans a goal whose run id another tenant's goal took first:
            # that run's budget is not its to spend.
            log.warning(
                "run %s belongs to another tenant; planning event from %r ignored",
                event.run_id,
                event.tenant,
            )
            return []
        if isinstance(event, PlanningReservationRequested):
            return await self.decide_reservation(event)
        return await self.commit(event)

    async def _same_tenant(self, event: EventEnvelope) -> bool:
        """Whether the run's budget belongs to the event's tenant (opening it from the
        goals stream first, if the goals consumer has not yet)."""
        balances = await self.store.balances(event.run_id)
        if balances is None:
            await self._open_from_goal_log(event)
            balances = await self.store.balances(event.run_id)
        return balances is not None and balances.tenant == event.tenant

    async def open_budget(self, goal: GoalSubmitted) -> list[EventEnvelope]:
        budget = await self._decide(
            goal, lambda: self.store.open_budget(goal.run_id, goal.tenant, goal.budget_cents)
        )
        if budget.tenant != goal.tenant:
            # Another tenant's goal naming this run id: it must neither see nor change
            # the budget, so it gets no answer at all.
            log.warning(
                "run %s belongs to another tenant; goal from %r ignored", goal.run_id, goal.tenant
            )
            return []
        return [opened_event(goal, budget.cap_cents)]

    async def decide_reservation(
        self, request: BudgetReservationRequested | PlanningReservationRequested
    ) -> list[EventEnvelope]:
        change = await self._decide(
            request,
            lambda: self.store.reserve(
                request.run_id,
                request.reservation_id,
                request.step_id,
                request.attempt,
                request.amount_cents,
                request.event_id,
                tenant_period=self.current_period(),
                tenant_cap_cents=self.settings.tenant_cap(request.tenant),
                expires_at_ms=epoch_ms(
                    self.now() + timedelta(seconds=self.settings.reservation_ttl_s)
                ),
            ),
        )
        record = change.reservation
        if record.decision is None:
            log.warning(
                "reservation %s was requested after its step was committed; nothing to decide",
                record.reservation_id,
            )
            return []
        if change.is_new:
            BUDGET_DECISIONS.labels(record.decision).inc()
            BUDGET_CENTS.labels(record.decision, request.tenant).inc(record.amount_cents)
        return [decision_event(request, record)]

    async def commit(
        self, step: StepSucceeded | StepFailed | PlanningCallFinished
    ) -> list[EventEnvelope]:
        change = await self._decide(
            step,
            lambda: self.store.commit(
                step.run_id,
                step.reservation_id,
                step.step_id,
                step.cost_cents,
                tenant_period=self.current_period(),
            ),
        )
        if change is None:
            return []
        record = change.reservation
        committed = committed_event(step, record)
        if change.is_new:
            BUDGET_CENTS.labels("committed", step.tenant).inc(committed.committed_cents)
            BUDGET_CENTS.labels("released", step.tenant).inc(committed.released_cents)
        return [*self._decision_first(step, record), committed]

    async def release_all(
        self, terminal: RunCompleted | RunFailed | RunCancelled
    ) -> list[EventEnvelope]:
        changes = await self._decide(
            terminal, lambda: self.store.release_all(terminal.run_id, terminal.type)
        )
        events: list[EventEnvelope] = []
        for change in changes:
            events += self._decision_first(terminal, change.reservation)
            events.append(released_event(terminal, change.reservation))
        for change in changes:
            if change.is_new:
                BUDGET_CENTS.labels("released", terminal.tenant).inc(
                    change.reservation.released_cents or 0
                )
        return events

    # --- expiry ---------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                # One GET per sweep notices a wiped Redis even when nothing asks.
                if not self.rebuilding and await self.store.applied_through() is None:
                    self.rebuild_in_background()
                await self.sweep_expired()
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis or NATS blip: the next sweep tries again
                log.exception("expiry sweep failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.settings.expiry_sweep_s)

    async def sweep_expired(self) -> int:
        """Release every reservation whose time has passed and publish the releases.

        Replicas may sweep the same reservation at once: the Lua script releases it once,
        and both publish the same event (same id), which JetStream keeps once. An expiry
        applied but not published (a crash in between) stays noted in Redis and is
        published by the next sweep of any replica. Returns how many it released now."""
        now_ms = epoch_ms(self.now())
        candidates = await self.store.unpublished_expiries()
        candidates += await self.store.due(now_ms)
        released = 0
        for run_id, reservation_id in dict.fromkeys(candidates):
            try:
                expired = await self.store.expire(run_id, reservation_id, now_ms)
            except StoreNotRebuilt:
                log.warning("budget store has no marker (wiped?): rebuilding from the log")
                await self.rebuild()
                return released
            if expired is None:
                continue
            await self._publish([*_decision_first_expired(expired), expired_event(expired)])
            await self.store.expiry_published(run_id, reservation_id)
            if expired.is_new:
                released += 1
                BUDGET_CENTS.labels("released", expired.tenant).inc(
                    expired.reservation.released_cents or 0
                )
        if released:
            log.info("released %d expired reservations", released)
        return released

    def _decision_first(self, source: EventEnvelope, record: Reservation) -> list[EventEnvelope]:
        """`_decision_first`, minus a decision this process has seen acknowledged by the
        log already: republishing it would cost a round trip to be dropped."""
        if not record.decision:
            return []
        key = _reservation_key(source.run_id, record.reservation_id)
        if derive_event_id(key, "budget.decision") in self._logged_decisions:
            return []
        return _decision_first(source, record)

    async def _publish(self, events: Sequence[EventEnvelope]) -> None:
        assert self.bus is not None
        acks = await self.bus.publish_all(events)
        for event in events:
            if isinstance(event, BudgetReserved | BudgetDenied):
                self._logged_decisions.add(event.event_id)
        if acks:
            self._marker.raise_to(max(ack.seq for ack in acks))

    # --- http ---------------------------------------------------------------------------

    def rebuild_in_background(self) -> None:
        """Start a rebuild unless one is under way (a query found Redis wiped)."""
        if self._background_rebuild is None or self._background_rebuild.done():
            log.warning("budget store has no marker (wiped?): rebuilding from the log")
            self._background_rebuild = asyncio.create_task(self.rebuild(), name="rebuild")

    async def _not_current(self) -> web.Response | None:
        """503 while Redis does not hold the whole fold of the log (a rebuild under way,
        or no marker: Redis wiped, which starts one): its numbers would be wrong."""
        if not self.rebuilding and await self.store.applied_through() is not None:
            return None
        if not self.rebuilding:
            self.rebuild_in_background()
        return web.json_response(
            {
                "error": "rebuilding",
                "reason": "the budget store is being rebuilt from the log; ask again shortly",
            },
            status=503,
            headers={"Retry-After": "1"},
        )

    def _caller(self, request: web.Request) -> str | web.Response | None:
        """The tenant the caller's token confines it to (None: no tokens required), or the
        refusal to send. Budgets are read with the `read` role, like runs in the tracer."""
        try:
            return self.auth.caller_tenant(request.headers, ROLE_READ)
        except AuthError as exc:
            return web.json_response({"error": exc.reason}, status=exc.http_status)

    async def _get_tenant_budget(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        if not is_valid_tenant(tenant):
            return web.json_response({"error": f"invalid tenant {tenant!r}"}, status=400)
        caller = self._caller(request)
        if isinstance(caller, web.Response):
            return caller
        if caller is not None and caller != tenant:
            return web.json_response(
                {"error": f"the token is for tenant {caller!r}, not {tenant!r}"}, status=403
            )
        not_current = await self._not_current()
        if not_current is not None:
            return not_current
        period = request.query.get("period") or self.current_period()
        balances = await self.store.tenant_balances(tenant, period)
        cap = self.settings.tenant_cap(tenant)
        spent = balances.reserved_cents + balances.committed_cents
        return web.json_response(
            {
                "tenant": tenant,
                "period": period,
                "cap_cents": cap,
                "reserved_cents": balances.reserved_cents,
                "committed_cents": balances.committed_cents,
                "remaining_cents": None if cap is None else cap - spent,
            }
        )

    async def _get_budget(self, request: web.Request) -> web.Response:
        run_id = request.match_info["run_id"]
        caller = self._caller(request)
        if isinstance(caller, web.Response):
            return caller
        not_current = await self._not_current()
        if not_current is not None:
            return not_current
        balances = await self.store.balances(run_id)
        # Another tenant's run is answered as unknown: its existence is not the caller's.
        if balances is None or (caller is not None and balances.tenant != caller):
            return web.json_response({"error": f"no budget for run {run_id}"}, status=404)
        return web.json_response(
            {
                "run_id": run_id,
                "tenant": balances.tenant,
                "cap_cents": balances.cap_cents,
                "reserved_cents": balances.reserved_cents,
                "committed_cents": balances.committed_cents,
                "remaining_cents": balances.remaining_cents,
            }
        )


# --- the events the ledger publishes ------------------------------------------------------


def opened_event(goal: GoalSubmitted, cap_cents: int) -> BudgetOpened:
    return _answer(goal, BudgetOpened, str(goal.run_id), "budget.opened", cap_cents=cap_cents)


def decision_event(source: EventEnvelope, record: Reservation) -> BudgetReserved | BudgetDenied:
    """The decision `record` holds, as an event. The same record gives the same event
    (same id, same cause: the request it answered) whichever event of the run it is
    published for: the request, or a step or run end that republishes it."""
    attempt = record.attempt if record.attempt is not None else 0
    remaining = record.remaining_cents or 0
    fields: dict[str, Any] = {
        "reservation_id": uuid.UUID(record.reservation_id),
        "step_id": record.step_id,
        "attempt": attempt,
        "amount_cents": record.amount_cents,
        "remaining_cents": remaining,
        "tenant_period": record.tenant_period,
        "tenant_cap_cents": record.tenant_cap_cents,
        "tenant_remaining_cents": record.tenant_remaining_cents,
    }
    key = _reservation_key(source.run_id, record.reservation_id)
    cause = uuid.UUID(record.decided_for) if record.decided_for else source.event_id
    if record.decision == "reserved":
        expires = None if record.expires_at_ms is None else from_epoch_ms(record.expires_at_ms)
        return _answer(
            source, BudgetReserved, key, "budget.decision", cause, expires_at=expires, **fields
        )
    asker = (
        f"planning call {attempt}"
        if record.step_id == PLANNING_STEP_ID
        else f"step {record.step_id!r} (attempt {attempt})"
    )
    if record.denial_code == FailureCode.CANCELLED:
        error = Failure.of(
            FailureCode.CANCELLED,
            f"{asker} asked for {record.amount_cents} cents after its run had ended",
        )
    elif record.exceeded_cap == "tenant":
        error = Failure.of(
            FailureCode.BUDGET_EXCEEDED,
            f"{asker} asked for {record.amount_cents} "
            f"cents but tenant {source.tenant!r} has only {record.tenant_remaining_cents} "
            f"cents left of its cap of {record.tenant_cap_cents} cents for "
            f"{record.tenant_period} (tenant cap exceeded)",
        )
    else:
        error = Failure.of(
            FailureCode.BUDGET_EXCEEDED,
            f"{asker} asked for {record.amount_cents} cents but the run has only "
            f"{remaining} cents left of its budget (run cap exceeded)",
        )
    exceeded = record.exceeded_cap if record.denial_code == FailureCode.BUDGET_EXCEEDED else None
    return _answer(
        source,
        BudgetDenied,
        key,
        "budget.decision",
        cause,
        error=error,
        exceeded_cap=exceeded,
        **fields,
    )


def committed_event(
    step: StepSucceeded | StepFailed | PlanningCallFinished, record: Reservation
) -> BudgetCommitted:
    return _answer(
        step,
        BudgetCommitted,
        _reservation_key(step.run_id, record.reservation_id),
        "budget.committed",
        reservation_id=uuid.UUID(record.reservation_id),
        step_id=record.step_id,
        reserved_cents=record.amount_cents,
        committed_cents=record.committed_cents or 0,
        released_cents=record.released_cents or 0,
        tenant_period=record.tenant_period,
    )


def released_event(
    terminal: RunCompleted | RunFailed | RunCancelled, record: Reservation
) -> BudgetReleased:
    return _answer(
        terminal,
        BudgetReleased,
        _reservation_key(terminal.run_id, record.reservation_id),
        "budget.released",
        reservation_id=uuid.UUID(record.reservation_id),
        step_id=record.step_id,
        released_cents=record.released_cents or 0,
        reason=record.reason or terminal.type,
        tenant_period=record.tenant_period,
    )


def expired_event(expired: Expired) -> BudgetReleased:
    """The release of an expired reservation. Its id is the one a run's end would give
    the same release, so whichever comes first, the log holds one release."""
    record = expired.reservation
    key = _reservation_key(uuid.UUID(expired.run_id), record.reservation_id)
    return BudgetReleased(
        event_id=derive_event_id(key, "budget.released"),
        run_id=uuid.UUID(expired.run_id),
        tenant=expired.tenant,
        causation_id=derive_event_id(key, "budget.decision"),
        reservation_id=uuid.UUID(record.reservation_id),
        step_id=record.step_id,
        released_cents=record.released_cents or 0,
        reason=record.reason or "expired",
        tenant_period=record.tenant_period,
    )


def _decision_first_expired(expired: Expired) -> list[EventEnvelope]:
    """As `_decision_first`, for a release with no event that caused it: the decision
    is rebuilt from its record (same id, same cause) and published again just before."""
    record = expired.reservation
    if record.decided_for is None:
        return []
    source = BudgetReservationRequested(
        event_id=uuid.UUID(record.decided_for),
        run_id=uuid.UUID(expired.run_id),
        tenant=expired.tenant,
        reservation_id=uuid.UUID(record.reservation_id),
        step_id=record.step_id,
        attempt=record.attempt or 0,
        amount_cents=record.amount_cents,
    )
    return [decision_event(source, record)]


def _reservation_key(run_id: uuid.UUID, reservation_id: str) -> str:
    # Reservation ids are chosen by the executor; scoping them by run keeps one run's
    # ids from ever colliding with another's.
    return f"{run_id}/{reservation_id}"


def _decision_first(source: EventEnvelope, record: Reservation) -> list[EventEnvelope]:
    """The reservation's decision, to publish again just before a commit or release of it.

    A ledger that crashed between deciding and publishing publishes the decision when the
    request is redelivered - possibly after the run's end has released the reservation.
    Republishing the decision first keeps every consequence behind its cause in the log
    (a replay then sees them in that order); when the decision is already there, JetStream
    drops the copy as a duplicate (same id)."""
    return [decision_event(source, record)] if record.decision else []


def _answer(
    source: EventEnvelope,
    cls: type[E],
    key: str,
    purpose: str,
    cause: uuid.UUID | None = None,
    **fields: Any,
) -> E:
    """The event `source` leads to, with an id that depends on what it is about (`key`)
    rather than on which message asked."""
    event = source.caused(cls, purpose, **fields)
    update: dict[str, Any] = {"event_id": derive_event_id(key, purpose)}
    if cause is not None:
        update["causation_id"] = cause
    return event.model_copy(update=update)


async def _true(value: bool) -> bool:
    return value
