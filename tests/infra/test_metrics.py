"""The operational metrics the alert rules and KEDA rely on."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client import REGISTRY

from aos_cli.embedded import InfraUrls
from aos_contracts.subjects import stream_name
from aos_plumbing.bus import EventBus
from aos_plumbing.http import ServiceHttp
from tests.support.bus import connected, submit_goal
from tests.support.processes import free_port

pytestmark = pytest.mark.integration


async def test_consumer_lag_is_the_servers_count_of_undelivered_messages(
    infra: InfraUrls, namespace: str
) -> None:
    bus = await EventBus.connect(infra.nats_url, namespace, "lagtest")
    try:
        await bus.ensure_streams()
        async with connected(infra.nats_url) as nc:
            for _ in range(3):
                await submit_goal(nc, namespace, "summarize")

        async def nothing(deliveries: object) -> None:
            return None

        consumer = bus.consumer("goals", "lagtest", nothing)
        await consumer.prepare()
        await consumer.report_lag()
    finally:
        await bus.close()
    labels = {"service": "lagtest", "consumer": stream_name("goals", namespace)}
    assert REGISTRY.get_sample_value("aos_consumer_pending_messages", labels) == 3
    assert REGISTRY.get_sample_value("aos_consumer_ack_pending_messages", labels) == 0


async def test_metrics_name_each_backend_a_service_runs_on() -> None:
    http = ServiceHttp("metricstest", "127.0.0.1", free_port())
    http.backends = {"planner": "stub"}
    await http.start()
    try:
        async with httpx.AsyncClient() as client:
            body = (await client.get(f"http://127.0.0.1:{http.port}/metrics")).text
    finally:
        await http.stop()
    assert 'aos_backend_info{backend="stub",role="planner",service="metricstest"} 1.0' in body
