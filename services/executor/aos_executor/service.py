"""The executor service: runs plans step by step, each step only after the ledger said yes.

Inputs: run.accepted / plan.created / plan.rejected (plans), budget.reserved /
budget.denied (budget), run.cancel_requested (goals). Outputs, on its own stream:
budget.reservation_requested, step.started, step.succeeded / step.failed, run.completed /
run.failed / run.cancelled.

State lives in memory, rebuilt at start from the last Postgres checkpoint plus the log
after it (checkpoints.py); then every unfinished run is driven again. Because decisions
are level-triggered and their event ids deterministic (see runs.py), a restart at any
instant resumes each run where the log says it is: no step that completed runs again
(its result is in the log), no step is lost. One executor is active at a time (a Redis
lease, lease.py); others wait as standbys.

Every run ends:
- A step the log shows started, with no result, was cut off mid-call by an executor that
  died. It is settled by its skill's declared safety (`SkillContract.retry_safe`): a
  retry-safe call is made again, same attempt (an http_call carries the same
  Idempotency-Key); any other takes its result from the Redis idempotency claim if the
  dead executor recorded one, else fails STEP_INTERRUPTED (not retryable). A claim still
  in flight is waited out, at most its TTL.
- Every run has a deadline (the goal's deadline_s, else AOS_RUN_DEADLINE_S after
  run.accepted), kept in the log and the checkpoint: a run not ended by then is ended
  run.failed DEADLINE_EXCEEDED (checked at every decision, by a timer for the next
  deadline, and by a periodic sweep); the ledger then releases its reservations.
- No event outgrows the bus: a step's output over AOS_MAX_STEP_OUTPUT_BYTES fails it
  OUTPUT_TOO_LARGE, resolved params over STEP_PARAMS_MAX_BYTES fail it INPUT_INVALID,
  a failure's message is cut at MAX_FAILURE_MESSAGE, and run.completed carries sink
  outputs up to RUN_OUTPUTS_MAX_BYTES, listing the rest in omitted_outputs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import suppress
from datetime import datetime
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from aos_contracts.codec import decode_event
from aos_contracts.events import (
    AnyEvent,
    BudgetDenied,
    BudgetReserved,
    EventEnvelope,
    RunCancelRequested,
    StepFailed,
    StepStarted,
    StepSucceeded,
    StepTelemetry,
    type_names,
    utc_now,
)
from aos_contracts.failures import Failure, FailureCode
from aos_contracts.progress import StepProgress, progress_subject
from aos_contracts.skills import SKILL_CONTRACTS, SideEffect
from aos_executor.cancel_auth import cancel_refusal, is_refused_cancel
from aos_executor.checkpoints import (
    OPENING,
    Book,
    CheckpointStore,
    NoCheckpoints,
    fold_log,
    open_store,
)
from aos_executor.idempotency import (
    Claim,
    IdempotencyStore,
    InMemoryIdempotencyStore,
    RedisIdempotencyStore,
)
from aos_executor.lease import Lease, open_lease
from aos_executor.references import UnresolvedReference, resolve
from aos_executor.replay import replay
from aos_executor.runs import (
    RUN_OUTPUTS_MAX_BYTES,
    STEP_PARAMS_MAX_BYTES,
    RunState,
    StepState,
    StepStatus,
    json_size,
)
from aos_executor.settings import ExecutorSettings
from aos_executor.skills import (
    Skill,
    SkillContext,
    SkillError,
    SkillResult,
    build_registry,
    close_registry,
)
from aos_plumbing import metrics
from aos_plumbing.auth import Authenticator
from aos_plumbing.bus import Delivery, EventBus, LogConsumer, per_run
from aos_plumbing.http import ServiceHttp
from aos_plumbing.outages import describe, is_outage
from aos_plumbing.reachability import AnthropicProbe

log = logging.getLogger(__name__)
T = TypeVar("T")

STEPS = metrics.counter(
    "aos_steps_total", "step attempts by skill and outcome", ("skill", "outcome")
)
STEP_SECONDS = metrics.histogram(
    "aos_step_duration_seconds",
    "time inside the skill, per attempt",
    ("skill",),
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120),
)
RUNS = metrics.counter("aos_runs_total", "finished runs by terminal status", ("status",))
ACTIVE_RUNS = metrics.gauge("aos_executor_active_runs", "runs in progress in this executor")

# What the executor acts on; everything else in its input streams is someone else's.
_RELEVANT = (*OPENING, BudgetReserved, BudgetDenied)
# An unsafe call's claim outlives its timeout by this much, so a live call never loses it.
CLAIM_MARGIN_S = 5.0
# A failure's message is for people; a skill that puts a whole response in it must not
# push step.failed over the bus's max payload.
MAX_FAILURE_MESSAGE = 4096
# What an event needs besides a step's output or run.completed's outputs.
ENVELOPE_ROOM = 64 * 1024


class ExecutorService:
    name = "executor"

    def __init__(self, settings: ExecutorSettings, skills: dict[str, Skill] | None = None) -> None:
        self.settings = settings
        self.skills = skills or build_registry(settings)
        self.book = Book()
        self.runs, self.finished = self.book.runs, self.book.finished
        self.checkpoints: CheckpointStore = NoCheckpoints()
        self.idempotency: IdempotencyStore = (
            RedisIdempotencyStore.from_url(settings.redis_url, settings.namespace)
            if settings.redis_url
            else InMemoryIdempotencyStore()
        )
        self.checkpoint_task: asyncio.Task[None] | None = None
        self.activation: asyncio.Task[None] | None = None
        self.lease: Lease = open_lease(settings.redis_url, settings.namespace, settings.lease_ttl_s)
        self.locks: dict[uuid.UUID, asyncio.Lock] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.backoffs: set[tuple[uuid.UUID, str]] = set()
        self.deadline_task: asyncio.Task[None] | None = None
        self.deadline_wake = asyncio.Event()
        self.next_deadline: datetime | None = None
        self.bus: EventBus | None = None
        self.consumers: list[LogConsumer] = []
        self.running = False
        self.http = ServiceHttp(self.name, settings.http_host, settings.http_port)
        # Replay is pure (recorded decisions and outputs in, differences out): it needs
        # none of this executor's state, and calls nothing.
        self.http.app.router.add_post("/replay", _replay_request)
        self.auth = Authenticator.from_settings(settings)
        self.http.backends = {
            f"skill:{name}": "stub" if skill.is_stub else skill.backend
            for name, skill in self.skills.items()
        }
        self.http.backends |= {"auth": self.auth.mode, "rbac": self.auth.rbac_mode}
        if settings.anthropic_api_key is not None:  # llm_invoke runs on Claude
            probe = AnthropicProbe(
                settings.anthropic_api_key.get_secret_value(), settings.anthropic_base_url
            )
            self.http.add_advisory("anthropic", probe.problem)

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self.bus = await EventBus.open(self.settings, self.name)
        self.running = True
        self.checkpoints = await open_store(self.settings.database_url)
        self.http.backends["checkpoints"] = self.checkpoints.name
        self.http.backends["idempotency"] = self.idempotency.name
        self.http.backends["lease"] = self.lease.name
        self.http.backends["role"] = "standby"
        if not isinstance(self.checkpoints, NoCheckpoints):
            self.http.add_check("postgres", self.checkpoints.ping)
        bus = self.bus
        self.http.add_check("nats", lambda: _const(bus.connected))
        # A standby is alive and ready (it serves /replay, and a rollout must not wait on
        # it); it becomes active when it gets the lease.
        await self.http.start()
        self.activation = asyncio.create_task(self._activate(), name="executor-activation")

    async def _activate(self) -> None:
        """Wait for the lease, then run everything until the lease is lost."""
        try:
            await self.lease.acquire()
            await self._become_active()
            await self.lease.hold()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("executor failed to become or stay active")
        if self.running:
            # Lost the lease (or failed to start): stop cleanly and let the orchestrator
            # restart this process as a standby. Carrying on could run what another
            # executor now runs.
            log.error("executor stops: no longer the active replica")
            os.kill(os.getpid(), signal.SIGTERM)

    async def _become_active(self) -> None:
        assert self.bus is not None
        self.http.backends["role"] = "active"
        await self.rebuild()
        handler = per_run(
            self.handle, give_up=self.give_up, give_up_after_s=self.settings.outage_give_up_s
        )
        self.consumers = [
            self.bus.consumer(
                context,
                self.name,
                handler,
                batch_size=self.settings.consumer_batch,
                event_types=type_names(*_RELEVANT),
            )
            for context in ("plans", "budget", "goals")
        ]
        for consumer in self.consumers:
            await consumer.start()
        for state in list(self.runs.values()):
            async with self._lock(state.run_id):
                await self._drive(state)
        self.deadline_task = asyncio.create_task(self._end_overdue_runs(), name="deadlines")
        if not isinstance(self.checkpoints, NoCheckpoints):
            self.checkpoint_task = asyncio.create_task(self._checkpoint_periodically())

    async def stop(self) -> None:
        self.running = False
        if self.activation is not None and not self.activation.done():
            self.activation.cancel()
        for consumer in self.consumers:
            await consumer.stop()
        if self.tasks:
            # In-flight steps get a grace period to finish and publish their results;
            # what does not finish is resumed from the log by the next executor.
            await asyncio.wait(self.tasks, timeout=10.0)
        for task in (self.checkpoint_task, self.deadline_task):
            if task is not None:
                task.cancel()
        await self.http.stop()
        await close_registry(self.skills)
        if self.bus:
            await self.bus.close()
        await self.checkpoints.close()
        await self.idempotency.close()
        # Last, after every result is published: a standby may take over right away.
        await self.lease.release()
        await self.lease.close()

    async def rebuild(self) -> None:
        """The last checkpoint, plus every event of the log after it (plans, own events,
        budget decisions, cancels), folded into memory; then a new checkpoint."""
        assert self.bus is not None
        checkpoint = await self.checkpoints.load()
        count = await fold_log(checkpoint, self._read_log)
        # Taken before any live event is handled, this state is exactly a fold of the
        # log up to checkpoint.seqs: safe to save as the next checkpoint.
        await self.checkpoints.save(checkpoint)
        self.book = checkpoint.book
        self.runs, self.finished = self.book.runs, self.book.finished
        # No call runs in this process yet: a step the log shows started without a result
        # was cut off by the executor that died; _drive settles it.
        interrupted = sum(len(state.interrupt_running()) for state in self.runs.values())
        log.info(
            "executor rebuilt: checkpoint %s + %d events: %d runs in progress, %d steps "
            "interrupted mid-call",
            checkpoint.seqs,
            count,
            len(self.runs),
            interrupted,
        )
        ACTIVE_RUNS.set(len(self.runs))
        max_payload = int(getattr(self.bus.nc, "max_payload", 0) or 0)
        if max_payload and max_payload < RUN_OUTPUTS_MAX_BYTES + ENVELOPE_ROOM:
            log.error(
                "NATS max_payload is %d bytes: run.completed may need %d; raise max_payload",
                max_payload,
                RUN_OUTPUTS_MAX_BYTES + ENVELOPE_ROOM,
            )

    async def _read_log(
        self, context: str, start_seq: int
    ) -> AsyncIterator[tuple[int, str, bytes]]:
        assert self.bus is not None
        async for seq, msg in self.bus.replay(context, start_seq=start_seq):
            if context == "goals" and is_refused_cancel(self.auth, msg):
                continue  # parked when it arrived; never applied
            yield seq, msg.subject, msg.data

    async def _checkpoint_periodically(self) -> None:
        """Fold the log since the last checkpoint into a new one, from the store's copy
        (never from the live state, which holds claims the log has not seen)."""
        down = False
        while self.running:
            await asyncio.sleep(self.settings.checkpoint_interval_s)
            try:
                checkpoint = await self.checkpoints.load()
                await fold_log(checkpoint, self._read_log)
                await self.checkpoints.save(checkpoint)
            except Exception as exc:
                if not is_outage(exc):
                    log.exception("checkpoint failed; the next one folds more of the log")
                elif not down:  # said once per outage, not at every interval
                    log.warning("checkpoints wait for the database: %s", describe(exc))
                down = down or is_outage(exc)
                continue
            if down:
                log.warning("checkpoint saved: the database is back")
                down = False

    def _fold(self, event: AnyEvent) -> RunState | None:
        return self.book.fold(event)

    def _finish(self, run_id: uuid.UUID) -> None:
        self.book.finish(run_id)
        self.locks.pop(run_id, None)

    def _lock(self, run_id: uuid.UUID) -> asyncio.Lock:
        lock = self.locks.get(run_id)
        if lock is None:
            lock = self.locks[run_id] = asyncio.Lock()
        return lock

    # --- events in -----------------------------------------------------------------------

    async def handle(self, delivery: Delivery) -> None:
        event = delivery.event
        if not isinstance(event, _RELEVANT):
            return
        if isinstance(event, RunCancelRequested):
            known = self.runs.get(event.run_id)
            tenant = known.tenant if known else None
            refused = cancel_refusal(self.auth, delivery.msg, event, tenant)
            if refused is not None:
                assert self.bus is not None
                reason = f"cancel refused ({refused.code}): {refused.reason}"
                await self.bus.park(
                    delivery.msg,
                    reason,
                    stream_seq=delivery.stream_seq,
                    num_delivered=delivery.num_delivered,
                )
                return
        async with self._lock(event.run_id):
            state = self._fold(event)
            if state is not None:
                self._note_deadline(state)
                await self._drive(state)

    async def give_up(self, delivery: Delivery, exc: BaseException) -> None:
        """run.failed DEPENDENCY_UNAVAILABLE for a run one of whose events could not be
        handled for AOS_OUTAGE_GIVE_UP_S because a dependency stayed down; the ledger
        releases what the run holds when it sees the end. Ending it is a publish too:
        while NATS is down this raises, and the event keeps waiting for NATS."""
        assert self.bus is not None
        run_id = delivery.event.run_id
        async with self._lock(run_id):
            state = self.runs.get(run_id)
            if state is None or state.terminal:
                return  # nothing of the run to end here
            failure = Failure.of(
                FailureCode.DEPENDENCY_UNAVAILABLE,
                f"a dependency of the executor was unreachable for "
                f"{self.settings.outage_give_up_s:g} s: {describe(exc)}",
            )
            events = [state.abandoned(failure)]
            await self.bus.publish_all(events)
            log.warning("run %s failed: %s", run_id, failure.message)
            self._applied(state, events)

    async def _drive(self, state: RunState) -> None:
        """Publish whatever the run is missing; start the steps whose budget is reserved.
        Called with the run's lock held."""
        assert self.bus is not None
        while not state.terminal:
            if state.past_deadline(utc_now(), self.settings.run_deadline_s):
                ended = [state.deadline_exceeded(self.settings.run_deadline_s)]
                log.warning("run %s: past its deadline; ending it", state.run_id)
                await self.bus.publish_all(ended)
                self._applied(state, ended)
                return
            events, startable = state.next_actions()
            for step in startable:
                # Claimed in memory now; the log learns it from step.started. If we die
                # before that, the replay finds the step reserved and starts it again.
                interrupted = step.status is StepStatus.INTERRUPTED
                step.status = StepStatus.RUNNING
                self._spawn(
                    self._settle_interrupted(state, step)
                    if interrupted
                    else self._execute(state, step)
                )
            for step in state.steps.values():
                if (
                    step.status is StepStatus.BACKOFF
                    and (state.run_id, step.step.id) not in self.backoffs
                ):
                    self.backoffs.add((state.run_id, step.step.id))
                    self._spawn(self._retry_later(state, step))
            if not events:
                return
            await self.bus.publish_all(events)
            self._applied(state, events)

    def _note_deadline(self, state: RunState) -> None:
        """Wake the deadline timer when a run's deadline is earlier than the next one."""
        deadline = state.deadline(self.settings.run_deadline_s)
        if deadline is not None and (self.next_deadline is None or deadline < self.next_deadline):
            self.next_deadline = deadline
            self.deadline_wake.set()

    async def _end_overdue_runs(self) -> None:
        """End every run past its deadline: at the next deadline known, and at least every
        AOS_DEADLINE_SWEEP_S (the sweep also catches what a timer could miss)."""
        default_s = self.settings.run_deadline_s
        while self.running:
            now = utc_now()
            upcoming: datetime | None = None
            for state in list(self.runs.values()):
                deadline = state.deadline(default_s)
                if deadline is None or state.terminal:
                    continue
                if deadline > now:
                    upcoming = deadline if upcoming is None else min(upcoming, deadline)
                    continue
                try:
                    async with self._lock(state.run_id):
                        await self._drive(state)
                except Exception:
                    log.exception("run %s: ending it at its deadline failed", state.run_id)
            self.next_deadline = upcoming
            wait_s = self.settings.deadline_sweep_s
            if upcoming is not None:
                wait_s = min(wait_s, max(0.0, (upcoming - utc_now()).total_seconds()))
            self.deadline_wake.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(self.deadline_wake.wait(), timeout=wait_s + 0.01)

    def _applied(self, state: RunState, events: Sequence[EventEnvelope]) -> None:
        for event in events:
            state.apply(event)  # type: ignore[arg-type]  # every event we publish is AnyEvent
        if state.terminal:
            RUNS.labels(state.terminal.removeprefix("run.")).inc()
            self._finish(state.run_id)
        ACTIVE_RUNS.set(len(self.runs))

    # --- steps ---------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _execute(self, state: RunState, step: StepState, *, resumed: bool = False) -> None:
        """One attempt of a step: call its skill, publish its result. `resumed`: the call
        is made again after an interruption, and step.started is in the log already."""
        skill = self.skills.get(step.step.skill)
        started_at = time.perf_counter()
        params: dict[str, Any] = {}
        result: SkillResult | None = None
        failure: Failure | None = None
        telemetry: StepTelemetry | None = None
        started_published = resumed
        try:
            if skill is None:
                raise SkillError(
                    Failure.of(FailureCode.SKILL_UNKNOWN, f"no skill {step.step.skill!r}")
                )
            resolved = resolve(step.step.params, state.inputs, state.outputs())
            size = json_size(resolved)
            if size > STEP_PARAMS_MAX_BYTES:
                # Left out of step.started too: they would not fit in it.
                raise SkillError(
                    Failure.of(
                        FailureCode.INPUT_INVALID,
                        f"step {step.step.id!r}: its params, resolved, are {size} bytes of "
                        f"JSON, over the limit of {STEP_PARAMS_MAX_BYTES}",
                    )
                )
            params = resolved
            validated = skill.contract.params_model.model_validate(resolved)
            started = state.step_event(StepStarted, step, "started", params=params)
            pure = skill.contract.side_effect is SideEffect.PURE
            if not pure and not started_published:
                # Before an effect leaves the process, the log must say it started.
                await self._publish_until_done([started])
                started_published = True
            timeout = step.step.timeout_s or skill.contract.timeout_s
            started_at = time.perf_counter()
            result = await self.call_skill(
                skill,
                validated,
                self._skill_context(state, step),
                key=_claim_key(state, step),
                limit_s=timeout,
            )
        except SkillError as exc:
            failure = exc.failure
            telemetry = exc.telemetry
        except UnresolvedReference as exc:
            failure = Failure.of(FailureCode.INPUT_INVALID, str(exc))
        except ValidationError as exc:
            failure = Failure.of(FailureCode.INPUT_INVALID, _validation_message(step, exc))
        except TimeoutError:
            failure = Failure.of(
                FailureCode.SKILL_TIMEOUT, f"{step.step.skill} took longer than its timeout"
            )
            failure = failure.unknown_outcome()  # cut off mid-call: it may have had its effect
            if skill is not None and not skill.contract.retry_safe(params):
                failure = failure.final("the call's outcome is unknown and it is not retry-safe")
        except Exception as exc:  # a skill bug fails the step, not the run loop
            if is_outage(exc):
                # The claim store (Redis) is down, not the skill broken: a retryable
                # failure, tried again within the step's retry policy.
                log.warning("step %s: a dependency is down: %s", step.step.id, describe(exc))
                failure = Failure.of(
                    FailureCode.DEPENDENCY_UNAVAILABLE, f"a dependency is down: {describe(exc)}"
                )
            else:
                log.exception("skill %s crashed", step.step.skill)
                failure = Failure.of(FailureCode.SKILL_ERROR, f"{type(exc).__name__}: {exc}")
        elapsed = time.perf_counter() - started_at
        STEP_SECONDS.labels(step.step.skill).observe(elapsed)
        out: list[EventEnvelope] = []
        if not started_published:
            # Pure steps publish step.started together with their result (one round trip
            # fewer; nothing left the process in between), and so does a step that
            # failed before its call, so the timeline still shows the attempt.
            out.append(state.step_event(StepStarted, step, "started", params=params))
        out.append(
            self._outcome(
                state,
                step,
                result,
                failure,
                telemetry,
                duration_ms=round(elapsed * 1000, 3),
                is_stub=bool(skill and skill.is_stub),
            )
        )
        await self._conclude(state, out)

    def _outcome(
        self,
        state: RunState,
        step: StepState,
        result: SkillResult | None,
        failure: Failure | None,
        telemetry: StepTelemetry | None,
        *,
        duration_ms: float,
        is_stub: bool,
    ) -> EventEnvelope:
        """step.succeeded, or step.failed (retrying or not): an output over the limit
        fails the step, so that no event outgrows the bus."""
        skill_name = step.step.skill
        cost_cents = 0
        if result is not None:
            size = json_size(result.output)
            limit = self.settings.max_step_output_bytes
            if size <= limit:
                STEPS.labels(skill_name, "succeeded").inc()
                succeeded: EventEnvelope = state.step_event(
                    StepSucceeded,
                    step,
                    "result",
                    output=result.output,
                    cost_cents=result.cost_cents,
                    duration_ms=duration_ms,
                    is_stub=is_stub,
                    telemetry=result.telemetry,
                )
                return succeeded
            failure = Failure.of(
                FailureCode.OUTPUT_TOO_LARGE,
                f"step {step.step.id!r} ({skill_name}) output is {size} bytes of JSON, over "
                f"the limit of {limit} (AOS_MAX_STEP_OUTPUT_BYTES)",
            )
            telemetry, cost_cents = result.telemetry, result.cost_cents
        assert failure is not None
        if len(failure.message) > MAX_FAILURE_MESSAGE:
            failure = failure.model_copy(
                update={"message": failure.message[:MAX_FAILURE_MESSAGE] + " [cut]"}
            )
        will_retry = failure.retryable and step.attempt < step.max_attempts
        STEPS.labels(skill_name, "retrying" if will_retry else "failed").inc()
        failed: EventEnvelope = state.step_event(
            StepFailed,
            step,
            "result",
            error=failure,
            will_retry=will_retry,
            cost_cents=cost_cents,
            duration_ms=duration_ms,
            telemetry=telemetry,
        )
        return failed

    async def _conclude(self, state: RunState, out: list[EventEnvelope]) -> None:
        """Apply a step's result and publish it with what it unlocks (the next
        reservations, or the run's end) in one round trip."""
        async with self._lock(state.run_id):
            for event in out:
                state.apply(event)  # type: ignore[arg-type]
            follow_up, _ = state.next_actions()
            await self._publish_until_done([*out, *follow_up])
            self._applied(state, follow_up)
            await self._drive(state)

    async def _settle_interrupted(self, state: RunState, step: StepState) -> None:
        """Settle a step cut off mid-call by an executor that died: a retry-safe call is
        made again (same attempt, same Idempotency-Key); any other takes the result the
        dead executor recorded in its idempotency claim, or fails STEP_INTERRUPTED."""
        if state.may_call_again(step):
            log.info(
                "run %s: step %r attempt %d was interrupted mid-call; retry-safe, calling again",
                state.run_id,
                step.step.id,
                step.attempt,
            )
            await self._execute(state, step, resumed=True)
            return
        contract = SKILL_CONTRACTS[step.step.skill]
        recorded = await self._recorded_result(
            _claim_key(state, step), step.step.timeout_s or contract.timeout_s
        )
        if recorded is None:
            log.warning(
                "run %s: step %r attempt %d was interrupted mid-call and is not safe to call "
                "again: STEP_INTERRUPTED",
                state.run_id,
                step.step.id,
                step.attempt,
            )
            STEPS.labels(step.step.skill, "interrupted").inc()
            settled: EventEnvelope = state.interrupted_failure(step)
        else:
            result = SkillResult(recorded.get("output"), int(recorded.get("cost_cents", 0)))
            settled = self._outcome(state, step, result, None, None, duration_ms=0.0, is_stub=False)
        await self._conclude(state, [settled])

    async def _recorded_result(self, key: str, limit_s: float) -> dict[str, Any] | None:
        """The result the idempotency claim recorded for an interrupted call, or None.

        A claim still in flight belongs to the executor that died (or to one that lost
        the lease and is finishing its call): it is waited out, but never longer than a
        claim lives (the call's limit plus a margin), and Redis not answering counts as
        nothing recorded once that time is up."""
        deadline = time.monotonic() + limit_s + 2 * CLAIM_MARGIN_S
        while True:
            try:
                claim = await self.idempotency.lookup(key)
            except Exception:  # noqa: BLE001 - Redis blips are waited out, within the deadline
                log.warning("idempotency lookup of %s failed; trying again", key)
                claim = Claim("in_flight")
            if claim is None:
                return None
            if claim.state == "done":
                return claim.result or {}
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.5)

    async def call_skill(
        self, skill: Skill, params: BaseModel, context: SkillContext, *, key: str, limit_s: float
    ) -> SkillResult:
        """Call the skill; an unsafe one at most once per step, whatever the attempt.

        The step's key is claimed before the call (for as long as the call may take) and
        its result recorded after. A recorded result is returned without calling again.
        A claim held by another attempt — alive, or dead mid-call with an unknown outcome
        — is waited out until it expires. A failure with a known outcome releases the
        claim so a retry may call again; a timeout does not (the effect may have
        happened), so the retry waits for the claim to expire.

        A retry-safe call (pure or idempotent skill, an http_call GET or one the step
        declares idempotent) takes no claim: calling it again is harmless."""
        if skill.contract.retry_safe(params.model_dump()):
            async with asyncio.timeout(limit_s):
                return await skill.run(params, context)
        claim_ttl = limit_s + CLAIM_MARGIN_S
        claim = await self._through_outages(lambda: self.idempotency.claim(key, claim_ttl))
        deadline = time.monotonic() + claim_ttl + CLAIM_MARGIN_S
        while claim.state == "in_flight" and time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            claim = await self._through_outages(lambda: self.idempotency.claim(key, claim_ttl))
        if claim.state == "done":
            recorded = claim.result or {}
            return SkillResult(recorded.get("output"), int(recorded.get("cost_cents", 0)))
        if claim.state == "in_flight":
            raise SkillError(
                Failure.of(
                    FailureCode.SKILL_ERROR, f"step {context.step_id!r} is in flight elsewhere"
                )
            )
        try:
            async with asyncio.timeout(limit_s):
                result = await skill.run(params, context)
        except SkillError:
            # A retryable failure lets the next attempt call again; a final one (its
            # outcome unknown) has no next attempt.
            try:
                await self._through_outages(lambda: self.idempotency.release(key))
            except Exception:  # the failure stands; the claim expires by itself
                log.warning("step %s: claim not released", context.step_id, exc_info=True)
            raise
        record = {"output": result.output, "cost_cents": result.cost_cents}
        try:
            await self._through_outages(
                lambda: self.idempotency.complete(key, record, self.settings.idempotency_ttl_s)
            )
        except Exception:
            # The call happened and its result is in hand: the step succeeds, and its
            # step.succeeded in the log is the record that keeps it from running again.
            log.warning("step %s: result not recorded in the claim", context.step_id, exc_info=True)
        return result

    async def _through_outages(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call()`, tried again with backoff while its store is unreachable, for up to
        AOS_OUTAGE_GIVE_UP_S: before an unsafe call nothing has happened yet, so waiting
        out a Redis outage is safe, and failing the attempt would use up the step's
        retries in a second."""
        give_up_at = time.monotonic() + self.settings.outage_give_up_s
        delay = 0.1
        while True:
            try:
                return await call()
            except Exception as exc:
                if not is_outage(exc) or not self.running or time.monotonic() > give_up_at:
                    raise
                log.warning("claim store unreachable (%s); retrying in %.1fs", describe(exc), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _skill_context(self, state: RunState, step: StepState) -> SkillContext:
        """Live progress of the step goes to core NATS (not the log): see docs/SKILLS.md."""
        bus = self.bus
        assert bus is not None
        subject = progress_subject(state.tenant, state.run_id, self.settings.namespace)

        async def publish(progress: StepProgress) -> None:
            await bus.nc.publish(subject, progress.model_dump_json().encode())

        return SkillContext(
            run_id=state.run_id,
            tenant=state.tenant,
            step_id=step.step.id,
            skill=step.step.skill,
            attempt=step.attempt,
            sink=publish,
            key_attempt=step.key_attempt,
        )

    async def _retry_later(self, state: RunState, step: StepState) -> None:
        delay = self.settings.retry_backoff_s * 2 ** max(0, step.attempt - 2)
        await asyncio.sleep(delay)
        async with self._lock(state.run_id):
            self.backoffs.discard((state.run_id, step.step.id))
            if step.status is StepStatus.BACKOFF and not state.terminal:
                step.status = StepStatus.PENDING
                await self._drive(state)

    async def _publish_until_done(self, events: Sequence[EventEnvelope]) -> None:
        """Publish from a step task, where there is no message to nak: keep trying until
        NATS takes it (ids are deterministic, so a retry cannot duplicate), or until
        shutdown, after which the next executor's replay picks the run up."""
        assert self.bus is not None
        delay = 0.05
        while True:
            try:
                await self.bus.publish_all(events)
                return
            except Exception:  # NATS blips are retried
                if not self.running:
                    raise
                log.warning("publishing %d events failed; retrying in %.2fs", len(events), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


def _claim_key(state: RunState, step: StepState) -> str:
    """The idempotency claim of a step: one for all its attempts."""
    return f"{state.run_id}:{step.step.id}"


async def _replay_request(request: web.Request) -> web.Response:
    """POST /replay {"events": [every event of one run]} -> the replay report."""
    try:
        body = await request.json()
        raw_events = body["events"]
        if not isinstance(raw_events, list):
            raise TypeError("events must be a list")
        events = [decode_event(json.dumps(raw).encode()) for raw in raw_events]
        report = replay(events)
    except (ValueError, KeyError, TypeError) as exc:
        return web.json_response({"error": f"cannot replay: {exc}"}, status=400)
    return web.json_response(report.as_dict())


def _validation_message(step: StepState, exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:3]:
        location = ".".join(str(item) for item in error["loc"]) or "params"
        parts.append(f"{location}: {error['msg']}")
    return f"step {step.step.id!r} ({step.step.skill}) params invalid: " + "; ".join(parts)


async def _const(value: bool) -> bool:
    return value
