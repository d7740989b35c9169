"""A message a consumer could not decode or handle, parked with the reason.

Parked messages are never AOS events themselves (they may be any bytes), so they are
not in the event union; they travel on `aos.parked.<service>` as this model.
"""

from __future__ import annotations

import base64
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from aos_contracts.events import utc_now


class ParkedMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    service: str = Field(description="the consumer that parked it")
    reason: str
    stream: str
    stream_seq: int
    subject: str
    headers: dict[str, str] = Field(default_factory=dict)
    data_b64: str = Field(description="the original bytes, base64")
    num_delivered: int = 1
    parked_at: datetime = Field(default_factory=utc_now)

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
    ) -> ParkedMessage:
        return cls(
            service=service,
            reason=reason,
            stream=stream,
            stream_seq=stream_seq,
            subject=subject,
            headers=headers or {},
            data_b64=base64.b64encode(data).decode(),
            num_delivered=num_delivered,
        )
