"""Test fixtures: real NATS, PostgreSQL and Redis.

With `AOS_NATS_URL`, `AOS_POSTGRES_URL` and `REDIS_URL` set, the tests use those servers
(that is how a user with their own infrastructure runs them). Otherwise a private NATS
(JetStream), PostgreSQL and Redis are started on free loopback ports for the session,
from what `pip` installed. Every test gets its own namespace (subjects, streams, Redis
keys) and its own database, so tests never see each other's data on a shared server.
"""

from __future__ import annotations

import asyncio
import os
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from aos_cli.embedded import EmbeddedInfra, InfraUrls


@pytest.fixture(scope="session")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfraUrls]:
    external = InfraUrls.from_env()
    if external is not None:
        yield external
        return
    embedded = EmbeddedInfra(tmp_path_factory.mktemp("infra"))
    try:
        yield embedded.start()
    finally:
        embedded.stop()


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def database(infra: InfraUrls) -> AsyncIterator[str]:
    """A fresh, empty database on the test PostgreSQL server; dropped afterwards."""
    name = f"aos_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(infra.postgres_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield infra.database_url(name)
    # Dropping with FORCE terminates the services' connections; the admin connection can
    # be caught in that, so try again rather than fail a test that has passed.
    for attempt in range(3):
        try:
            admin = await asyncpg.connect(infra.postgres_url)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await admin.close()
            return
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError):
            if attempt == 2:
                warnings.warn(f"could not drop test database {name}", stacklevel=1)
            await asyncio.sleep(0.5)


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


def pytest_report_header() -> str:
    external = {
        key: os.environ.get(key) for key in ("AOS_NATS_URL", "AOS_POSTGRES_URL", "REDIS_URL")
    }
    if all(external.values()):
        return "aos infra: external " + ", ".join(f"{k}={v}" for k, v in external.items())
    return "aos infra: embedded (private servers on free ports)"


# Folders whose tests run the services as processes.
_E2E_FOLDERS = ("system", "security", "golden")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Markers from what a test uses, not from what its author remembered to write:
    `integration` for every test that needs real servers (the `infra` fixture, directly or
    through another), `e2e` for those that run the services as processes. So
    `pytest -m "not integration"` (make test-unit) is the suite without servers."""
    for item in items:
        if "infra" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
        if any(part in _E2E_FOLDERS for part in item.path.parts[-3:-1]):
            item.add_marker(pytest.mark.e2e)
