"""Prometheus metrics shared by every service (each adds its own beside these).

`PROMETHEUS_AVAILABLE` unset means: use prometheus-client when it is installed. The
no-op fallback exists only for installs without the client; it records nothing.
"""

from __future__ import annotations

import os
from typing import Any

try:
    import prometheus_client

    _INSTALLED = True
except ImportError:  # pragma: no cover - the client is a dependency; this is the escape hatch
    _INSTALLED = False

_flag = os.environ.get("PROMETHEUS_AVAILABLE", "").strip().lower()
ENABLED = _INSTALLED and _flag not in {"0", "false", "no"}


class _NoOpMetric:
    def labels(self, *args: Any, **kwargs: Any) -> _NoOpMetric:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
    return prometheus_client.Counter(name, doc, labels) if ENABLED else _NoOpMetric()


def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
    return prometheus_client.Gauge(name, doc, labels) if ENABLED else _NoOpMetric()


def histogram(
    name: str, doc: str, labels: tuple[str, ...] = (), buckets: tuple[float, ...] | None = None
) -> Any:
    if not ENABLED:
        return _NoOpMetric()
    if buckets is None:
        return prometheus_client.Histogram(name, doc, labels)
    return prometheus_client.Histogram(name, doc, labels, buckets=buckets)


def render() -> tuple[bytes, str]:
    if not ENABLED:
        return b"# prometheus-client disabled (PROMETHEUS_AVAILABLE=false)\n", "text/plain"
    return prometheus_client.generate_latest(), prometheus_client.CONTENT_TYPE_LATEST


EVENTS_CONSUMED = counter(
    "aos_events_consumed_total", "events taken from the log", ("service", "context")
)
PARKED = counter(
    "aos_parked_messages_total",
    "messages parked as undecodable or unhandleable",
    ("service", "stream"),
)
CONSUMER_PENDING = gauge(
    "aos_consumer_pending_messages",
    "JetStream consumer lag: messages in the stream not yet delivered to the consumer",
    ("service", "consumer"),
)
CONSUMER_ACK_PENDING = gauge(
    "aos_consumer_ack_pending_messages",
    "messages delivered to the consumer and not yet acknowledged",
    ("service", "consumer"),
)
BACKEND_INFO = gauge(
    "aos_backend_info",
    "1 for each backend a service runs on (e.g. role=planner, backend=stub)",
    ("service", "role", "backend"),
)
