"""The event log on NATS JetStream: streams, publishing, durable consumers, replay, parking.

Why a consumer layer of our own on nats-py rather than FastStream's subscribers: FastStream
fetches batches with the same nats-py call, but it does not model what the log's
consumers need: per-run ordering inside and across batches, partial acks (a batch whose
failed events go back while the rest is acknowledged), parking with reasons, outages told
apart from poison messages, heartbeats for handlers slower than the ack wait, and
restarting a durable consumer from the sequence a store last applied. What we take from
FastStream is its conventions: consumers declared with the event types they take, and
one decoder for every reader of the log (`decode_placed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from aos_contracts.codec import (
    HEADER_EVENT_TYPE,
    EventDecodeError,
    decode_event,
    encode_event,
    event_headers,
)
from aos_contracts.events import AnyEvent, EventEnvelope, GoalSubmitted
from aos_contracts.parked import ParkedMessage
from aos_contracts.subjects import (
    CONTEXT_OF_TYPE,
    CONTEXTS,
    PARKED,
    misplacement,
    parked_subject,
    run_id_of_subject,
    run_subject,
    stream_name,
    stream_subjects,
)
from aos_plumbing import metrics
from aos_plumbing.outages import OutageState, describe, is_outage
from aos_plumbing.settings import CommonSettings

log = logging.getLogger(__name__)

# Long enough to cover a client's retry of the same goal, and a service's re-publish of
# a derived event after a crash and restart.
DUPLICATE_WINDOW_S = 15 * 60.0
# How often a consumer reports its lag (aos_consumer_pending_messages) while idle or busy.
LAG_POLL_INTERVAL_S = 5.0
# Redelivery backoff of a failed message: 0.1 s doubling, capped so that a message waiting
# out an outage is tried again within this long of the dependency coming back.
REDELIVERY_MAX_DELAY_S = 5.0
# An event held back behind an earlier failed event of its run stops waiting for it once
# that one has not come back to this process for this long (another replica has it).
HELD_BACK_LIMIT_S = 60.0
# How long per_run remembers when a message it no longer sees started failing.
OUTAGE_MEMORY_S = 600.0
DEFAULT_GIVE_UP_S = 300.0

NAKS = metrics.counter(
    "aos_consumer_naks_total",
    "messages sent back for redelivery, by why: outage (a dependency is down), held_back "
    "(behind a failed event of its run), error (counts towards parking)",
    ("service", "stream", "reason"),
)


@dataclass(slots=True)
class Delivery:
    """One event taken from the log, with where it came from."""

    msg: Msg
    stream_seq: int
    subject: str
    event: AnyEvent
    num_delivered: int
    # Set by the handler (per_run) on what it gives back, for the consumer to decide
    # between waiting and parking: the exception it failed with, or the stream seq of an
    # earlier event of its run that failed and must be handled first. `error` is also set
    # on a delivery handled by giving up on its run after an outage.
    error: BaseException | None = None
    held_back_by: int | None = None

    @property
    def run_id(self) -> str:
        return run_id_of_subject(self.subject)


class MisplacedEvent(EventDecodeError):
    """A valid event where it may not count (see `aos_contracts.subjects.misplacement`)."""


def decode_placed(subject: str, data: bytes) -> AnyEvent:
    """The event in a message of the log, if it may count where it arrived.

    Raises EventDecodeError for bytes that are not an event, and for an event on the
    wrong stream, tenant or run (`misplacement`): both are parked by the live consumers
    and skipped by every reader of the log, so nothing ever acts on them."""
    event = decode_event(data)
    refusal = misplacement(subject, event.type, event.tenant, event.run_id)
    if refusal is not None:
        raise MisplacedEvent(refusal)
    return event


# Who may open a run with a goal (the planner's and the ledger's judgement of its token);
# the message is the goal's as stored in the log.
GoalAdmission = Callable[[GoalSubmitted, object], bool]


# A batch handler returns the deliveries it could not handle (nak'ed for redelivery);
# everything else in the batch is acknowledged.
BatchHandler = Callable[[list[Delivery]], Awaitable[Sequence[Delivery] | None]]
# A one-event handler may publish by itself, or return the events it decided on so that
# per_run publishes everything a run's events in a batch produced in one round trip.
EventHandler = Callable[[Delivery], Awaitable[Sequence[EventEnvelope] | None]]
Publisher = Callable[[Sequence[EventEnvelope]], Awaitable[object]]


class EventBus:
    def __init__(
        self,
        nc: NatsClient,
        namespace: str,
        service: str,
        *,
        ack_wait_s: float = 30.0,
        max_handling_s: float = 600.0,
    ) -> None:
        self.nc = nc
        # How long a delivered message may stay unacknowledged before JetStream
        # redelivers it: the floor on recovery time after a consumer dies mid-batch.
        self.ack_wait_s = ack_wait_s
        # How long a batch's handler may keep its messages by reporting progress; past
        # that a hung handler lets them go, and the ack wait redelivers them.
        self.max_handling_s = max_handling_s
        self.js: JetStreamContext = nc.jetstream()
        self.namespace = namespace
        self.service = service

    @classmethod
    async def connect(
        cls,
        url: str,
        namespace: str,
        service: str,
        *,
        ack_wait_s: float = 30.0,
        max_handling_s: float = 600.0,
    ) -> EventBus:
        nc = await nats.connect(
            url,
            name=f"aos-{service}",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            # A service keeps running through a NATS blip; /readyz reports it.
            allow_reconnect=True,
        )
        return cls(nc, namespace, service, ack_wait_s=ack_wait_s, max_handling_s=max_handling_s)

    @classmethod
    async def open(cls, settings: CommonSettings, service: str) -> EventBus:
        """Connect as `service` with the settings every service shares, and declare the
        streams of the log (every service does both at start)."""
        bus = await cls.connect(
            settings.nats_url,
            settings.namespace,
            service,
            ack_wait_s=settings.ack_wait_s,
            max_handling_s=settings.max_handling_s,
        )
        await bus.ensure_streams()
        return bus

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.drain()

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    def stream(self, context: str) -> str:
        return stream_name(context, self.namespace)

    async def ensure_streams(self) -> None:
        """Declare every stream of the log (idempotent; every service does it at start)."""
        for context in (*CONTEXTS, PARKED):
            config = js_api.StreamConfig(
                name=self.stream(context),
                subjects=stream_subjects(context, self.namespace),
                retention=js_api.RetentionPolicy.LIMITS,
                storage=js_api.StorageType.FILE,
                duplicate_window=DUPLICATE_WINDOW_S,
                discard=js_api.DiscardPolicy.OLD,
                allow_direct=True,
            )
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                # 10058: exists with a different config (e.g. created by an older
                # version); update it rather than fail.
                if exc.err_code == 10058:
                    await self.js.update_stream(config)
                else:
                    raise

    def subject_of(self, event: EventEnvelope) -> str:
        event_type = event.type
        return f"{self.namespace}.{CONTEXT_OF_TYPE[event_type]}.{event.tenant}.{event.run_id}"

    async def publish(self, event: EventEnvelope) -> js_api.PubAck:
        return await self.js.publish(
            self.subject_of(event), encode_event(event), headers=event_headers(event)
        )

    async def publish_all(self, events: Sequence[EventEnvelope]) -> list[js_api.PubAck]:
        """Publish in order and wait for every ack: one round trip for the whole batch.

        nats-py writes each publish to the connection buffer before it first awaits, so
        the server receives them in the order given (per-run order is kept)."""
        if not events:
            return []
        if len(events) == 1:
            return [await self.publish(events[0])]
        return list(await asyncio.gather(*(self.publish(event) for event in events)))

    async def park(self, msg: Msg, reason: str, *, stream_seq: int, num_delivered: int) -> None:
        parked = ParkedMessage.of(
            service=self.service,
            reason=reason,
            stream=msg.metadata.stream if msg.metadata else "",
            stream_seq=stream_seq,
            subject=msg.subject,
            # A parked copy is read by operators: never keep the bearer token.
            headers={
                name: "<redacted>" if name.lower() == "authorization" else value
                for name, value in (msg.headers or {}).items()
            },
            data=msg.data,
            num_delivered=num_delivered,
        )
        await self.js.publish(
            parked_subject(self.service, self.namespace),
            parked.model_dump_json().encode(),
            headers={"Nats-Msg-Id": f"parked:{self.service}:{parked.stream}:{stream_seq}"},
        )
        metrics.PARKED.labels(self.service, parked.stream).inc()
        log.warning("parked %s seq %d: %s", parked.stream, stream_seq, reason)

    async def last_seq(self, context: str) -> int:
        info = await self.js.stream_info(self.stream(context))
        return int(info.state.last_seq)

    async def replay(
        self, context: str, *, start_seq: int = 1, batch: int = 1000
    ) -> AsyncIterator[tuple[int, Msg]]:
        """Every message of a stream from `start_seq` up to its last message *now*.

        Used by services to rebuild in-memory state at start; an ephemeral consumer
        without acks, so it leaves no trace on the server."""
        last = await self.last_seq(context)
        if last < start_seq:
            return
        config = js_api.ConsumerConfig(
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start_seq,
            ack_policy=js_api.AckPolicy.NONE,
            inactive_threshold=30.0,
        )
        sub = await self.js.pull_subscribe(
            stream_subjects(context, self.namespace)[0], stream=self.stream(context), config=config
        )
        try:
            while True:
                try:
                    msgs = await sub.fetch(batch, timeout=2.0)
                except TimeoutError:  # nats-py raises both its own and asyncio's
                    return  # the stream's tail was deleted under us (limits)
                for msg in msgs:
                    seq = msg.metadata.sequence.stream
                    yield seq, msg
                    if seq >= last:
                        return
        finally:
            await sub.unsubscribe()

    async def _by_subject(
        self, context: str, subject: str
    ) -> AsyncIterator[tuple[js_api.RawStreamMsg, AnyEvent | None]]:
        """Every message of a stream on `subject` (wildcards allowed), in log order, with
        its event (None when it does not decode or may not count where it arrived: the
        stream's consumers park it). Direct gets: one round trip per message, so for
        subjects with few messages."""
        stream = self.stream(context)
        seq = 1
        while True:
            try:
                raw = await self.js.get_msg(stream, seq=seq, subject=subject, next=True)
            except NotFoundError:
                return
            try:
                yield raw, decode_placed(raw.subject or "", raw.data or b"")
            except EventDecodeError:
                yield raw, None
            seq = (raw.seq or seq) + 1

    async def run_events(self, context: str, tenant: str, run_id: object) -> list[AnyEvent]:
        """The events of one run in one stream so far, in log order."""
        subject = run_subject(context, tenant, str(run_id), self.namespace)
        events: list[AnyEvent] = []
        async for _, event in self._by_subject(context, subject):
            if event is not None:
                events.append(event)
        return events

    async def run_owner(
        self, run_id: object, admitted: GoalAdmission | None = None
    ) -> GoalSubmitted | None:
        """The goal that owns a run: the first goal.submitted for its id, on any tenant's
        goals subject, that counts where it arrived and is `admitted`. In log order, so
        every service that asks gets the same answer whenever it asks: a goal published
        later under the same run id, by its tenant or another, never takes the run over.
        One direct get per message on the run's goals subjects (usually one)."""
        subject = run_subject("goals", "*", str(run_id), self.namespace)
        async for raw, event in self._by_subject("goals", subject):
            if isinstance(event, GoalSubmitted) and (admitted is None or admitted(event, raw)):
                return event
        return None

    async def watch_run(self, context: str, tenant: str, run_id: object) -> RunWatch:
        """Every event of one run in one stream, from its first, and then as they come.

        For a service that must wait for another's answer before it can go on (the
        planner waits for the ledger's decision on each planning call). An ordered
        consumer filtered on the run's subject: it reads only that run's events, and
        leaves nothing behind on the server."""
        sub = await self.js.subscribe(
            run_subject(context, tenant, str(run_id), self.namespace),
            stream=self.stream(context),
            ordered_consumer=True,
            deliver_policy=js_api.DeliverPolicy.ALL,
            inactive_threshold=30.0,
        )
        return RunWatch(self.js, self.stream(context), sub)

    def consumer(
        self,
        context: str,
        durable: str,
        handler: BatchHandler,
        *,
        batch_size: int = 256,
        start_after_seq: int | None = None,
        park_after_deliveries: int = 10,
        event_types: Collection[str] | None = None,
        batches_in_flight: int = 1,
    ) -> LogConsumer:
        return LogConsumer(
            self,
            context=context,
            durable=durable,
            handler=handler,
            batch_size=batch_size,
            start_after_seq=start_after_seq,
            park_after_deliveries=park_after_deliveries,
            event_types=None if event_types is None else frozenset(event_types),
            batches_in_flight=batches_in_flight,
        )


class RunWatch:
    """A run's events in one stream, in log order; see `EventBus.watch_run`."""

    def __init__(
        self, js: JetStreamContext, stream: str, sub: JetStreamContext.PushSubscription
    ) -> None:
        self._js = js
        self._stream = stream
        self._sub = sub

    async def wait_for(self, wanted: Callable[[AnyEvent], bool], timeout_s: float) -> AnyEvent:
        """The first event (from the run's first) for which `wanted` is true; TimeoutError
        if none arrives within `timeout_s`. What does not decode is skipped: the stream's
        own consumers park it."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                msg = await self._sub.next_msg(timeout=max(0.0, deadline - time.monotonic()))
            except nats.errors.TimeoutError as exc:
                raise TimeoutError(
                    f"no awaited event on {self._sub.subject} in {timeout_s} s"
                ) from exc
            try:
                event = decode_placed(msg.subject, msg.data)
            except EventDecodeError:
                continue
            if wanted(event):
                return event

    async def close(self) -> None:
        # Best effort: an ordered consumer the client forgets is dropped by the server
        # once idle (inactive_threshold), but one round trip spares it the wait.
        with contextlib.suppress(Exception):
            consumer = self._sub._consumer  # nats-py keeps the name it was given here
            await self._sub.unsubscribe()
            if consumer:
                await self._js.delete_consumer(self._stream, consumer)


@dataclass
class LogConsumer:
    """A durable pull consumer over one stream of the log.

    Each fetched batch is decoded; what does not decode is parked with the reason and
    acknowledged (it would never decode on redelivery). The rest goes to the handler; what
    the handler reports as failed is nak'ed with a delay and, after
    `park_after_deliveries` attempts, parked too, so one poison message cannot stall a
    consumer forever. Except what failed for a dependency outage, or is held back behind
    a failed event of its run (see `Delivery.error`, `Delivery.held_back_by`): that is
    no poison, and is redelivered with backoff however long it takes.

    `event_types`, when given, are the only types the handler wants: a message whose
    type header names another is acknowledged without being decoded (most of a stream,
    for some consumers: the executor wants two of the budget stream's five types).
    Messages without the header are decoded and handed over as usual.

    `batches_in_flight` above 1 fetches the next batch while earlier ones are handled
    (up to that many at once), for handlers that wait on slow calls (the planner on a
    model): a slow batch no longer holds back the events behind it. Events of one run may
    then be handled concurrently across batches, so the handler must not rely on their
    order (the planner serialises a run with a lock of its own).

    `start_after_seq` is the last sequence the owner's store applied. When the durable
    consumer on the server is ahead of it (the store was wiped, or restored from an older
    backup) the consumer is recreated to deliver from there: that is how a store is rebuilt
    from the log.
    """

    bus: EventBus
    context: str
    durable: str
    handler: BatchHandler
    batch_size: int = 256
    start_after_seq: int | None = None
    park_after_deliveries: int = 10
    event_types: frozenset[str] | None = None
    batches_in_flight: int = 1
    _sub: JetStreamContext.PullSubscription | None = field(default=None, init=False)
    _slots: asyncio.Semaphore = field(init=False)
    _in_flight: set[asyncio.Task[None]] = field(default_factory=set, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    _running: bool = field(default=False, init=False)
    _fetching: bool = field(default=False, init=False)
    _lag_task: asyncio.Task[None] | None = field(default=None, init=False)
    last_batch_at: float = field(default=0.0, init=False)
    _outage: OutageState = field(init=False)

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.batches_in_flight)
        self._outage = OutageState(self.bus.service, self.stream)

    @property
    def stream(self) -> str:
        return self.bus.stream(self.context)

    def _config(self) -> js_api.ConsumerConfig:
        start = self.start_after_seq
        return js_api.ConsumerConfig(
            durable_name=self.durable,
            filter_subject=stream_subjects(self.context, self.bus.namespace)[0],
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=self.bus.ack_wait_s,
            max_deliver=-1,  # we park after park_after_deliveries ourselves, with a reason
            max_ack_pending=20_000,
            deliver_policy=(
                js_api.DeliverPolicy.BY_START_SEQUENCE if start else js_api.DeliverPolicy.ALL
            ),
            opt_start_seq=(start + 1) if start else None,
        )

    async def prepare(self) -> None:
        js = self.bus.js
        try:
            info = await js.consumer_info(self.stream, self.durable)
        except NotFoundError:
            info = None
        if info is not None and self.start_after_seq is not None:
            acked_floor = info.ack_floor.stream_seq if info.ack_floor else 0
            if acked_floor > self.start_after_seq:
                log.warning(
                    "%s: store applied up to %d but consumer %s acked %d: rebuilding from the log",
                    self.stream,
                    self.start_after_seq,
                    self.durable,
                    acked_floor,
                )
                await js.delete_consumer(self.stream, self.durable)
                info = None
        if info is None:
            await js.add_consumer(self.stream, self._config())
        self._sub = await js.pull_subscribe_bind(durable=self.durable, stream=self.stream)

    async def start(self) -> None:
        if self._sub is None:
            await self.prepare()
        self._running = True
        # Exported at 0 from the start, so an alert on increase() sees the first park.
        metrics.PARKED.labels(self.bus.service, self.stream)
        self._task = asyncio.create_task(self._run(), name=f"consume-{self.stream}")
        self._lag_task = asyncio.create_task(self._report_lag(), name=f"lag-{self.stream}")

    async def stop(self) -> None:
        """Stop fetching; the batch in hand is finished (and acked) first."""
        self._running = False
        if self._lag_task is not None:
            self._lag_task.cancel()
        if self._task is not None:
            if self._fetching:
                # Waiting for messages, holding none: nothing to finish.
                self._task.cancel()
            try:
                await asyncio.wait_for(self._task, timeout=10.0)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
        if self._in_flight:
            # Batches still being handled finish (and are acked) first, as above.
            await asyncio.wait(set(self._in_flight), timeout=10.0)
        if self._sub is not None:
            with contextlib.suppress(Exception):  # best effort on shutdown
                await self._sub.unsubscribe()

    async def report_lag(self) -> None:
        """Export the consumer's lag from the server's view of it (what KEDA scales on)."""
        info = await self.bus.js.consumer_info(self.stream, self.durable)
        metrics.CONSUMER_PENDING.labels(self.bus.service, self.stream).set(info.num_pending or 0)
        metrics.CONSUMER_ACK_PENDING.labels(self.bus.service, self.stream).set(
            info.num_ack_pending or 0
        )

    async def _report_lag(self) -> None:
        while self._running:
            try:
                await self.report_lag()
            except Exception:  # a NATS blip; the next poll reports again
                log.debug("%s: consumer_info failed", self.durable, exc_info=True)
            await asyncio.sleep(LAG_POLL_INTERVAL_S)

    async def _run(self) -> None:
        assert self._sub is not None
        while self._running:
            self.last_batch_at = time.monotonic()
            self._fetching = True
            try:
                msgs = await self._sub.fetch(self.batch_size, timeout=1.0)
            except TimeoutError:  # nats-py raises both its own and asyncio's
                continue
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError):
                await asyncio.sleep(0.5)
                continue
            except Exception:  # keep consuming through NATS blips
                log.exception("%s: fetch failed", self.durable)
                await asyncio.sleep(0.5)
                continue
            finally:
                self._fetching = False
            if self.batches_in_flight == 1:
                await self._process_or_nak(msgs)
                continue
            # The next batch is fetched while this one is handled, up to the limit.
            await self._slots.acquire()
            task = asyncio.create_task(self._process_or_nak(msgs))
            self._in_flight.add(task)
            task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._slots.release()

    async def _process_or_nak(self, msgs: list[Msg]) -> None:
        try:
            await self.process(msgs)
        except Exception:  # a failing batch is redelivered, not fatal
            log.exception("%s: batch failed; it will be redelivered", self.durable)
            for msg in msgs:
                await _safe_nak(msg, delay=1.0)

    async def process(self, msgs: list[Msg]) -> None:
        deliveries: list[Delivery] = []
        wanted = self.event_types
        for msg in msgs:
            if wanted is not None and msg.headers:
                kind = msg.headers.get(HEADER_EVENT_TYPE)
                # A type this stream owns but the handler does not want is skipped
                # unread; a type this stream does not own is read, to be parked.
                if kind is not None and kind not in wanted and self._owns(kind):
                    await msg.ack()
                    continue
            meta = msg.metadata
            seq = meta.sequence.stream
            try:
                event = decode_placed(msg.subject, msg.data)
            except EventDecodeError as exc:
                await self.bus.park(msg, str(exc), stream_seq=seq, num_delivered=meta.num_delivered)
                await msg.ack()
                continue
            deliveries.append(Delivery(msg, seq, msg.subject, event, meta.num_delivered))
        if not deliveries:
            return
        metrics.EVENTS_CONSUMED.labels(self.bus.service, self.context).inc(len(deliveries))
        heartbeat = asyncio.create_task(self._keep_in_progress(deliveries))
        try:
            failed = list(await self.handler(deliveries) or [])
        finally:
            heartbeat.cancel()
        failed_ids = {id(delivery) for delivery in failed}
        for delivery in deliveries:
            if id(delivery) not in failed_ids:
                await delivery.msg.ack()
        await self._send_back(failed, handled=[d for d in deliveries if id(d) not in failed_ids])

    async def _send_back(self, failed: list[Delivery], *, handled: list[Delivery]) -> None:
        """Nak what the handler could not handle, with backoff; park a poison message.

        A failure for a dependency outage, and an event held back behind its run's failed
        one, wait however many deliveries it takes: the planner and the executor end such
        a run themselves past AOS_OUTAGE_GIVE_UP_S (per_run's give_up), and the ledger
        and the tracer, which cannot end a run, catch up once the dependency is back.
        Any other failure is parked after `park_after_deliveries` (about 20 s of
        backoff), with the exception it failed with as the reason."""
        outages = [delivery for delivery in failed if is_outage(delivery.error)]
        if outages:
            self._outage.failed(outages[0].error, len(outages))
        elif any(delivery.error is None for delivery in handled):
            # Handled for real: not given up on in spite of the outage (per_run's give_up)
            self._outage.recovered()
        for delivery in failed:
            if is_outage(delivery.error):
                reason = "outage"
            elif delivery.held_back_by is not None:
                reason = "held_back"
            elif delivery.num_delivered >= self.park_after_deliveries:
                await self.bus.park(
                    delivery.msg,
                    park_reason(delivery),
                    stream_seq=delivery.stream_seq,
                    num_delivered=delivery.num_delivered,
                )
                await delivery.msg.ack()
                continue
            else:
                reason = "error"
            NAKS.labels(self.bus.service, self.stream, reason).inc()
            await _safe_nak(delivery.msg, delay=redelivery_delay(delivery.num_delivered))

    def _owns(self, event_type: str) -> bool:
        return CONTEXT_OF_TYPE.get(event_type) == self.context

    async def _keep_in_progress(self, deliveries: list[Delivery]) -> None:
        """Tell the server the batch is still being worked on, so that a handler slower
        than the ack wait (a planning call to a model can take a minute) does not get
        its messages redelivered to a replica while it still holds them. Only up to
        `max_handling_s`: a handler that hangs longer loses them to the ack wait."""
        deadline = time.monotonic() + self.bus.max_handling_s
        while time.monotonic() + self.bus.ack_wait_s / 2 < deadline:
            await asyncio.sleep(self.bus.ack_wait_s / 2)
            for delivery in deliveries:
                with contextlib.suppress(Exception):  # a lost heartbeat only risks a redelivery
                    await delivery.msg.in_progress()


def redelivery_delay(num_delivered: int) -> float:
    """0.1 s doubling to REDELIVERY_MAX_DELAY_S: a message that keeps failing is parked
    after 10 deliveries, about 20 s, long enough to ride out a store restart."""
    return min(0.05 * 2.0 ** min(num_delivered, 16), REDELIVERY_MAX_DELAY_S)


def park_reason(delivery: Delivery) -> str:
    reason = f"handler failed {delivery.num_delivered} times"
    if delivery.error is not None:
        reason += f"; the last time with {describe(delivery.error)}"
    return reason


async def _safe_nak(msg: Msg, delay: float) -> None:
    # If the nak is lost, the ack wait redelivers the message anyway.
    with contextlib.suppress(Exception):
        await msg.nak(delay=delay)


# What a service does with an event it could not handle for AOS_OUTAGE_GIVE_UP_S because
# a dependency stayed down (its last exception given): end the run (returning the events
# that do, like an EventHandler), or raise to keep waiting.
GiveUp = Callable[[Delivery, BaseException], Awaitable[Sequence[EventEnvelope] | None]]


@dataclass(slots=True)
class _HeldBack:
    """A run's failed event that its later events wait behind, and when it last failed."""

    seq: int
    at: float = field(default_factory=time.monotonic)

    def stale(self) -> bool:
        return time.monotonic() - self.at > HELD_BACK_LIMIT_S


class OutageClock:
    """How long each message has been failing for an outage, as seen by this process.

    Measured from the first outage failure of that message here, not from its age in
    the stream (a message that waited in a backlog has not been failing), nor from the
    server's delivery count (backoff makes deliveries a poor clock). A restart starts
    the count again: it can only make a service wait longer before giving up."""

    def __init__(self) -> None:
        self._first: dict[tuple[str, int], tuple[float, float]] = {}  # -> (first, last)

    def failing_for(self, delivery: Delivery) -> float:
        now = time.monotonic()
        key = (delivery.subject, delivery.stream_seq)
        first = self._first.get(key, (now, now))[0]
        self._first[key] = (first, now)
        if len(self._first) > 1000:
            # Messages that stopped coming back (handled by another replica): forgotten.
            for old, (_, last) in list(self._first.items()):
                if now - last > OUTAGE_MEMORY_S:
                    del self._first[old]
        return now - first

    def forget(self, delivery: Delivery) -> None:
        self._first.pop((delivery.subject, delivery.stream_seq), None)


def per_run(
    handle: EventHandler,
    *,
    publish: Publisher | None = None,
    park_after_deliveries: int = 10,
    give_up: GiveUp | None = None,
    give_up_after_s: float = DEFAULT_GIVE_UP_S,
) -> BatchHandler:
    """Adapt a one-event handler to a batch: runs are handled concurrently, the events of
    one run strictly in log order.

    Events the handler returns are published with `publish` once the run's events in
    the batch are handled, before any of them is acknowledged: one round trip per run
    per batch instead of one per event, and a crash before the publish means the whole
    group is redelivered and decided again (handlers are idempotent).

    When an event of a run fails it goes back for redelivery, and the run is *blocked*:
    its later events (in this batch or the next ones) are sent back too until the failed
    one has been handled, so a redelivery can never overtake. What goes back carries
    why (`Delivery.error`, `Delivery.held_back_by`), so the consumer parks only poison.

    An event that keeps failing because a dependency is down (outages.is_outage) is
    retried until the dependency is back; once it has been failing so for
    `give_up_after_s`, `give_up` is called instead of the handler, if given, to end the
    run (its events are published like the handler's). Without `give_up` the run's
    events wait for the dependency however long it takes."""
    blocked: dict[str, _HeldBack] = {}  # subject -> the event that must go first
    clock = OutageClock()

    async def attempt(delivery: Delivery) -> Sequence[EventEnvelope] | None:
        try:
            return await handle(delivery)
        except Exception as exc:
            if give_up is None or not is_outage(exc):
                raise
            failing_for = clock.failing_for(delivery)
            if failing_for < give_up_after_s:
                raise
            log.warning(
                "%s (seq %d, run %s): a dependency has been unreachable for %.0f s (%s): "
                "giving up on it",
                delivery.event.type,
                delivery.stream_seq,
                delivery.run_id,
                failing_for,
                describe(exc),
            )
            delivery.error = exc
            return await give_up(delivery, exc)

    def hold_back(later: list[Delivery], first: Delivery) -> list[Delivery]:
        blocked[first.subject] = _HeldBack(first.stream_seq)
        for delivery in later:
            delivery.held_back_by = first.stream_seq
        return later

    async def handle_run(run_deliveries: list[Delivery]) -> list[Delivery]:
        failed: list[Delivery] = []
        handled: list[Delivery] = []
        outbox: list[EventEnvelope] = []
        for index, delivery in enumerate(run_deliveries):
            first = blocked.get(delivery.subject)
            if first is not None and delivery.stream_seq > first.seq:
                if not first.stale():
                    for later in run_deliveries[index:]:
                        later.held_back_by = first.seq
                    failed += run_deliveries[index:]
                    break
                log.warning(
                    "%s: seq %d has not come back for %.0f s; its run's later events go on",
                    delivery.subject,
                    first.seq,
                    HELD_BACK_LIMIT_S,
                )
            try:
                produced = await attempt(delivery)
            except Exception as exc:  # reported, nak'ed, parked if it persists
                delivery.error = exc
                failed.append(delivery)
                if is_outage(exc):
                    # One warning per outage comes from the consumer, not one per message.
                    log.debug("handling seq %d failed: %s", delivery.stream_seq, describe(exc))
                else:
                    log.exception(
                        "handling %s (seq %d) failed", delivery.event.type, delivery.stream_seq
                    )
                if is_outage(exc) or delivery.num_delivered < park_after_deliveries:
                    failed += hold_back(run_deliveries[index + 1 :], delivery)
                    break
                # The consumer parks it now; the run must not wait for it any longer.
                blocked.pop(delivery.subject, None)
                continue
            if first is not None:
                blocked.pop(delivery.subject, None)
            handled.append(delivery)
            if produced:
                outbox.extend(produced)
        if outbox:
            if publish is None:
                raise TypeError("per_run: the handler returned events but no publish was given")
            try:
                await publish(outbox)
            except Exception as exc:  # nothing of the group is acknowledged; it comes back
                if is_outage(exc):
                    log.debug("publishing %d events failed: %s", len(outbox), describe(exc))
                else:
                    log.exception("publishing %d events failed", len(outbox))
                for delivery in handled:
                    delivery.error = exc
                hold_back([], handled[0])
                return handled + failed
        for delivery in handled:
            clock.forget(delivery)
        return failed

    async def handle_batch(deliveries: list[Delivery]) -> list[Delivery]:
        by_run: dict[str, list[Delivery]] = defaultdict(list)
        for delivery in deliveries:
            by_run[delivery.run_id].append(delivery)
        if len(by_run) == 1:
            return await handle_run(next(iter(by_run.values())))
        results = await asyncio.gather(*(handle_run(group) for group in by_run.values()))
        return [delivery for failed in results for delivery in failed]

    return handle_batch
