"""The tracer service: every event of every stream into its store, and a query API.

One durable consumer "tracer" per context applies each batch in one transaction, with
the stream's tracking sequence; the consumer starts after that sequence, so a store that
was emptied (or dropped and created again) is rebuilt from the log at the next start.
"""

from __future__ import annotations

import asyncio
import logging

import nats
from nats.js.errors import NotFoundError

from aos_contracts.subjects import CONTEXTS, PARKED
from aos_plumbing.auth import Authenticator
from aos_plumbing.bus import EventBus, LogConsumer
from aos_plumbing.http import ServiceHttp
from aos_tracer.api import TraceApi
from aos_tracer.consumers import DURABLE, ParkedConsumer, event_batch_handler
from aos_tracer.postgres import PostgresTraceStore
from aos_tracer.settings import TracerSettings
from aos_tracer.store import InMemoryTraceStore, TraceStore

log = logging.getLogger(__name__)


def make_store(settings: TracerSettings) -> TraceStore:
    if settings.use_postgres_traces:
        return PostgresTraceStore(settings.database_url)
    log.warning("USE_POSTGRES_TRACES=false: traces are kept in memory and lost on restart")
    return InMemoryTraceStore()


class TracerService:
    name = "tracer"

    def __init__(self, settings: TracerSettings, store: TraceStore | None = None) -> None:
        self.settings = settings
        self.store = store or make_store(settings)
        self.bus: EventBus | None = None
        self.consumers: list[LogConsumer] = []
        self.parked: ParkedConsumer | None = None
        self.http = ServiceHttp(self.name, settings.http_host, settings.http_port)
        self.auth = Authenticator.from_settings(settings)
        self.http.backends = {
            "traces": self.store.backend,
            "auth": self.auth.mode,
            "rbac": self.auth.rbac_mode,
        }
        TraceApi(self.store, self.auth, self._delete_parked).add_routes(self.http.app)

    async def start(self) -> None:
        await self.store.start()
        self.bus = await EventBus.open(self.settings, self.name)
        for context in CONTEXTS:
            stream = self.bus.stream(context)
            consumer = self.bus.consumer(
                context,
                DURABLE,
                event_batch_handler(self.store, context, stream),
                batch_size=self.settings.consumer_batch,
                start_after_seq=await self.store.last_seq(stream),
            )
            await consumer.start()
            self.consumers.append(consumer)
        self.parked = ParkedConsumer(self.bus, self.store, batch_size=self.settings.consumer_batch)
        await self.parked.start()
        bus = self.bus
        self.http.add_check("nats", lambda: _true(bus.connected))
        self.http.add_check(self.store.backend, self.store.ping)
        await self.http.start()

    async def _delete_parked(self, parked_seq: int) -> bool:
        """Delete a message from the parked stream; False if it was not there."""
        if self.bus is None:
            return False
        try:
            return bool(await self.bus.js.delete_msg(self.bus.stream(PARKED), parked_seq))
        except NotFoundError:
            return False
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code == 10037:  # "no message found": deleted already
                return False
            raise

    async def stop(self) -> None:
        # Together: each stop waits for its consumer's fetch in hand to end.
        stopping = [consumer.stop() for consumer in self.consumers]
        if self.parked:
            stopping.append(self.parked.stop())
        await asyncio.gather(*stopping)
        await self.http.stop()
        if self.bus:
            await self.bus.close()
        await self.store.close()


async def _true(value: bool) -> bool:
    return value
