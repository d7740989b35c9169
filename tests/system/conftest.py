"""The four services as real processes on real infrastructure."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from aos_cli.embedded import InfraUrls
from tests.support.processes import ServiceProcess


@dataclass
class System:
    planner: ServiceProcess
    executor: ServiceProcess
    ledger: ServiceProcess
    tracer: ServiceProcess
    nats_url: str
    namespace: str

    @property
    def all(self) -> list[ServiceProcess]:
        return [self.ledger, self.tracer, self.executor, self.planner]


def aos(system: System, *args: str, bearer: str | None = None) -> subprocess.CompletedProcess[str]:
    """The `aos` command against `system`, with `bearer` (and no other) as its token."""
    env = {
        **os.environ,
        "AOS_NATS_URL": system.nats_url,
        "AOS_NAMESPACE": system.namespace,
        "AOS_TRACER_URL": system.tracer.url,
    }
    env.pop("AOS_TOKEN", None)
    if bearer:
        env["AOS_TOKEN"] = bearer
    return subprocess.run(
        [sys.executable, "-m", "aos_cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def make_system(
    infra: InfraUrls,
    namespace: str,
    database: str,
    log_dir: Path,
    extra_env: dict[str, str] | None = None,
) -> System:
    """The four services of one test, not yet started: their shared settings plus
    `extra_env` (flags a test turns on for every service)."""
    common = {
        "AOS_NATS_URL": infra.nats_url,
        "AOS_NAMESPACE": namespace,
        "AOS_LOG_LEVEL": "INFO",
        "PLANNER_BACKEND": "stub",
        **(extra_env or {}),
    }
    return System(
        planner=ServiceProcess(
            "planner",
            # The planner's decisions share the test database too (tables planner_*).
            {**common, "AOS_PLANNER_DATABASE_URL": database},
            log_dir,
        ),
        executor=ServiceProcess(
            "executor",
            {
                **common,
                "AOS_RETRY_BACKOFF_S": "0.05",
                # The executor's tables share the test database with the tracer's.
                "AOS_EXECUTOR_DATABASE_URL": database,
                "AOS_CHECKPOINT_INTERVAL_S": "1",
                # Idempotency claims and the active-executor lease, namespaced per test.
                "REDIS_URL": infra.redis_url,
                "AOS_EXECUTOR_LEASE_TTL_S": "3",
            },
            log_dir,
        ),
        ledger=ServiceProcess("ledger", {**common, "REDIS_URL": infra.redis_url}, log_dir),
        tracer=ServiceProcess(
            "tracer",
            {**common, "AOS_TRACER_DATABASE_URL": database, "USE_POSTGRES_TRACES": "true"},
            log_dir,
        ),
        nats_url=infra.nats_url,
        namespace=namespace,
    )


@contextmanager
def running(services: System) -> Iterator[System]:
    """The services started, and stopped however the block ends."""
    try:
        for service in services.all:
            service.start()
        yield services
    finally:
        for service in services.all:
            service.stop()


@pytest.fixture
def system(infra: InfraUrls, namespace: str, database: str, log_dir: Path) -> Iterator[System]:
    with running(make_system(infra, namespace, database, log_dir)) as services:
        yield services
