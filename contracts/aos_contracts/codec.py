"""Bytes <-> events, with upcasting of old schema versions on the way in."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from aos_contracts.events import EVENT_ADAPTER, EVENT_TYPES, AnyEvent, EventEnvelope

HEADER_EVENT_TYPE = "Aos-Event-Type"
HEADER_MSG_ID = "Nats-Msg-Id"

RawEvent = dict[str, Any]
Upcaster = Callable[[RawEvent], RawEvent]


class EventDecodeError(ValueError):
    """Bytes that are not a valid AOS event; the message says why."""


class Upcasters:
    """Upcasters turn a payload of `schema_version` N into N+1, one step at a time, so that
    a consumer only ever handles the current model of each event type."""

    def __init__(self) -> None:
        self._steps: dict[tuple[str, int], Upcaster] = {}

    def register(self, event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        def decorator(step: Upcaster) -> Upcaster:
            self._steps[(event_type, from_version)] = step
            return step

        return decorator

    def upcast(self, raw: RawEvent) -> RawEvent:
        event_type = raw.get("type")
        model = EVENT_TYPES.get(event_type) if isinstance(event_type, str) else None
        if model is None:
            return raw  # validation reports the unknown type
        current = model.model_fields["schema_version"].default
        version = raw.get("schema_version", 1)
        while isinstance(version, int) and version < current:
            step = self._steps.get((str(event_type), version))
            if step is None:
                raise EventDecodeError(
                    f"{event_type} schema_version {version} has no upcaster to {version + 1}"
                )
            raw = step(dict(raw))
            version += 1
            raw["schema_version"] = version
        return raw


# The upcasters of released versions. Empty while every event is at version 1.
UPCASTERS = Upcasters()


def decode_event(data: bytes, upcasters: Upcasters = UPCASTERS) -> AnyEvent:
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EventDecodeError(f"not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise EventDecodeError(f"expected a JSON object, got {type(raw).__name__}")
    raw = upcasters.upcast(raw)
    try:
        return EVENT_ADAPTER.validate_python(raw)
    except ValidationError as exc:
        raise EventDecodeError(_describe(exc)) from exc


def encode_event(event: EventEnvelope) -> bytes:
    return event.model_dump_json().encode()


def event_headers(event: EventEnvelope) -> dict[str, str]:
    headers = {HEADER_MSG_ID: str(event.event_id), HEADER_EVENT_TYPE: event.type}
    if event.trace.traceparent:
        headers["traceparent"] = event.trace.traceparent
    return headers


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        location = ".".join(str(item) for item in error["loc"]) or "event"
        parts.append(f"{location}: {error['msg']}")
    more = exc.error_count() - 5
    if more > 0:
        parts.append(f"... and {more} more")
    return "invalid event: " + "; ".join(parts)
