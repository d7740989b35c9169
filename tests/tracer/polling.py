"""Waiting for a running tracer to catch up: poll until a condition holds, with a deadline
that only bounds a hang (the assertion is the condition, never the time it took)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def until(
    probe: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    *,
    give_up_after_s: float = 60.0,
    what: str = "condition",
) -> T:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + give_up_after_s
    while True:
        value = await probe()
        if done(value):
            return value
        if loop.time() > deadline:
            raise AssertionError(f"{what} never held; last value: {value!r}"[:2000])
        await asyncio.sleep(0.1)
