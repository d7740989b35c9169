"""End to end, as a user runs it: `aos up`, a goal through `aos goal submit --wait --json`,
its trace through `aos run show`, then Ctrl-C stops everything `aos up` started."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from aos_cli.embedded import InfraUrls
from aos_cli.launcher import remove_namespace

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

CONFIG_VARS = ("AOS_NATS_URL", "AOS_NAMESPACE", "AOS_TRACER_URL")
TEXT = (
    "The release adds budgets per run, a tracer with a readable timeline and a CLI. "
    "It fixes nothing because nothing was broken yet."
)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _ignored_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class AosUp:
    def __init__(
        self, data_dir: Path, env: dict[str, str], *, as_background_job: bool = False
    ) -> None:
        self.data_dir = data_dir
        self.env = env
        self.log = data_dir.parent / "aos-up.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "aos_cli", "up", "--no-demo", "--data-dir", str(data_dir)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Ctrl-C as a terminal sends it, even when the tests themselves run in the
                # background (a shell starts background jobs with SIGINT ignored, and a
                # child would inherit that and never see the test's SIGINT); or, as a
                # background job (`aos up &`), with SIGINT ignored on purpose.
                preexec_fn=_ignored_sigint if as_background_job else _default_sigint,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_state(self, timeout: float = 180.0) -> dict[str, Any]:
        state_file = self.data_dir / "state.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"aos up exited early:\n{self.output()}"
            if state_file.exists():
                return dict(json.loads(state_file.read_text()))
            time.sleep(0.2)
        raise AssertionError(f"no state.json after {timeout}s:\n{self.output()}")

    def aos(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "aos_cli", *args, "--data-dir", str(self.data_dir)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@contextlib.contextmanager
def started_aos_up(
    tmp_path: Path, extra_env: dict[str, str] | None = None, *, as_background_job: bool = False
) -> Iterator[AosUp]:
    env = {key: value for key, value in os.environ.items() if key not in CONFIG_VARS}
    env.pop("PLANNER_BACKEND", None)
    env.update(extra_env or {})
    external = InfraUrls.from_env(env)
    namespace = "aos"
    if external is not None:
        # Shared external servers: a namespace of our own keeps streams, keys and
        # databases apart from anyone else's.
        namespace = env["AOS_NAMESPACE"] = f"e2e{uuid.uuid4().hex[:10]}"
    up = AosUp(tmp_path / "aos", env, as_background_job=as_background_job)
    try:
        yield up
    finally:
        if up.proc.poll() is None:
            up.proc.send_signal(signal.SIGINT)
            try:
                up.proc.wait(60)
            except subprocess.TimeoutExpired:
                up.proc.kill()
        if external is not None:
            asyncio.run(remove_namespace(external, namespace))


@pytest.fixture
def aos_up(tmp_path: Path) -> Iterator[AosUp]:
    with started_aos_up(tmp_path) as up:
        yield up


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_goal_through_aos_up(aos_up: AosUp) -> None:
    state = aos_up.wait_for_state()
    assert set(state["services"]) == {"planner", "executor", "ledger", "tracer"}

    submitted = aos_up.aos(
        "goal", "submit", "summarize the release notes",
        "--tenant", "e2e",
        "--budget-cents", "100",
        "--input-json", json.dumps({"text": TEXT}),
        "--wait", "--json",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    lines = submitted.stdout.strip().splitlines()
    assert len(lines) == 1, submitted.stdout
    terminal = json.loads(lines[0])
    assert terminal["type"] == "run.completed"
    assert terminal["tenant"] == "e2e"
    run_id = terminal["run_id"]

    # The tracer records events as they arrive; it may be a moment behind the CLI.
    deadline = time.monotonic() + 60
    while True:
        shown = aos_up.aos("run", "show", run_id)
        if shown.returncode == 0 and "completed" in shown.stdout and "summary" in shown.stdout:
            break
        assert time.monotonic() < deadline, f"{shown.stdout}\n{shown.stderr}"
        time.sleep(0.5)
    assert "json_transform" in shown.stdout
    assert "llm_invoke" in shown.stdout

    listed = aos_up.aos("runs", "--tenant", "e2e", "--json")
    assert listed.returncode == 0, listed.stderr
    assert run_id in {run["run_id"] for run in json.loads(listed.stdout)["runs"]}

    unknown = aos_up.aos("run", "show", str(uuid.uuid4()))
    assert unknown.returncode != 0
    assert unknown.stderr.strip().startswith("aos: error: unknown run")
    assert len(unknown.stderr.strip().splitlines()) == 1

    # A goal no planner rule understands ends in run.failed: exit 1, still one JSON object.
    failed = aos_up.aos(
        "goal", "submit", "paint the fence",
        "--tenant", "e2e", "--budget-cents", "5", "--wait", "--json",
    )  # fmt: skip
    assert failed.returncode == 1, failed.stderr
    assert json.loads(failed.stdout)["type"] == "run.failed"

    # The same idempotency key twice is one run; the second --wait finds its end in the log.
    first = aos_up.aos(
        "goal", "submit", "bench 3", "--tenant", "e2e", "--budget-cents", "5",
        "--idempotency-key", "order-17", "--wait", "--json",
    )  # fmt: skip
    again = aos_up.aos(
        "goal", "submit", "bench 3", "--tenant", "e2e", "--budget-cents", "5",
        "--idempotency-key", "order-17", "--wait", "--json",
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert again.returncode == 0, again.stderr
    assert json.loads(first.stdout)["run_id"] == json.loads(again.stdout)["run_id"]
    assert json.loads(first.stdout)["event_id"] == json.loads(again.stdout)["event_id"]

    started = descendants(aos_up.proc.pid)
    assert len(started) >= 4  # at least the four services
    aos_up.proc.send_signal(signal.SIGINT)
    assert aos_up.proc.wait(120) == 0, aos_up.output()
    left = sorted(pid for pid in started if alive(pid))
    assert left == [], f"still running after aos up stopped: {left}"
    assert not (aos_up.data_dir / "state.json").exists()


class _NotImplemented(BaseHTTPRequestHandler):
    """No method implemented: every request is answered 501, as by a Messages API server
    that has no `GET /v1/models`."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def endpoint_answering_501() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotImplemented)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_background_aos_up_with_claude_unreachable_serves_work_and_stops_on_sigint(
    tmp_path: Path,
) -> None:
    """`ANTHROPIC_BASE_URL=<a server answering 501> aos up &`: the stack comes up (Claude
    is degraded, not a reason to be not ready), a goal that needs no Claude completes,
    `aos run show ID | head -1` ends quietly, and `kill -INT` stops everything."""
    with (
        endpoint_answering_501() as claude,
        started_aos_up(
            tmp_path,
            {"ANTHROPIC_API_KEY": "sk-test", "ANTHROPIC_BASE_URL": claude},
            as_background_job=True,
        ) as up,
    ):
        state = up.wait_for_state()
        executor = state["services"]["executor"]
        readiness = httpx.get(f"{executor}/readyz", timeout=10)
        assert readiness.status_code == 200, readiness.text
        assert readiness.json()["degraded"] == {"anthropic": f"GET {claude}/v1/models answered 501"}
        doctor = up.aos("doctor")
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert f"degraded anthropic: GET {claude}/v1/models answered 501" in doctor.stdout
        assert "all ready (degraded: executor anthropic)" in doctor.stdout

        done = up.aos(
            "goal", "submit", "bench 2", "--tenant", "e2e", "--budget-cents", "5",
            "--wait", "--json",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        run_id = json.loads(done.stdout)["run_id"]
        deadline = time.monotonic() + 60
        while "completed" not in (shown := up.aos("run", "show", run_id)).stdout:
            assert time.monotonic() < deadline, shown.stdout + shown.stderr
            time.sleep(0.5)
        piped = subprocess.run(
            f"{sys.executable} -m aos_cli run show {run_id} --data-dir {up.data_dir} | head -1;"
            " exit ${PIPESTATUS[0]}",
            shell=True,
            executable="/bin/bash",
            env=up.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert piped.stderr == ""
        assert piped.returncode in (0, 141)
        assert len(piped.stdout.splitlines()) == 1

        started = descendants(up.proc.pid)
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(120) == 0, up.output()
        left = sorted(pid for pid in started if alive(pid))
        assert left == [], f"still running after aos up stopped: {left}"
