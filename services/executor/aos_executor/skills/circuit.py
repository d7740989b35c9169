"""Circuit breakers: stop calling a host (or a provider) that keeps failing.

closed --(failure_threshold consecutive failures)--> open --(cooldown_s)--> half_open
half_open lets one probe through: success closes the circuit, failure opens it again.
Only failures that say the other side is unwell count (5xx, overloaded, timeouts,
refused connections); a 4xx or a 429 is an answer from a healthy server.

Each breaker's state is the gauge `aos_circuit_breaker_state{breaker}` (0 closed,
1 half-open, 2 open); its changes count in `aos_circuit_breaker_transitions_total`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from aos_contracts.events import StepTelemetry
from aos_plumbing import metrics

CircuitState = Literal["closed", "open", "half_open"]
STATE_VALUE: dict[CircuitState, int] = {"closed": 0, "half_open": 1, "open": 2}

# infra/prometheus alert rules read these: `breaker` label, 2 = open.
CIRCUIT_STATE = metrics.gauge(
    "aos_circuit_breaker_state",
    "circuit breaker per host or provider: 0 closed, 1 half-open, 2 open",
    ("breaker",),
)
CIRCUIT_TRANSITIONS = metrics.counter(
    "aos_circuit_breaker_transitions_total",
    "circuit breaker state changes",
    ("breaker", "to"),
)

Clock = Callable[[], float]


@dataclass
class CircuitBreaker:
    key: str
    failure_threshold: int = 5
    cooldown_s: float = 30.0
    clock: Clock = time.monotonic
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False
    _reported: CircuitState | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._report()

    @property
    def state(self) -> CircuitState:
        if self.opened_at is None:
            return "closed"
        if self.clock() - self.opened_at >= self.cooldown_s:
            return "half_open"
        return "open"

    def allow(self) -> bool:
        """Whether a call may go out now. In half-open, only one probe at a time."""
        state = self.state
        self._report()
        if state == "closed":
            return True
        if state == "half_open" and not self.probing:
            self.probing = True
            return True
        return False

    def record_success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.probing = False
        self._report()

    def record_failure(self) -> None:
        self.failures += 1
        if self.probing or self.failures >= self.failure_threshold:
            self.opened_at = self.clock()
        self.probing = False
        self._report()

    def release(self) -> None:
        """The call ended without a verdict on the host's health (it was cancelled or
        timed out from outside): let the next probe through."""
        self.probing = False

    def _report(self) -> None:
        state = self.state
        if state != self._reported:
            CIRCUIT_STATE.labels(self.key).set(STATE_VALUE[state])
            if self._reported is not None:
                CIRCUIT_TRANSITIONS.labels(self.key, state).inc()
            self._reported = state


@dataclass
class CircuitBreakers:
    """One breaker per key, created on first use, shared by every call in the process."""

    failure_threshold: int = 5
    cooldown_s: float = 30.0
    clock: Clock = time.monotonic
    breakers: dict[str, CircuitBreaker] = field(default_factory=dict)

    def get(self, key: str) -> CircuitBreaker:
        breaker = self.breakers.get(key)
        if breaker is None:
            breaker = self.breakers[key] = CircuitBreaker(
                key, self.failure_threshold, self.cooldown_s, self.clock
            )
        return breaker


def attempt_telemetry(
    backend: str, breaker: CircuitBreaker, calls: int, delays: list[float], **details: Any
) -> StepTelemetry:
    """What one attempt of a skill did through its breaker, for the step's event: calls,
    the retries among them and their delays, the breaker's state after; plus what only
    that skill knows (`details`: status code, size, model)."""
    return StepTelemetry(
        backend=backend,
        calls=calls,
        retries=max(0, calls - 1),
        retry_delays_s=list(delays),
        circuit=breaker.key,
        circuit_state=breaker.state,
        **details,
    )
