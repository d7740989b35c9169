"""Child processes the CLI owns: servers and services, each logging to its own file.

Every child runs in its own session, so a Ctrl-C in the terminal reaches only `aos up`,
which then stops the children in order (services before the NATS they drain into). On
Linux each child also gets a parent-death signal, so a parent killed with SIGKILL does
not leave servers running on the machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def free_port() -> int:
    """A TCP port nothing listens on now, on loopback. The kernel picks it from the
    ephemeral range, so never one of the standard ports the machine's servers use."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class StartError(RuntimeError):
    """A child did not become ready; the message carries the end of its log."""


class ChildProcess:
    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.user = user
        # The signal that asks for a clean, prompt shutdown (PostgreSQL: SIGINT).
        self.stop_signal = stop_signal
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"\n--- {stamp} start {self.name} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=self.user,
                preexec_fn=self._die_with_parent if _LIBC is not None else None,
            )

    def _die_with_parent(self) -> None:
        # Runs in the child between fork and exec (after the uid switch, which would
        # otherwise clear the setting); only an async-signal-safe libc call.
        assert _LIBC is not None
        _LIBC.prctl(_PR_SET_PDEATHSIG, int(self.stop_signal))

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_until(self, ready: Callable[[], bool], timeout: float) -> None:
        """Poll `ready` until it holds; fail early, with the log, if the child exits.
        `ready` returns False (never raises) while the child is not accepting yet."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                code = self.proc.returncode if self.proc is not None else None
                raise StartError(f"{self.name} exited with code {code}:\n{self.tail()}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise StartError(f"{self.name} not ready after {timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.1)

    def signal_stop(self) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(self.stop_signal)

    def wait_stopped(self, grace: float) -> None:
        """Wait up to `grace` seconds after `signal_stop`, then SIGKILL."""
        if self.proc is None:
            return
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, grace: float = 15.0) -> None:
        self.signal_stop()
        self.wait_stopped(grace)

    def tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def stop_all(children: Iterable[ChildProcess], grace: float = 15.0) -> None:
    """Ask all to stop at once, then wait for each: shutdowns run in parallel."""
    children = list(children)
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            child.signal_stop()
    for child in children:
        child.wait_stopped(grace)


def user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0
