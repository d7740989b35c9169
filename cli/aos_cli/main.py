"""`aos`: run AOS locally, submit goals, look at runs.

    aos up [--data-dir .aos] [--no-demo]
    aos goal submit TEXT --tenant T --budget-cents N [--input-json JSON] [--wait] [--json]
    aos runs [--tenant T] [--status S] [--json]
    aos run show RUN_ID [--json]
    aos stubs [--json]
    aos doctor [--json]
    aos parked list [--all] [--json] | show ID [--json] | replay ID [--json] | drop ID

A user mistake ends in one line on stderr (`aos: error: ...`) and a non-zero exit code;
set AOS_DEBUG=1 to see the traceback of an unexpected failure. Output piped into a reader
that stops early (`aos run show ID | head -1`) ends quietly with status 141, as a Unix
tool killed by SIGPIPE does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from aos_cli import doctor, stubs, up
from aos_cli.client import (
    Refused,
    RunTimeout,
    build_goal,
    cancel_run,
    drop_parked,
    get_golden,
    get_parked,
    get_run,
    get_tenant_budget,
    get_timeline,
    golden_diff,
    list_parked,
    list_runs,
    mark_replayed,
    replay_parked,
    replay_run,
    submit_goal,
)
from aos_cli.config import DEFAULT_DATA_DIR, UserError, load_config
from aos_cli.render import describe_parked, describe_terminal, parked_table, runs_table
from aos_contracts.events import (
    MAX_BUDGET_CENTS,
    RunCancelRequested,
    RunCompleted,
    is_valid_tenant,
)

EXIT_OK = 0
EXIT_RUN_NOT_COMPLETED = 1
EXIT_USER_ERROR = 2
EXIT_READER_GONE = 128 + signal.SIGPIPE  # 141, what a shell shows for a tool SIGPIPE killed


class ArgumentParser(argparse.ArgumentParser):
    """argparse prints the usage and then the error; a user needs only the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"aos: error: {message} (see `{self.prog} --help`)\n")


def _whole_number(text: str, *, minimum: int, unit: str = "") -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number{unit}, not {text!r}") from None
    if value < minimum:
        wanted = {0: "must not be negative", 1: "must be positive"}.get(
            minimum, f"must be at least {minimum}"
        )
        raise argparse.ArgumentTypeError(f"{wanted}, got {value}")
    return value


def _budget(text: str) -> int:
    value = _whole_number(text, minimum=0, unit=" of cents")
    if value > MAX_BUDGET_CENTS:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_BUDGET_CENTS} cents (${MAX_BUDGET_CENTS // 100:,}), got {value}"
        )
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    return _whole_number(text, minimum=0)


def _positive_int(text: str) -> int:
    return _whole_number(text, minimum=1)


def _tenant(text: str) -> str:
    if not is_valid_tenant(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a valid tenant (lowercase letters, digits, '_' and '-', "
            "starting with a letter or digit, at most 63 characters)"
        )
    return text


def _run_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a run id (a UUID)") from None


def _inputs(text: str) -> dict[str, Any]:
    """A JSON object, given inline or as `@FILE` (a command line holds at most 128 KiB
    per argument: larger inputs come from a file)."""
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {text[1:]}: {exc.strerror}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('must be a JSON object, e.g. \'{"text": "..."}\'')
    return value


def build_parser() -> ArgumentParser:
    common = ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="folder of `aos up`: servers' data, logs, state.json (default: .aos)",
    )
    common.add_argument(
        "--token",
        default=None,
        metavar="JWT",
        help="bearer token sent with goals, cancels and trace reads (default: $AOS_TOKEN)",
    )

    parser = ArgumentParser(
        prog="aos",
        description="AOS: goals in, budgeted, traced, exactly-once work out.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up_cmd = commands.add_parser(
        "up",
        parents=[common],
        help="start NATS, PostgreSQL, Redis (unless configured) and the four services",
        description="Start AOS locally and keep it running until Ctrl-C. Uses external "
        "servers when AOS_NATS_URL, AOS_POSTGRES_URL and REDIS_URL are all set.",
    )
    up_cmd.add_argument("--no-demo", action="store_true", help="do not submit the demo goal")
    up_cmd.set_defaults(handler=up.run_up)

    goal_cmd = commands.add_parser("goal", help="goals: submit")
    goal_commands = goal_cmd.add_subparsers(dest="goal_command", required=True, metavar="COMMAND")
    submit = goal_commands.add_parser(
        "submit", parents=[common], help="publish a goal.submitted event"
    )
    submit.add_argument("text", help='the goal, e.g. "summarize the release notes"')
    submit.add_argument("--tenant", type=_tenant, required=True)
    submit.add_argument("--budget-cents", type=_budget, required=True)
    submit.add_argument(
        "--input-json", type=_inputs, default={}, help="the goal's inputs, a JSON object"
    )
    submit.add_argument(
        "--idempotency-key",
        help="resubmitting with the same key (and tenant) does not start a second run",
    )
    submit.add_argument(
        "--replan-within-budget",
        action="store_true",
        help="when the plan is estimated above the budget, ask the planner once more with "
        "the budget stated instead of rejecting the goal",
    )
    submit.add_argument(
        "--reuse-plan-of",
        type=_run_id,
        metavar="RUN_ID",
        help="run the recorded plan of an earlier run of this tenant (no planning call)",
    )
    submit.add_argument("--wait", action="store_true", help="wait for the run to end")
    submit.add_argument(
        "--timeout", type=_positive_float, default=60.0, help="seconds to --wait (default 60)"
    )
    submit.add_argument("--json", action="store_true", help="print JSON")
    submit.set_defaults(handler=cmd_goal_submit)

    runs_cmd = commands.add_parser("runs", parents=[common], help="list recent runs")
    runs_cmd.add_argument("--tenant", type=_tenant)
    runs_cmd.add_argument("--status", help="e.g. running, completed, failed, cancelled")
    runs_cmd.add_argument("--limit", type=_positive_int, default=50)
    runs_cmd.add_argument("--json", action="store_true", help="print JSON")
    runs_cmd.set_defaults(handler=cmd_runs)

    run_cmd = commands.add_parser("run", help="one run: show, cancel")
    run_commands = run_cmd.add_subparsers(dest="run_command", required=True, metavar="COMMAND")
    show = run_commands.add_parser(
        "show", parents=[common], help="a run's timeline: steps, durations, cents"
    )
    show.add_argument("run_id", type=_run_id, metavar="RUN_ID")
    show.add_argument("--tenant", type=_tenant, help="only if the run belongs to this tenant")
    show.add_argument("--json", action="store_true", help="the run, steps and events as JSON")
    show.set_defaults(handler=cmd_run_show)

    cancel = run_commands.add_parser(
        "cancel", parents=[common], help="stop a run: no new steps, reservations released"
    )
    cancel.add_argument("run_id", type=_run_id, metavar="RUN_ID")
    cancel.add_argument("--tenant", type=_tenant, required=True, help="the run's tenant")
    cancel.add_argument("--reason", default="cancelled by user")
    cancel.add_argument("--wait", action="store_true", help="wait for the run to end")
    cancel.add_argument("--timeout", type=_positive_float, default=60.0, metavar="SECONDS")
    cancel.add_argument("--json", action="store_true", help="print the run's end as JSON")
    cancel.set_defaults(handler=cmd_run_cancel)

    plan_cmd = commands.add_parser("plan", help="plans: simulate")
    plan_commands = plan_cmd.add_subparsers(dest="plan_command", required=True, metavar="COMMAND")
    simulate = plan_commands.add_parser(
        "simulate",
        help="the plan for a goal, its worst-case cost and whether it fits, without running it",
    )
    simulate.add_argument("goal", metavar="TEXT")
    simulate.add_argument("--budget-cents", type=_budget, required=True)
    simulate.add_argument(
        "--input-json", type=_inputs, default={}, metavar="JSON", help="a JSON object, or @FILE"
    )
    simulate.add_argument(
        "--assume-output-bytes",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="the size assumed for each output not known before the run "
        "(default: the executor's default step output limit, 512 KiB)",
    )
    simulate.add_argument(
        "--replan",
        action="store_true",
        help="when the plan is above the budget, ask once more with the budget stated",
    )
    simulate.add_argument("--json", action="store_true", help="print JSON")
    simulate.set_defaults(handler=cmd_plan_simulate)

    replay_cmd = commands.add_parser(
        "replay",
        parents=[common],
        help="re-drive a recorded run offline and report decisions that differ",
    )
    replay_cmd.add_argument("run_id", type=_run_id, metavar="RUN_ID")
    replay_cmd.add_argument("--json", action="store_true", help="print the report as JSON")
    replay_cmd.set_defaults(handler=cmd_replay)

    budget_cmd = commands.add_parser("budget", help="budgets: show a tenant's")
    budget_commands = budget_cmd.add_subparsers(
        dest="budget_command", required=True, metavar="COMMAND"
    )
    budget_show = budget_commands.add_parser(
        "show", parents=[common], help="a tenant's cap, committed, reserved, remaining"
    )
    budget_show.add_argument("tenant", type=_tenant, metavar="TENANT")
    budget_show.add_argument("--period", help="e.g. month:2025-06 or day:2025-06-01 (default: now)")
    budget_show.add_argument("--json", action="store_true", help="print JSON")
    budget_show.set_defaults(handler=cmd_budget_show)

    golden_cmd = commands.add_parser("golden", help="golden files: record, verify")
    golden_commands = golden_cmd.add_subparsers(
        dest="golden_command", required=True, metavar="COMMAND"
    )
    for name, handler, text in (
        ("record", cmd_golden_record, "write a run's canonical event sequence to FILE"),
        ("verify", cmd_golden_verify, "compare a run with FILE; a diff and exit 1 if different"),
    ):
        golden = golden_commands.add_parser(name, parents=[common], help=text)
        golden.add_argument("run_id", type=_run_id, metavar="RUN_ID")
        golden.add_argument("file", type=Path, metavar="FILE")
        golden.set_defaults(handler=handler)

    stubs_cmd = commands.add_parser(
        "stubs", parents=[common], help="which backends are stubs right now"
    )
    stubs_cmd.add_argument("--json", action="store_true", help="print JSON")
    stubs_cmd.set_defaults(handler=stubs.run_stubs)

    parked_cmd = commands.add_parser(
        "parked",
        help="messages a consumer could not decode or handle: list, show, replay, drop",
        description="A parked message's ID is its sequence in the parked stream (AOS_PARKED).",
    )
    parked_commands = parked_cmd.add_subparsers(
        dest="parked_command", required=True, metavar="COMMAND"
    )
    parked_list = parked_commands.add_parser(
        "list", parents=[common], help="parked messages still to deal with, newest first"
    )
    parked_list.add_argument("--all", action="store_true", help="replayed ones too")
    parked_list.add_argument("--limit", type=_positive_int, default=50)
    parked_list.add_argument("--json", action="store_true", help="print JSON")
    parked_list.set_defaults(handler=cmd_parked_list)
    for name, handler, text in (
        ("show", cmd_parked_show, "one parked message: reason, where from, headers, bytes"),
        (
            "replay",
            cmd_parked_replay,
            "publish it again on its original subject (a fresh Nats-Msg-Id; --token is "
            "sent as its Authorization) and mark it replayed",
        ),
        ("drop", cmd_parked_drop, "forget it: delete it from the tracer and the parked stream"),
    ):
        one = parked_commands.add_parser(name, parents=[common], help=text)
        one.add_argument("parked_id", type=_positive_int, metavar="ID")
        one.add_argument("--json", action="store_true", help="print JSON")
        one.set_defaults(handler=handler)

    doctor_cmd = commands.add_parser(
        "doctor",
        parents=[common],
        help="every service's health and readiness, NATS and the streams; exit 1 if not ready",
    )
    doctor_cmd.add_argument("--json", action="store_true", help="print JSON")
    doctor_cmd.set_defaults(handler=doctor.run_doctor)
    return parser


# --- commands ---------------------------------------------------------------------------


def _token(args: argparse.Namespace) -> str | None:
    """The JWT to send: --token, else $AOS_TOKEN (needed when JWT_VERIFY_SIGNATURE or
    RBAC_ENFORCE is on)."""
    return getattr(args, "token", None) or os.environ.get("AOS_TOKEN") or None


def cmd_goal_submit(args: argparse.Namespace) -> int:
    config = load_config(args.data_dir)
    goal = build_goal(
        args.text,
        tenant=args.tenant,
        budget_cents=args.budget_cents,
        inputs=args.input_json,
        idempotency_key=args.idempotency_key,
        replan_within_budget=args.replan_within_budget,
        reuse_plan_of=args.reuse_plan_of,
    )
    submission = asyncio.run(
        submit_goal(
            config.require_nats(),
            config.namespace,
            goal,
            wait=args.wait,
            wait_s=args.timeout,
            token=_token(args),
        )
    )
    if submission.terminal is None:
        if args.json:
            print(
                json.dumps(
                    {
                        "run_id": str(submission.run_id),
                        "tenant": goal.tenant,
                        "event_id": str(goal.event_id),
                        "duplicate": submission.duplicate,
                    }
                )
            )
        else:
            print(submission.run_id)
            if submission.duplicate:
                print("(already submitted with this idempotency key)", file=sys.stderr)
        return EXIT_OK
    terminal = submission.terminal
    if args.json:
        print(terminal.model_dump_json())
    else:
        print(describe_terminal(terminal))
    return EXIT_OK if isinstance(terminal, RunCompleted) else EXIT_RUN_NOT_COMPLETED


def cmd_runs(args: argparse.Namespace) -> int:
    tracer = load_config(args.data_dir).require_tracer()
    runs = list_runs(
        tracer, tenant=args.tenant, status=args.status, limit=args.limit, token=_token(args)
    )
    if args.json:
        print(json.dumps({"runs": runs}))
        return EXIT_OK
    if not runs:
        print("no runs")
        return EXIT_OK
    print(runs_table(runs))
    return EXIT_OK


def cmd_run_show(args: argparse.Namespace) -> int:
    tracer = load_config(args.data_dir).require_tracer()
    if args.json:
        print(json.dumps(get_run(tracer, args.run_id, args.tenant, _token(args))))
    else:
        print(get_timeline(tracer, args.run_id, args.tenant, _token(args)).rstrip("\n"))
    return EXIT_OK


def cmd_run_cancel(args: argparse.Namespace) -> int:
    """Exit 0 when the cancel was sent (and, with --wait, the run ended cancelled)."""
    config = load_config(args.data_dir)
    request = RunCancelRequested(run_id=args.run_id, tenant=args.tenant, reason=args.reason)
    end = asyncio.run(
        cancel_run(
            config.require_nats(),
            config.namespace,
            request,
            wait=args.wait,
            wait_s=args.timeout,
            token=_token(args),
        )
    )
    if end is None:
        print(f"cancel requested for run {args.run_id}")
        return EXIT_OK
    if args.json:
        print(end.model_dump_json())
    else:
        print(f"run {args.run_id} ended: {end.type}")
    return EXIT_OK if end.type == "run.cancelled" else EXIT_RUN_NOT_COMPLETED


def cmd_plan_simulate(args: argparse.Namespace) -> int:
    """Runs the planner's own simulation in a child process: the CLI imports no service,
    and with the stub backend nothing else (no NATS, no Claude) is needed."""
    command = [sys.executable, "-m", "aos_planner", "simulate", args.goal]
    # The inputs go through stdin: an argument holds at most 128 KiB.
    command += ["--budget-cents", str(args.budget_cents), "--input-json", "-"]
    if args.assume_output_bytes is not None:
        command += ["--assume-output-bytes", str(args.assume_output_bytes)]
    if args.replan:
        command.append("--replan")
    if args.json:
        command.append("--json")
    inputs = json.dumps(args.input_json)
    return subprocess.run(command, input=inputs, text=True, check=False).returncode


def cmd_replay(args: argparse.Namespace) -> int:
    """Exit 0 when every decision replays the same, 1 when one differs."""
    config = load_config(args.data_dir)
    run = get_run(config.require_tracer(), args.run_id, token=_token(args))
    executor = config.service_urls.get("executor")
    if not executor:
        raise UserError("no executor URL: is AOS running? (set AOS_EXECUTOR_URL or `aos up`)")
    report = replay_run(executor, [item["event"] for item in run.get("events", [])])
    if args.json:
        print(json.dumps(report))
    else:
        verdict = "same decisions" if report["identical"] else "DIFFERENT decisions"
        print(f"replay of {report['run_id']}: {verdict} ({report['decisions']} decisions)")
        print(f"  recorded end: {report['recorded_end']}; replayed end: {report['replayed_end']}")
        for difference in report["differences"]:
            print(f"  - {difference}")
    return EXIT_OK if report["identical"] else EXIT_RUN_NOT_COMPLETED


def cmd_budget_show(args: argparse.Namespace) -> int:
    config = load_config(args.data_dir)
    ledger = config.service_urls.get("ledger")
    if not ledger:
        raise UserError("no ledger URL: is AOS running? (set AOS_LEDGER_URL or `aos up`)")
    budget = get_tenant_budget(ledger.rstrip("/"), args.tenant, args.period, token=_token(args))
    if args.json:
        print(json.dumps(budget))
        return EXIT_OK
    cap, remaining = budget.get("cap_cents"), budget.get("remaining_cents")
    print(f"tenant {budget['tenant']}, period {budget['period']}")
    print(f"  cap        {'no cap' if cap is None else f'{cap} cents'}")
    print(f"  committed  {budget['committed_cents']} cents")
    print(f"  reserved   {budget['reserved_cents']} cents")
    print(f"  remaining  {'unlimited' if remaining is None else f'{remaining} cents'}")
    return EXIT_OK


def cmd_golden_record(args: argparse.Namespace) -> int:
    golden = get_golden(load_config(args.data_dir).require_tracer(), args.run_id, _token(args))
    try:
        args.file.write_text(golden)
    except OSError as exc:
        raise UserError(f"cannot write {args.file}: {exc}") from exc
    print(f"recorded run {args.run_id} to {args.file}")
    return EXIT_OK


def cmd_golden_verify(args: argparse.Namespace) -> int:
    """Exit 0 when the run matches the golden file, 1 (with a unified diff) when not."""
    actual = get_golden(load_config(args.data_dir).require_tracer(), args.run_id, _token(args))
    try:
        expected = args.file.read_text()
    except OSError as exc:
        raise UserError(f"cannot read {args.file}: {exc}") from exc
    diff = golden_diff(expected, actual, str(args.file), f"run {args.run_id}")
    if not diff:
        print(f"run {args.run_id} matches {args.file}")
        return EXIT_OK
    print(diff, end="")
    return EXIT_RUN_NOT_COMPLETED


def cmd_parked_list(args: argparse.Namespace) -> int:
    tracer = load_config(args.data_dir).require_tracer()
    status = None if args.all else "parked"
    rows = list_parked(tracer, status=status, limit=args.limit, token=_token(args))
    if args.json:
        print(json.dumps({"parked": rows}))
    elif not rows:
        print("no parked messages")
    else:
        print(parked_table(rows))
    return EXIT_OK


def cmd_parked_show(args: argparse.Namespace) -> int:
    tracer = load_config(args.data_dir).require_tracer()
    parked = get_parked(tracer, args.parked_id, _token(args))
    print(json.dumps(parked) if args.json else describe_parked(parked))
    return EXIT_OK


def cmd_parked_replay(args: argparse.Namespace) -> int:
    """Exit 0 once it is published again and marked replayed; 2 (a user error) when it
    was replayed already or its original is gone."""
    config = load_config(args.data_dir)
    tracer = config.require_tracer()
    token = _token(args)
    parked = get_parked(tracer, args.parked_id, token)
    if parked.get("status") == "replayed":
        raise UserError(
            f"parked message {args.parked_id} was replayed at {parked.get('replayed_at')}"
        )
    seq = asyncio.run(replay_parked(config.require_nats(), parked, token))
    marked = mark_replayed(tracer, args.parked_id, token)
    if args.json:
        print(json.dumps({**marked, "replayed_seq": seq}))
    else:
        print(f"replayed parked message {args.parked_id} to {parked['subject']} (seq {seq})")
    return EXIT_OK


def cmd_parked_drop(args: argparse.Namespace) -> int:
    tracer = load_config(args.data_dir).require_tracer()
    dropped = drop_parked(tracer, args.parked_id, _token(args))
    print(json.dumps(dropped) if args.json else f"dropped parked message {args.parked_id}")
    return EXIT_OK


# --- entry point ------------------------------------------------------------------------


def _reader_gone() -> int:
    """`aos run show ID | head -1`: once head has what it wants it exits, and the next
    write fails with EPIPE. Like a Unix tool killed by SIGPIPE: no message, status 141
    (128 + SIGPIPE). stdout is pointed at /dev/null so Python's flush at exit cannot fail
    again. (SIGPIPE itself stays ignored, as Python sets it: a dead NATS or HTTP peer must
    be an error the CLI reports, not a silent death.)"""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return EXIT_READER_GONE


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.handler(args))
        sys.stdout.flush()  # a reader that has gone (`| head -1`) is found here, not at exit
        return code
    except BrokenPipeError:
        return _reader_gone()
    except (RunTimeout, Refused) as exc:  # the run did not (or will not) complete
        print(f"aos: {exc}", file=sys.stderr)
        return EXIT_RUN_NOT_COMPLETED
    except UserError as exc:
        print(f"aos: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("aos: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("AOS_DEBUG"):
            raise
        print(
            f"aos: error: unexpected {type(exc).__name__}: {exc} (AOS_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
