"""`aos doctor` against a running system: all ready (exit 0), then a service down (exit 1)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

from aos_contracts.subjects import CONTEXTS, PARKED, stream_name
from tests.system.conftest import System


def doctor(system: System, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "AOS_NATS_URL": system.nats_url,
        "AOS_NAMESPACE": system.namespace,
        **{f"AOS_{s.name.upper()}_URL": s.url for s in system.all},
    }
    return subprocess.run(
        [sys.executable, "-m", "aos_cli", "doctor", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_doctor_reports_every_service_nats_and_the_streams(system: System) -> None:
    report = await asyncio.to_thread(doctor, system, "--json")
    assert report.returncode == 0, report.stdout + report.stderr
    body = json.loads(report.stdout)
    assert body["ok"] is True
    assert body["nats"]["reachable"] is True
    streams = body["nats"]["streams"]
    expected = {stream_name(context, system.namespace) for context in (*CONTEXTS, PARKED)}
    assert set(streams) == expected and all(count is not None for count in streams.values())
    services = {s["name"]: s for s in body["services"]}
    assert set(services) == {"planner", "executor", "ledger", "tracer"}
    for service in services.values():
        assert service["alive"] and service["ready"], service
        assert service["checks"]["nats"] is True
        assert service["backends"]["auth"] == "stub"  # JWT off: said so
    assert services["ledger"]["checks"]["redis"] is True
    text = await asyncio.to_thread(doctor, system)
    assert text.returncode == 0 and text.stdout.rstrip().endswith("all ready")
    assert "backend  planner = stub" in text.stdout

    system.ledger.kill()
    down = await asyncio.to_thread(doctor, system)
    assert down.returncode == 1
    assert "ledger" in down.stdout and "not reachable" in down.stdout
    assert down.stdout.rstrip().endswith("NOT READY")
