"""`aos doctor`: is the whole system up? Every service's /healthz and /readyz (each check
and the backends it runs on), NATS and the event log's streams.

Exit 0 when everything answers and is ready, 1 otherwise (a service down, not ready,
not configured; NATS unreachable; a stream missing), so scripts and CI can gate on it.
A dependency only some work needs that does not answer (Claude) is shown as degraded,
with why, and does not fail the check: the work that does not need it goes on.
Parked messages (the parked stream holds only those nobody has replayed or dropped yet)
are a warning, and exit 1 too: each is work that stopped and waits for an operator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import nats
from nats.js.errors import NotFoundError

from aos_cli.client import redact
from aos_cli.config import load_config
from aos_contracts.subjects import CONTEXTS, PARKED, stream_name

SERVICES = ("planner", "executor", "ledger", "tracer")


@dataclass
class ServiceReport:
    name: str
    url: str | None
    reachable: bool = False
    alive: bool = False
    ready: bool = False
    checks: dict[str, Any] = field(default_factory=dict)
    backends: dict[str, Any] = field(default_factory=dict)
    degraded: dict[str, str] = field(default_factory=dict)  # advisory -> what is wrong
    problem: str | None = None


@dataclass
class NatsReport:
    url: str | None
    reachable: bool = False
    streams: dict[str, int | None] = field(default_factory=dict)  # name -> messages; None: missing
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.reachable and all(count is not None for count in self.streams.values())


def check_service(name: str, url: str | None) -> ServiceReport:
    report = ServiceReport(name, url)
    if not url:
        report.problem = f"no URL (set AOS_{name.upper()}_URL or run `aos up`)"
        return report
    base = url.rstrip("/")
    try:
        health = httpx.get(f"{base}/healthz", timeout=3.0)
        report.alive = health.status_code == 200 and bool(health.json().get("alive"))
        ready = httpx.get(f"{base}/readyz", timeout=5.0)
        body = ready.json()
    except (httpx.HTTPError, ValueError) as exc:
        report.problem = f"not reachable ({type(exc).__name__})"
        return report
    if not isinstance(body, dict):
        report.problem = "/readyz did not answer a JSON object"
        return report
    report.reachable = True
    report.ready = ready.status_code == 200 and bool(body.get("ready"))
    report.checks = dict(body.get("checks") or {})
    report.backends = dict(body.get("backends") or {})
    report.degraded = {str(k): str(v) for k, v in dict(body.get("degraded") or {}).items()}
    if not report.alive:
        report.problem = "not alive (/healthz)"
    elif not report.ready:
        failing = [k for k, v in report.checks.items() if v is False]
        report.problem = "not ready: " + (", ".join(failing) or "see /readyz")
    return report


async def check_nats(url: str | None, namespace: str) -> NatsReport:
    report = NatsReport(url)
    if not url:
        report.problem = "no NATS URL (set AOS_NATS_URL or run `aos up`)"
        return report

    async def quiet(exc: Exception) -> None:
        """nats-py logs every failed attempt; the report says it once."""

    try:
        nc = await asyncio.wait_for(
            nats.connect(
                url, connect_timeout=2, allow_reconnect=False, max_reconnect_attempts=1,
                error_cb=quiet,
            ),
            timeout=5,
        )  # fmt: skip
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        report.problem = f"not reachable ({type(exc).__name__})"
        return report
    report.reachable = True
    try:
        js = nc.jetstream()
        for context in (*CONTEXTS, PARKED):
            name = stream_name(context, namespace)
            try:
                info = await js.stream_info(name)
                report.streams[name] = int(info.state.messages)
            except (NotFoundError, nats.errors.Error, TimeoutError):
                report.streams[name] = None
        missing = [name for name, count in report.streams.items() if count is None]
        if missing:
            report.problem = "missing streams: " + ", ".join(missing)
    finally:
        await nc.close()
    return report


def run_doctor(args: argparse.Namespace) -> int:
    config = load_config(args.data_dir)
    services = [check_service(name, config.service_urls.get(name)) for name in SERVICES]
    bus = asyncio.run(check_nats(config.nats_url, config.namespace))
    healthy = bus.ok and all(s.alive and s.ready for s in services)
    parked = bus.streams.get(stream_name(PARKED, config.namespace)) or 0
    warnings = (
        [f"{parked} parked message{'s' if parked != 1 else ''} (see `aos parked list`)"]
        if parked
        else []
    )
    exit_code = 0 if healthy and not warnings else 1
    if args.json:
        print(
            json.dumps(
                {
                    "ok": healthy,
                    "parked": parked,
                    "warnings": warnings,
                    "nats": {**asdict(bus), "url": redact(bus.url) if bus.url else None},
                    "services": [asdict(s) for s in services],
                }
            )
        )
        return exit_code
    nats_url = redact(bus.url) if bus.url else "-"
    print(f"NATS {nats_url}: {'ok' if bus.ok else bus.problem}")
    for name, count in bus.streams.items():
        print(f"  stream {name:<24} {'MISSING' if count is None else f'{count} messages'}")
    for service in services:
        verdict = "ok" if service.alive and service.ready else service.problem
        if verdict == "ok" and service.degraded:
            verdict = "ok, degraded"
        print(f"{service.name} {service.url or '-'}: {verdict}")
        if service.reachable:
            print(f"  healthz  {'alive' if service.alive else 'NOT ALIVE'}")
            checks = ", ".join(
                f"{key}={'ok' if value is True else value}" for key, value in service.checks.items()
            )
            print(
                f"  readyz   {'ready' if service.ready else 'NOT READY'} ({checks or 'no checks'})"
            )
        for key, value in sorted(service.degraded.items()):
            print(f"  degraded {key}: {value}")
        for key, value in sorted(service.backends.items()):
            print(f"  backend  {key} = {value}")
    degraded = [f"{s.name} {key}" for s in services for key in sorted(s.degraded)]
    suffix = f" (degraded: {', '.join(degraded)})" if degraded else ""
    for warning in warnings:
        print(f"WARNING: {warning}")
    status = "all ready" if healthy else "NOT READY"
    print(status + (", with warnings" if warnings else "") + suffix)
    return exit_code
