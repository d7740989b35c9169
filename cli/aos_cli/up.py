"""`aos up`: infrastructure, the four services, a demo goal, then wait for Ctrl-C.

Ctrl-C (SIGINT, even when `aos up` runs as a background job) or SIGTERM stops every
process `aos up` started, services first (they
drain into NATS), then Redis, PostgreSQL and NATS, and exits 0. A service that dies on
its own is restarted, a few times, on the same port: the log lets it pick up where it
stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from aos_cli.client import (
    build_goal,
    get_run,
    get_timeline,
    run_recorded_as_finished,
    submit_goal,
)
from aos_cli.config import UserError, read_state, remove_state, write_state
from aos_cli.embedded import EmbeddedInfra, InfraUrls
from aos_cli.launcher import Stack
from aos_cli.processes import StartError
from aos_cli.render import describe_terminal
from aos_contracts.events import RunCompleted
from aos_contracts.subjects import DEFAULT_NAMESPACE, check_namespace

DEMO_TENANT = "demo"
DEMO_GOAL = "summarize the release notes"
DEMO_BUDGET_CENTS = 100
DEMO_TEXT = (
    "AOS 0.1 is the walking skeleton. Goals published on NATS JetStream are planned by a "
    "rule-based stub planner, executed step by step with a budget check before every step, "
    "and recorded by the tracer in PostgreSQL. The ledger keeps live balances in Redis and "
    "rebuilds them from the event log after a restart. Every service exposes health, "
    "readiness and Prometheus metrics, and a single command starts the whole stack on a "
    "laptop with nothing installed but Python."
)
MAX_RESTARTS = 5


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM takes the same path as Ctrl-C: one shutdown sequence for both.
    raise KeyboardInterrupt


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_up(args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir.resolve()
    try:
        namespace = check_namespace(os.environ.get("AOS_NAMESPACE") or DEFAULT_NAMESPACE)
    except ValueError as exc:
        raise UserError(f"AOS_NAMESPACE: {exc}") from exc
    data_dir.mkdir(parents=True, exist_ok=True)
    state = read_state(data_dir)
    if state and isinstance(state.get("pid"), int) and _pid_alive(state["pid"]):
        raise UserError(f"aos up is already running for {data_dir} (pid {state['pid']})")

    # Its own handler for Ctrl-C too: a shell starts a background job (`aos up &`) with
    # SIGINT ignored, and Python then leaves it ignored, so `kill -INT` would do nothing.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    infra: EmbeddedInfra | None = None
    stack: Stack | None = None
    try:
        urls = InfraUrls.from_env()
        if urls is None:
            print(f"starting NATS, PostgreSQL and Redis (data in {data_dir}) ...", flush=True)
            infra = EmbeddedInfra(data_dir)
            urls = infra.start()
        else:
            print("using NATS, PostgreSQL and Redis from AOS_NATS_URL, AOS_POSTGRES_URL, REDIS_URL")
        print("starting planner, executor, ledger, tracer ...", flush=True)
        stack = Stack(urls, namespace, data_dir)
        stack.start()
        write_state(
            data_dir,
            {
                "pid": os.getpid(),
                "started_at": datetime.now(UTC).isoformat(),
                "nats_url": urls.nats_url,
                "namespace": namespace,
                "embedded": infra is not None,
                "services": stack.urls,
                "logs": str(data_dir / "logs"),
            },
        )
        _print_ready(stack, urls, embedded=infra is not None)
        if not args.no_demo:
            _demo(stack, urls.nats_url, namespace)
        print("\nAOS is running. Press Ctrl-C to stop.", flush=True)
        _supervise(stack)
    except KeyboardInterrupt:
        pass
    except StartError as exc:
        print(f"aos: error: {exc}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C must not cut the shutdown short and leave servers behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("\nstopping ...", flush=True)
        if stack is not None:
            stack.stop()
        if infra is not None:
            infra.stop()
        remove_state(data_dir)
        print("stopped", flush=True)
    return 0


def _print_ready(stack: Stack, urls: InfraUrls, *, embedded: bool) -> None:
    print(f"\nAOS is up (namespace {stack.namespace!r}{', embedded servers' if embedded else ''})")
    print(f"  NATS      {urls.nats_url}")
    for name, url in stack.urls.items():
        print(f"  {name:<9} {url}  (log: {stack.data_dir / 'logs' / f'{name}.log'})")
    print(f"  state     {stack.data_dir / 'state.json'}", flush=True)


def _demo(stack: Stack, nats_url: str, namespace: str) -> None:
    goal = build_goal(
        DEMO_GOAL, tenant=DEMO_TENANT, budget_cents=DEMO_BUDGET_CENTS, inputs={"text": DEMO_TEXT}
    )
    print(f'\ndemo: submitting "{DEMO_GOAL}" for tenant {DEMO_TENANT!r} ...', flush=True)
    try:
        submission = asyncio.run(submit_goal(nats_url, namespace, goal, wait=True, wait_s=60))
        assert submission.terminal is not None
        print(describe_terminal(submission.terminal))
        tracer = stack.urls["tracer"]
        _wait_until_traced(tracer, goal.run_id)
        print("\ntrace:")
        print(get_timeline(tracer, goal.run_id).rstrip("\n"), flush=True)
        if not isinstance(submission.terminal, RunCompleted):
            print("demo: the run did not complete; see the logs above", file=sys.stderr)
    except UserError as exc:
        # The stack is up and usable; a failed demo is reported, not fatal.
        print(f"aos: demo goal: {exc}", file=sys.stderr, flush=True)


def _wait_until_traced(tracer: str, run_id: uuid.UUID, timeout: float = 15.0) -> None:
    """The tracer stores events as they arrive: give it a moment to catch up with the
    terminal event the CLI has already seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if run_recorded_as_finished(get_run(tracer, run_id)):
                return
        except UserError:
            pass  # not stored yet
        time.sleep(0.2)


def _supervise(stack: Stack) -> None:
    restarts: dict[str, int] = {}
    while True:
        time.sleep(1.0)
        for name in stack.dead():
            service = stack.services[name]
            count = restarts.get(name, 0) + 1
            code = service.child.proc.returncode if service.child.proc else None
            if count > MAX_RESTARTS:
                raise StartError(
                    f"{name} keeps exiting (code {code}); see {service.child.log_path}"
                )
            restarts[name] = count
            print(f"aos: {name} exited with code {code}; restarting it ({count}/{MAX_RESTARTS})")
            service.child.start()
