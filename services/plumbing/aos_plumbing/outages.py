"""Dependency outages: which failures mean "a server we need is down", and how one is
reported.

Why it matters: a consumer parks a message its handler keeps failing on, so that one
poison message cannot stall it. A handler that fails because PostgreSQL, Redis or NATS
is unreachable is not handling a poison message: every message fails the same way until
the server is back. Such failures are waited out with backoff and never count towards
parking (bus.py); a service that can end a run gives up on it only after
`AOS_OUTAGE_GIVE_UP_S` of outage (settings.py).

The classification is by the exception's own type (not its cause chain): a service that
wraps an outage in its own exception means something by it (the planner's
`LedgerUnavailable` has its own retry policy). Services register extra types with
`register_outage`.
"""

from __future__ import annotations

import logging
import time

import asyncpg
import nats.errors
import nats.js.errors
import redis.exceptions

from aos_plumbing import metrics

log = logging.getLogger(__name__)

_OUTAGE_TYPES: set[type[BaseException]] = {
    # Sockets: refused, reset, unreachable; and every timeout waiting on a server.
    OSError,
    TimeoutError,
    # PostgreSQL: class 08 (connection exceptions), the server starting or shutting down,
    # no connection slot free.
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    # Redis: refused, reset, timed out, still loading its data at start.
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    # NATS: disconnected, reconnecting, no JetStream answering.
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.NoServersError,
    nats.errors.NoRespondersError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.ServiceUnavailableError,
}

DEPENDENCY_OUTAGE = metrics.gauge(
    "aos_dependency_outage",
    "1 while a consumer's handler fails because a dependency (PostgreSQL, Redis, NATS) is "
    "down; its messages are redelivered with backoff, never parked for it",
    ("service", "consumer"),
)


def register_outage(*types: type[BaseException]) -> None:
    """Count these exception types (and their subclasses) as outages too."""
    _OUTAGE_TYPES.update(types)


def is_outage(exc: BaseException | None) -> bool:
    """Whether `exc` means a dependency is unreachable, rather than a bad message."""
    if exc is None:
        return False
    # asyncpg's InterfaceError itself says "connection is closed" or "pool is closed";
    # its subclasses (DataError, unsupported features) are the caller's mistakes.
    if type(exc) is asyncpg.InterfaceError:
        return True
    return isinstance(exc, tuple(_OUTAGE_TYPES))


def describe(exc: BaseException) -> str:
    """`TypeName: message`, for logs and park reasons."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class OutageState:
    """Whether one consumer is in an outage, reported once per transition: a warning
    when it starts, one line when it ends, and the `aos_dependency_outage` gauge, instead
    of a traceback per message per retry."""

    def __init__(self, service: str, consumer: str) -> None:
        self.service = service
        self.consumer = consumer
        self.since: float | None = None
        self.waited = 0  # deliveries sent back for the outage while it lasted
        DEPENDENCY_OUTAGE.labels(service, consumer).set(0)

    @property
    def active(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException | None, deliveries: int = 1) -> None:
        self.waited += deliveries
        if self.since is not None:
            return
        self.since = time.monotonic()
        DEPENDENCY_OUTAGE.labels(self.service, self.consumer).set(1)
        log.warning(
            "%s: a dependency is unreachable (%s); messages are redelivered with backoff "
            "until it is back, and none is parked for it",
            self.consumer,
            describe(exc) if exc is not None else "outage",
        )

    def recovered(self) -> None:
        if self.since is None:
            return
        log.warning(
            "%s: dependency back after %.1f s (%d deliveries waited)",
            self.consumer,
            time.monotonic() - self.since,
            self.waited,
        )
        self.since, self.waited = None, 0
        DEPENDENCY_OUTAGE.labels(self.service, self.consumer).set(0)
