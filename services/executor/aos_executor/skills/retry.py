"""Retries inside a skill: exponential backoff with full jitter, honouring Retry-After."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class RetryPolicy:
    """`max_retries` calls after the first. Without a Retry-After the n-th retry waits a
    random time in [0, min(cap_s, base_s * 2**n)] (full jitter, so many callers backing off
    from one host do not come back in step). A Retry-After is honoured as given, unless it
    asks for more than `max_retry_after_s`: then the skill gives up at once and the
    executor's step-level retry (or the user) decides later."""

    max_retries: int = 2
    base_s: float = 0.25
    cap_s: float = 8.0
    max_retry_after_s: float = 30.0
    sleep: Sleep = field(default=asyncio.sleep, compare=False)
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def delay(self, retry: int, retry_after: float | None) -> float | None:
        """Seconds to wait before retry number `retry` (0-based); None: do not retry."""
        if retry >= self.max_retries:
            return None
        if retry_after is not None:
            return retry_after if retry_after <= self.max_retry_after_s else None
        return self.rng.uniform(0, min(self.cap_s, self.base_s * 2**retry))


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date; None if absent or garbled."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
