"""How the log reaches the store: a batch handler for the four event streams, and a
small pull consumer for the parked stream.

Why a failed write is retried here, with backoff, rather than raised to the LogConsumer:
it would nak the batch and fetch the next one, which fails the same way while the
database is down, in a tight loop; and a batch handed back as failed would be parked
after a few tries, though an event the tracer could not store is no poison message. A
tracer that cannot write waits (its consumer lag shows it) and loses nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from aos_contracts.parked import ParkedMessage
from aos_contracts.subjects import PARKED, stream_subjects
from aos_plumbing import metrics
from aos_plumbing.bus import BatchHandler, Delivery, EventBus
from aos_plumbing.outages import describe, is_outage
from aos_tracer.projection import aware
from aos_tracer.rows import ParkedRow, TracedEvent
from aos_tracer.store import TraceStore

log = logging.getLogger(__name__)

DURABLE = "tracer"
T = TypeVar("T")

EVENTS_STORED = metrics.counter(
    "aos_tracer_events_stored_total", "events stored by the tracer (new ones only)", ("context",)
)
PARKED_STORED = metrics.counter(
    "aos_tracer_parked_stored_total", "parked messages read into the tracer's store"
)


async def until_stored(write: Callable[[], Awaitable[T]], what: str) -> T:
    """Run `write` until it succeeds, backing off; see the module docstring for why.
    The database being down is reported once, not with a traceback per retry."""
    delay = 0.1
    down = False
    while True:
        try:
            result = await write()
        except Exception as exc:
            if not is_outage(exc):
                log.exception("storing %s failed; retrying in %.1fs", what, delay)
            elif not down:
                log.warning("storing %s: %s; retrying until it is back", what, describe(exc))
            down = down or is_outage(exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        if down:
            log.warning("stored %s: the database is back", what)
        return result


def event_batch_handler(store: TraceStore, context: str, stream: str) -> BatchHandler:
    """The whole batch in one transaction; the LogConsumer acks it once this returns."""

    async def handle(deliveries: list[Delivery]) -> Sequence[Delivery]:
        batch = [TracedEvent(stream, d.stream_seq, d.subject, d.event) for d in deliveries]
        stored = await until_stored(lambda: store.apply(stream, batch), f"{stream} batch")
        EVENTS_STORED.labels(context).inc(stored)
        pending = deliveries[-1].msg.metadata.num_pending
        metrics.CONSUMER_PENDING.labels("tracer", stream).set(pending)
        return []

    return handle


class ParkedConsumer:
    """The parked stream into the `parked` table.

    Parked messages are not AOS events (LogConsumer would park them again as
    undecodable), hence this small sibling of LogConsumer with the same rebuild rule: if
    the durable consumer acked more than the store holds, it is recreated from the
    store's sequence.
    """

    def __init__(self, bus: EventBus, store: TraceStore, *, batch_size: int = 256) -> None:
        self.bus = bus
        self.store = store
        self.batch_size = batch_size
        self.stream = bus.stream(PARKED)
        self._sub: JetStreamContext.PullSubscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._running = False

    async def start(self) -> None:
        tracked = await self.store.last_seq(self.stream)
        js = self.bus.js
        try:
            info = await js.consumer_info(self.stream, DURABLE)
        except NotFoundError:
            info = None
        acked = info.ack_floor.stream_seq if info is not None and info.ack_floor else 0
        if info is not None and acked > tracked:
            log.warning(
                "%s: store has %d, consumer acked %d: rebuilding", self.stream, tracked, acked
            )
            await js.delete_consumer(self.stream, DURABLE)
            info = None
        if info is None:
            await js.add_consumer(
                self.stream,
                js_api.ConsumerConfig(
                    durable_name=DURABLE,
                    filter_subject=stream_subjects(PARKED, self.bus.namespace)[0],
                    ack_policy=js_api.AckPolicy.EXPLICIT,
                    ack_wait=30.0,
                    deliver_policy=(
                        js_api.DeliverPolicy.BY_START_SEQUENCE
                        if tracked
                        else js_api.DeliverPolicy.ALL
                    ),
                    opt_start_seq=tracked + 1 if tracked else None,
                ),
            )
        self._sub = await js.pull_subscribe_bind(durable=DURABLE, stream=self.stream)
        self._running = True
        self._task = asyncio.create_task(self._run(), name=f"consume-{self.stream}")

    async def stop(self) -> None:
        self._running = False
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=10.0)
            except TimeoutError:
                self._task.cancel()
            except Exception:  # whatever ended the loop must not stop the shutdown
                log.exception("%s: consumer ended with an error", self.stream)
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()

    async def _run(self) -> None:
        assert self._sub is not None
        while self._running:
            try:
                msgs = await self._sub.fetch(self.batch_size, timeout=1.0)
            except TimeoutError:  # nats-py raises its own subclass, or asyncio's
                continue
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError):
                await asyncio.sleep(0.5)
                continue
            except Exception:
                log.exception("%s: fetch failed", self.stream)
                await asyncio.sleep(0.5)
                continue
            if not msgs:
                # nats-py answers a lingering pull that the server ended (408) with no
                # messages rather than a timeout: an idle stream, nothing to store.
                continue
            await self.store_parked(msgs)
            for msg in msgs:
                try:
                    await msg.ack()
                except nats.errors.Error:  # redelivered later, and stored once (unique key)
                    log.warning("%s: ack failed", self.stream)

    async def store_parked(self, msgs: list[Msg]) -> None:
        if not msgs:
            return
        rows = [self.parked_row(msg) for msg in msgs]
        last = max(msg.metadata.sequence.stream for msg in msgs)
        await until_stored(lambda: self.store.add_parked(self.stream, last, rows), "parked")
        PARKED_STORED.inc(len(rows))

    def parked_row(self, msg: Msg) -> ParkedRow:
        try:
            parked = ParkedMessage.model_validate_json(msg.data)
        except ValidationError as exc:
            # Not what a parking service writes; kept anyway (nothing is silently dropped),
            # as parked on the parked stream itself by the service its subject names.
            return ParkedRow(
                service=msg.subject.rsplit(".", 1)[-1],
                reason=f"not a parked message: {exc.error_count()} validation errors",
                stream=self.stream,
                stream_seq=msg.metadata.sequence.stream,
                subject=msg.subject,
                parked_at=msg.metadata.timestamp,
                parked_seq=msg.metadata.sequence.stream,
                payload={
                    "headers": dict(msg.headers or {}),
                    "data_b64": base64.b64encode(msg.data).decode(),
                },
            )
        return ParkedRow(
            service=parked.service,
            reason=parked.reason,
            stream=parked.stream,
            stream_seq=parked.stream_seq,
            subject=parked.subject,
            parked_at=aware(parked.parked_at),
            parked_seq=msg.metadata.sequence.stream,
            payload=parked.model_dump(mode="json"),
        )
