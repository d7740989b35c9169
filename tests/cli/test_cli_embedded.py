"""EmbeddedInfra starts a private NATS (JetStream), PostgreSQL and Redis that answer, and
stops every process it started."""

from __future__ import annotations

import os
from pathlib import Path

import asyncpg
import nats
import pytest
import redis

from aos_cli.embedded import EmbeddedInfra, InfraUrls

pytestmark = pytest.mark.integration

STANDARD_PORTS = {4222, 5432, 6379}


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


async def test_embedded_servers_answer_and_stop(tmp_path: Path) -> None:
    infra = EmbeddedInfra(tmp_path / "data")
    try:
        urls = infra.start()
        pids = [child.pid for child in infra.children]
        assert len(pids) == 3

        assert not {_port(urls.nats_url), _port(urls.postgres_url), _port(urls.redis_url)} & (
            STANDARD_PORTS
        )

        nc = await nats.connect(urls.nats_url)
        try:
            info = await nc.jetstream().account_info()
            assert info.limits is not None
        finally:
            await nc.close()

        conn = await asyncpg.connect(urls.postgres_url)
        try:
            assert await conn.fetchval("SELECT 1") == 1
            await conn.execute('CREATE DATABASE "aos_embedded_check"')
        finally:
            await conn.close()
        conn = await asyncpg.connect(urls.database_url("aos_embedded_check"))
        try:
            assert await conn.fetchval("SELECT current_database()") == "aos_embedded_check"
        finally:
            await conn.close()

        client = redis.Redis.from_url(urls.redis_url)
        try:
            assert client.ping() is True
        finally:
            client.close()

        logs = {path.name for path in (tmp_path / "data" / "logs").iterdir()}
        assert {"nats.log", "postgres.log", "redis.log"} <= logs
    finally:
        infra.stop()

    for pid in pids:
        assert pid is not None
        assert not _alive(pid), f"process {pid} still running after stop()"
    assert infra.children == []


def test_stop_is_safe_before_start(tmp_path: Path) -> None:
    EmbeddedInfra(tmp_path).stop()


def test_a_failing_start_stops_what_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    infra = EmbeddedInfra(tmp_path)
    started: list[int | None] = []

    def broken_redis() -> str:
        started.extend(child.pid for child in infra.children)
        raise RuntimeError("redis would not start")

    monkeypatch.setattr(infra, "_start_redis", broken_redis)
    with pytest.raises(RuntimeError, match="redis would not start"):
        infra.start()
    assert len(started) == 2  # NATS and PostgreSQL were up
    for pid in started:
        assert pid is not None
        assert not _alive(pid)


def _alive(pid: int) -> bool:
    """Running and not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    if state == "Z":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    ("admin", "expected"),
    [
        (
            "postgresql://postgres@127.0.0.1:5555/postgres",
            "postgresql://postgres@127.0.0.1:5555/aos_tracer",
        ),
        (
            "postgresql://user:secret@db.example:5432/admin?sslmode=require",
            "postgresql://user:secret@db.example:5432/aos_tracer?sslmode=require",
        ),
        (
            "postgresql://postgres:@/postgres?host=/tmp/pg dir",
            "postgresql://postgres:@/aos_tracer?host=/tmp/pg dir",
        ),
        ("postgres://h:1", "postgres://h:1/aos_tracer"),
    ],
)
def test_database_url_keeps_server_and_options(admin: str, expected: str) -> None:
    urls = InfraUrls(nats_url="nats://x:1", postgres_url=admin, redis_url="redis://x:1")
    assert urls.database_url("aos_tracer") == expected


def test_from_env_needs_all_three_urls() -> None:
    full = {
        "AOS_NATS_URL": "nats://n:1",
        "AOS_POSTGRES_URL": "postgresql://p:2/postgres",
        "REDIS_URL": "redis://r:3/0",
    }
    assert InfraUrls.from_env(full) == InfraUrls(
        "nats://n:1", "postgresql://p:2/postgres", "redis://r:3/0"
    )
    for missing in full:
        partial = {key: value for key, value in full.items() if key != missing}
        assert InfraUrls.from_env(partial) is None
    assert InfraUrls.from_env({**full, "REDIS_URL": " "}) is None
