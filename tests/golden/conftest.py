"""Golden-file tests: the stub planner's documented goals through the four services."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from aos_cli.embedded import InfraUrls
from tests.support.golden import golden  # noqa: F401  (the fixture, for this folder)
from tests.system.conftest import System, make_system, running


@pytest.fixture
def golden_system(
    infra: InfraUrls, namespace: str, database: str, log_dir: Path
) -> Iterator[System]:
    """The four services as processes, like `system`, with every backend a stub (http_call
    included: golden runs never leave the machine)."""
    services = make_system(
        infra,
        namespace,
        database,
        log_dir,
        {"AOS_HTTP_BACKEND": "stub", "DISABLE_EXTERNAL_CALLS": "true", "ANTHROPIC_API_KEY": ""},
    )
    with running(services):
        yield services
