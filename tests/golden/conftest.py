"""Golden-file tests: the stub planner's documented goals through the four services."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from aos_cli.embedded import InfraUrls
from tests.support.golden import golden  # noqa: F401  (the fixture, for this folder)
from tests.support.processes import ServiceProcess
from tests.system.conftest import System


@pytest.fixture
def golden_system(
    infra: InfraUrls, namespace: str, database: str, log_dir: Path
) -> Iterator[System]:
    """The four services as processes, like `system`, with every backend a stub (http_call
    included: golden runs never leave the machine)."""
    common = {
        "AOS_NATS_URL": infra.nats_url,
        "AOS_NAMESPACE": namespace,
        "AOS_ACK_WAIT_S": "5",
        "PLANNER_BACKEND": "stub",
        "AOS_HTTP_BACKEND": "stub",
        "DISABLE_EXTERNAL_CALLS": "true",
        "ANTHROPIC_API_KEY": "",
    }
    services = System(
        planner=ServiceProcess("planner", common, log_dir),
        executor=ServiceProcess(
            "executor",
            {**common, "AOS_RETRY_BACKOFF_S": "0.05", "AOS_EXECUTOR_DATABASE_URL": database},
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
    try:
        for service in services.all:
            service.start()
        yield services
    finally:
        for service in services.all:
            service.stop()
