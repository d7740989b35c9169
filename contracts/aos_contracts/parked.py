"""A message a consumer could not decode or handle, parked with the reason.

Parked messages are never AOS events themselves (they may be any bytes), so they are
not in the event union; they travel on `aos.parked.<service>` as this model.

A parked copy holds at most `PARKED_DATA_MAX_BYTES` of the original's bytes: a message
near the bus's max payload would not fit once base64-encoded and wrapped, so the park
would fail and the message would be redelivered forever. What is cut is flagged
(`truncated`, `original_size`); the whole message stays in its own stream at
`stream`/`stream_seq`, where a replay reads it (as long as the stream still holds it).
"""

from __future__ import annotations

import base64
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from aos_contracts.events import utc_now

# 64 KiB: enough to read what went wrong; base64 and the envelope stay far below 1 MiB.
PARKED_DATA_MAX_BYTES = 64 * 1024


class ParkedMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    service: str = Field(description="the consumer that parked it")
    reason: str
    stream: str
    stream_seq: int
    subject: str
    headers: dict[str, str] = Field(default_factory=dict)
    data_b64: str = Field(description="the original bytes (a prefix if truncated), base64")
    num_delivered: int = 1
    parked_at: datetime = Field(default_factory=utc_now)
    truncated: bool = Field(
        default=False,
        description="data_b64 holds only the first bytes; the original is in its stream",
    )
    original_size: int | None = Field(default=None, description="the original's size in bytes")

    @property
    def data(self) -> bytes:
        return base64.b64decode(self.data_b64)

    @classmethod
    def of(
        cls,
        *,
        service: str,
        reason: str,
        stream: str,
        stream_seq: int,
        subject: str,
        headers: dict[str, str] | None,
        data: bytes,
        num_delivered: int = 1,
        max_bytes: int = PARKED_DATA_MAX_BYTES,
    ) -> ParkedMessage:
        kept = data[:max_bytes]
        return cls(
            service=service,
            reason=reason,
            stream=stream,
            stream_seq=stream_seq,
            subject=subject,
            headers=headers or {},
            data_b64=base64.b64encode(kept).decode(),
            num_delivered=num_delivered,
            truncated=len(kept) < len(data),
            original_size=len(data),
        )
