"""Run AOS services as real processes in tests: start, wait until ready, SIGKILL, restart."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

_BACKEND_FLAGS = frozenset(
    {
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_BASE_URL",
        "PLANNER_BACKEND",
        "DISABLE_EXTERNAL_CALLS",
        "AOS_HTTP_ALLOW_HOSTS",
        "AOS_HTTP_BACKEND",
        "RBAC_ENFORCE",
        "JWT_VERIFY_SIGNATURE",
    }
)


class PortTaken(Exception):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServiceProcess:
    """One service (`planner`, `executor`, `ledger`, `tracer`) as a child process."""

    name: str
    env: dict[str, str]
    log_dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def start(self, timeout: float = 30.0) -> ServiceProcess:
        # A free port can be taken by another process between choosing and binding it;
        # the service then exits at once, and it is started again on another port.
        for _ in range(3):
            self._spawn()
            try:
                self.wait_ready(timeout)
                return self
            except PortTaken:
                self.port = free_port()
        raise RuntimeError(f"{self.name}: no free port after 3 tries:\n{self.tail()}")

    def _spawn(self) -> None:
        env = {
            # The developer's shell must not decide what a test runs on: no real Claude
            # key, no external-call policy, no planner backend leak into a service.
            **{k: v for k, v in os.environ.items() if k not in _BACKEND_FLAGS},
            # A killed consumer's unacknowledged batch comes back after this long; tests
            # that kill services should not wait the production default of 30 s.
            "AOS_ACK_WAIT_S": "5",
            **self.env,
            "AOS_HTTP_HOST": "127.0.0.1",
            "AOS_HTTP_PORT": str(self.port),
        }
        self.starts += 1
        log = self.log_path.open("ab")
        log.write(f"\n--- start {self.starts} (port {self.port}) ---\n".encode())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"aos_{self.name}"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                tail = self.tail()
                if "address already in use" in tail.lower():
                    raise PortTaken(self.port)
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{tail}")
            try:
                response = httpx.get(f"{self.url}/readyz", timeout=1.0)
                # Another process on this port would answer too: only our service counts.
                if response.status_code == 200 and response.json().get("service") == self.name:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready after {timeout}s:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL: no chance to finish, ack or flush anything."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
