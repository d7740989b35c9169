"""Test-side NATS helpers: publish goals, wait for run ends, read whole streams back."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import nats
from nats.aio.client import Client
from nats.js import api as js_api

from aos_contracts import GoalSubmitted, encode_event, event_headers
from aos_contracts.subjects import goal_subject, stream_name, stream_subjects

TERMINAL = {"run.completed", "run.failed", "run.cancelled"}


@asynccontextmanager
async def connected(url: str) -> AsyncIterator[Client]:
    nc = await nats.connect(url)
    try:
        yield nc
    finally:
        await nc.drain()


class RunWatcher:
    """Collects the terminal event of every run of a namespace, from a core subscription
    made before any goal is published (so no end can be missed)."""

    def __init__(self, nc: Client, namespace: str) -> None:
        self.nc = nc
        self.namespace = namespace
        self.ends: dict[str, dict[str, Any]] = {}
        self._changed = asyncio.Event()

    async def __aenter__(self) -> RunWatcher:
        self.sub = await self.nc.subscribe(f"{self.namespace}.runs.>", cb=self._on_message)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sub.unsubscribe()

    async def _on_message(self, msg: Any) -> None:
        payload = json.loads(msg.data)
        if payload.get("type") in TERMINAL:
            self.ends[payload["run_id"]] = payload
            self._changed.set()

    async def wait(
        self, run_ids: Iterable[str], within_s: float = 60.0
    ) -> dict[str, dict[str, Any]]:
        wanted = set(run_ids)

        async def all_ended() -> None:
            while not wanted <= set(self.ends):
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(all_ended(), within_s)
        return {run_id: self.ends[run_id] for run_id in wanted}


async def submit_goal(
    nc: Client,
    namespace: str,
    text: str,
    *,
    tenant: str = "acme",
    budget_cents: int = 100,
    inputs: dict[str, Any] | None = None,
    deadline_s: float | None = None,
) -> str:
    goal = GoalSubmitted(
        run_id=uuid.uuid4(),
        tenant=tenant,
        goal=text,
        budget_cents=budget_cents,
        inputs=inputs or {},
        deadline_s=deadline_s,
    )
    await nc.jetstream().publish(
        goal_subject(tenant, goal.run_id, namespace),
        encode_event(goal),
        headers=event_headers(goal),
    )
    return str(goal.run_id)


async def read_stream(nc: Client, namespace: str, context: str) -> list[dict[str, Any]]:
    """Every message of a stream, decoded as JSON, each with its `_seq`."""
    js = nc.jetstream()
    stream = stream_name(context, namespace)
    info = await js.stream_info(stream)
    last = info.state.last_seq
    if info.state.messages == 0:
        return []
    sub = await js.pull_subscribe(
        stream_subjects(context, namespace)[0],
        stream=stream,
        config=js_api.ConsumerConfig(ack_policy=js_api.AckPolicy.NONE, inactive_threshold=10.0),
    )
    out: list[dict[str, Any]] = []
    try:
        while True:
            for msg in await sub.fetch(500, timeout=5.0):
                seq = msg.metadata.sequence.stream
                try:
                    payload = json.loads(msg.data)
                except ValueError:
                    payload = {"_raw": msg.data.decode(errors="replace")}
                if not isinstance(payload, dict):
                    payload = {"_raw": payload}
                payload["_seq"] = seq
                out.append(payload)
                if seq >= last:
                    return out
    finally:
        await sub.unsubscribe()
