"""The four services as child processes: environment, ports, readiness, shutdown.

Services are started as `python -m aos_<name>` (never imported: the CLI depends on no
service package), each on a free loopback HTTP port, logging to `<data_dir>/logs/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import nats
from redis.asyncio import Redis

from aos_cli.embedded import EmbeddedInfra, InfraUrls
from aos_cli.processes import ChildProcess, StartError, free_port, stop_all

SERVICES: tuple[str, ...] = ("planner", "executor", "ledger", "tracer")

# A service stops fetching, finishes the batch in hand and drains its NATS connection on
# SIGTERM; this is how long it may take before it is killed.
STOP_GRACE_S = 15.0


# The services that own a PostgreSQL database (each its own: no service reads another's).
DATABASE_OWNERS: tuple[str, ...] = ("planner", "executor", "tracer")


def database_name(namespace: str, owner: str) -> str:
    """`aos_tracer` in a normal deployment; `<namespace>_tracer` when several stacks
    (tests, benchmarks) share one PostgreSQL server and must not see each other's rows."""
    return f"{namespace}_{owner}"


async def remove_namespace(urls: InfraUrls, namespace: str) -> None:
    """Leave nothing of a namespace on servers that outlive it (a benchmark's, a test's):
    its services' databases, its streams, its Redis keys."""
    admin = await asyncpg.connect(urls.postgres_url)
    try:
        for owner in DATABASE_OWNERS:
            name = database_name(namespace, owner)
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
    nc = await nats.connect(urls.nats_url)
    try:
        js = nc.jetstream()
        for stream in await js.streams_info():
            if stream.config.name and stream.config.name.startswith(f"{namespace.upper()}_"):
                await js.delete_stream(stream.config.name)
    finally:
        await nc.close()
    client = Redis.from_url(urls.redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{namespace}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def ensure_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            # Another stack starting at the same moment may win the race to create it.
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


@dataclass
class ServiceProcess:
    name: str
    child: ChildProcess
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False


@dataclass
class Stack:
    """The running services of one `aos up` (or one benchmark)."""

    infra: InfraUrls
    namespace: str
    data_dir: Path
    services: dict[str, ServiceProcess] = field(default_factory=dict)

    @property
    def urls(self) -> dict[str, str]:
        return {name: service.url for name, service in self.services.items()}

    def service_env(self, name: str, port: int, base: Mapping[str, str]) -> dict[str, str]:
        env = dict(base)
        env.update(
            {
                "AOS_NATS_URL": self.infra.nats_url,
                "AOS_NAMESPACE": self.namespace,
                "AOS_HTTP_HOST": "127.0.0.1",
                "AOS_HTTP_PORT": str(port),
                # Services log to a file; Python must not hold lines back in a buffer.
                "PYTHONUNBUFFERED": "1",
            }
        )
        if name == "planner":
            env.setdefault("PLANNER_BACKEND", "stub")
            env["AOS_PLANNER_DATABASE_URL"] = self.infra.database_url(
                database_name(self.namespace, "planner")
            )
        if name in ("executor", "ledger"):
            env["REDIS_URL"] = self.infra.redis_url
        if name == "executor":
            env["AOS_EXECUTOR_DATABASE_URL"] = self.infra.database_url(
                database_name(self.namespace, "executor")
            )
        if name == "tracer":
            env["AOS_TRACER_DATABASE_URL"] = self.infra.database_url(
                database_name(self.namespace, "tracer")
            )
            env.setdefault("USE_POSTGRES_TRACES", "true")
        return env

    def start(self, *, timeout: float = 60.0, base_env: Mapping[str, str] | None = None) -> None:
        """Start all four, wait until every one is ready; on any failure stop them all."""
        base = dict(os.environ if base_env is None else base_env)
        try:
            asyncio.run(self._create_databases())
        except (OSError, asyncpg.PostgresError) as exc:
            raise StartError(f"cannot prepare databases on PostgreSQL: {exc}") from exc
        log_dir = self.data_dir / "logs"
        try:
            for name in SERVICES:
                port = free_port()
                child = ChildProcess(
                    name,
                    [sys.executable, "-m", f"aos_{name}"],
                    log_dir / f"{name}.log",
                    env=self.service_env(name, port, base),
                )
                self.services[name] = ServiceProcess(name, child, port)
                child.start()
            # Started together, waited for together: start-up costs the slowest one.
            for service in self.services.values():
                service.child.wait_until(service.ready, timeout)
        except BaseException:
            self.stop()
            raise

    async def _create_databases(self) -> None:
        for owner in DATABASE_OWNERS:
            await ensure_database(self.infra.postgres_url, database_name(self.namespace, owner))

    def stop(self) -> None:
        stop_all((service.child for service in self.services.values()), grace=STOP_GRACE_S)

    def dead(self) -> list[str]:
        """Services that exited on their own since they were started."""
        return [name for name, service in self.services.items() if not service.child.running()]


@contextlib.contextmanager
def tool_stack(
    namespace: str, data_dir: Path, *, base_env: Mapping[str, str] | None = None
) -> Iterator[Stack]:
    """The four services on `namespace`, for a tool that drives them (`make bench`,
    `make soak`): on the servers the AOS_* URLs name, else on embedded ones with their data
    under `data_dir`. However the block ends, everything is stopped, and what the
    namespace left on external servers is removed."""
    external = InfraUrls.from_env()
    infra = EmbeddedInfra(data_dir) if external is None else None
    stack: Stack | None = None
    try:
        urls = external or (infra.start() if infra is not None else None)
        assert urls is not None
        stack = Stack(urls, namespace, data_dir)
        stack.start(base_env=base_env)
        yield stack
    finally:
        if stack is not None:
            stack.stop()
        if infra is not None:
            infra.stop()
        if external is not None:
            asyncio.run(remove_namespace(external, namespace))
