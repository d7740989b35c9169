"""One alert, for real: a service parks a message, a real Prometheus scraping that service
evaluates the real rules of infra/prometheus/, a real Alertmanager routes the alert, and
it arrives at a webhook receiver on loopback.

Only the intervals differ from production (1 s scrapes and evaluations, no group wait),
so the test waits seconds rather than minutes.
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from aos_cli.embedded import InfraUrls
from aos_contracts.subjects import goal_subject, stream_name
from tests.infra.tools import INFRA, tool
from tests.support.bus import connected
from tests.support.processes import ServiceProcess, free_port

pytestmark = pytest.mark.integration

RULES = INFRA / "prometheus" / "rules" / "aos.rules.yml"


@dataclass
class Webhook:
    """An Alertmanager webhook receiver: collects every alert posted to it."""

    port: int = field(default_factory=free_port)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.alerts.extend(body.get("alerts", []))
        self.arrived.set()
        return web.Response(text="ok")


@pytest.fixture
async def webhook() -> AsyncIterator[Webhook]:
    hook = Webhook()
    app = web.Application()
    app.router.add_post("/alerts", hook.receive)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", hook.port).start()
    try:
        yield hook
    finally:
        await runner.cleanup()


@pytest.fixture
def planner(infra: InfraUrls, namespace: str, log_dir: Path) -> Iterator[ServiceProcess]:
    env = {"AOS_NATS_URL": infra.nats_url, "AOS_NAMESPACE": namespace}
    service = ServiceProcess("planner", env, log_dir).start()
    try:
        yield service
    finally:
        service.stop()


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture
def alertmanager(tmp_path: Path, webhook: Webhook) -> Iterator[str]:
    binary = tool("prometheus-alertmanager")
    config = tmp_path / "alertmanager.yml"
    config.write_text(
        f"""
route:
  receiver: webhook
  group_by: [alertname]
  group_wait: 0s
  group_interval: 1s
receivers:
  - name: webhook
    webhook_configs:
      - url: http://127.0.0.1:{webhook.port}/alerts
"""
    )
    port = free_port()
    proc = _start(
        [
            binary,
            f"--config.file={config}",
            f"--storage.path={tmp_path / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",  # one instance: no gossip port
        ],
        tmp_path / "alertmanager.log",
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def prometheus(tmp_path: Path, planner: ServiceProcess, alertmanager: str) -> Iterator[str]:
    binary = tool("prometheus")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["{RULES}"]
alerting:
  alertmanagers:
    - static_configs: [{{targets: ["{alertmanager}"]}}]
scrape_configs:
  - job_name: aos-planner
    static_configs: [{{targets: ["127.0.0.1:{planner.port}"]}}]
"""
    )
    port = free_port()
    proc = _start(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'prom-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        tmp_path / "prometheus.log",
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


async def _query(client: httpx.AsyncClient, expr: str) -> list[dict[str, Any]]:
    try:
        response = await client.get("/api/v1/query", params={"query": expr})
    except httpx.HTTPError:
        return []  # not listening yet
    if response.status_code != 200:
        return []
    result: list[dict[str, Any]] = response.json()["data"]["result"]
    return result


async def test_a_parked_message_raises_an_alert_that_reaches_the_webhook(
    namespace: str, infra: InfraUrls, planner: ServiceProcess, prometheus: str, webhook: Webhook
) -> None:
    goals = stream_name("goals", namespace)
    parked = f'aos_parked_messages_total{{job="aos-planner", stream="{goals}"}}'
    async with httpx.AsyncClient(base_url=prometheus, timeout=5.0) as client:
        # Prometheus must have seen the counter at 0 first: the alert is on its increase.
        async def scraped(value: str) -> None:
            while True:
                if any(s["value"][1] == value for s in await _query(client, parked)):
                    return
                await asyncio.sleep(0.5)

        await asyncio.wait_for(scraped("0"), 60)
        async with connected(infra.nats_url) as nc:
            await nc.jetstream().publish(
                goal_subject("acme", uuid.uuid4(), namespace), b"this is not an event"
            )
        await asyncio.wait_for(scraped("1"), 60)

    async def alert_arrived() -> dict[str, Any]:
        while True:
            for alert in webhook.alerts:
                if alert["labels"].get("alertname") == "AosMessagesParked":
                    return alert
            webhook.arrived.clear()
            await webhook.arrived.wait()

    alert = await asyncio.wait_for(alert_arrived(), 60)
    assert alert["status"] == "firing"
    assert alert["labels"]["service"] == "planner"
    assert alert["labels"]["stream"] == goals
    assert alert["labels"]["severity"] == "ticket"
    assert alert["annotations"]["summary"] == f"planner parked messages from {goals}"
