"""A user mistake gets one clear line on stderr and a non-zero exit, never a traceback.

These run without any server: "no server reachable" is one of the mistakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aos_cli.config import write_state
from aos_cli.main import main
from aos_cli.processes import free_port

CONFIG_VARS = (
    "AOS_NATS_URL",
    "AOS_NAMESPACE",
    "AOS_TRACER_URL",
    "AOS_PLANNER_URL",
    "AOS_EXECUTOR_URL",
    "AOS_LEDGER_URL",
)


@pytest.fixture(autouse=True)
def no_configured_aos(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing in the environment and no .aos/state.json in the working folder."""
    for name in CONFIG_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse exits on its own for flag errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("aos: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err


SUBMIT = ["goal", "submit", "summarize this", "--tenant", "acme", "--budget-cents", "10"]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        ([], "COMMAND"),
        (["launch"], "invalid choice"),
        (["runs", "--bogus"], "--bogus"),
        (["goal", "submit", "x", "--budget-cents", "5"], "--tenant"),
        (["goal", "submit", "x", "--tenant", "Acme Corp", "--budget-cents", "5"], "tenant"),
        (["goal", "submit", "x", "--tenant", "acme", "--budget-cents", "-1"], "negative"),
        (["goal", "submit", "x", "--tenant", "acme", "--budget-cents", "1.5"], "whole number"),
        ([*SUBMIT, "--input-json", "{not json"], "not valid JSON"),
        ([*SUBMIT, "--input-json", "[1, 2]"], "JSON object"),
        ([*SUBMIT, "--timeout", "0"], "positive"),
        (["run", "show", "not-a-uuid"], "not a run id"),
        ([*SUBMIT, "--reuse-plan-of", "run-7"], "not a run id"),
        (["runs", "--limit", "0"], "positive"),
        (
            [*SUBMIT[:-1], "100000001"],
            "--budget-cents: must be at most 100000000 cents ($1,000,000), got 100000001",
        ),
        (
            ["plan", "simulate", "bench 2", "--budget-cents", "999999999999"],
            "must be at most 100000000 cents",
        ),
    ],
)
def test_bad_arguments(argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(argv, capsys)
    assert code == 2
    assert out == ""
    assert_one_error_line(err, fragment)


def test_blank_goal(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["goal", "submit", "   ", "--tenant", "acme", "--budget-cents", "1"], capsys)
    assert code == 2
    assert_one_error_line(err, "goal must not be blank")


@pytest.mark.parametrize(
    "argv",
    [
        SUBMIT,
        [*SUBMIT, "--wait", "--json"],
        ["runs"],
        ["run", "show", "3b0b5b5e-0000-4000-8000-000000000001"],
    ],
)
def test_nothing_configured_says_how_to_start(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(argv, capsys)
    assert code == 2
    assert out == ""
    assert_one_error_line(err, "aos up")


def test_nats_not_reachable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AOS_NATS_URL", url)
    code, out, err = run([*SUBMIT, "--wait", "--json"], capsys)
    assert code == 2
    assert out == ""
    assert_one_error_line(err, "cannot reach NATS", url)


def test_nats_password_is_not_printed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AOS_NATS_URL", f"nats://me:s3cret@127.0.0.1:{free_port()}")
    code, _, err = run(SUBMIT, capsys)
    assert code == 2
    assert "s3cret" not in err
    assert_one_error_line(err, "cannot reach NATS")


@pytest.mark.parametrize(
    "argv", [["runs"], ["run", "show", "3b0b5b5e-0000-4000-8000-000000000001", "--json"]]
)
def test_tracer_not_reachable(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AOS_TRACER_URL", f"http://127.0.0.1:{free_port()}")
    code, out, err = run(argv, capsys)
    assert code == 2
    assert out == ""
    assert_one_error_line(err, "cannot reach the tracer")


def test_stale_state_file_of_a_stopped_stack(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "elsewhere"
    data_dir.mkdir()
    write_state(
        data_dir,
        {
            "nats_url": f"nats://127.0.0.1:{free_port()}",
            "namespace": "aos",
            "services": {"tracer": f"http://127.0.0.1:{free_port()}"},
        },
    )
    code, _, err = run([*SUBMIT, "--data-dir", str(data_dir)], capsys)
    assert code == 2
    assert_one_error_line(err, "cannot reach NATS")
    code, _, err = run(["runs", "--data-dir", str(data_dir)], capsys)
    assert code == 2
    assert_one_error_line(err, "cannot reach the tracer")


def test_stubs_without_services_lists_the_flags(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PLANNER_BACKEND", "stub")
    monkeypatch.setenv("USE_POSTGRES_TRACES", "false")
    monkeypatch.setenv("AOS_LEDGER_URL", f"http://127.0.0.1:{free_port()}")
    code, out, err = run(["stubs", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    flags = {flag["name"]: flag for flag in report["flags"]}
    assert flags["PLANNER_BACKEND"]["stub"] is True
    assert flags["USE_POSTGRES_TRACES"]["stub"] is True
    assert report["services"]["ledger"]["reachable"] is False


def test_the_installed_command_prints_no_traceback(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key not in CONFIG_VARS}
    env["AOS_NATS_URL"] = f"nats://127.0.0.1:{free_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "aos_cli", *SUBMIT, "--wait"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert_one_error_line(result.stderr, "cannot reach NATS")


def test_a_reader_that_stops_early_ends_the_output_quietly(tmp_path: Path) -> None:
    """`aos stubs | head -1`: the reader is gone before aos writes (its read end is
    closed before aos starts): no message, status 141 as for a tool SIGPIPE killed."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "aos_cli", "stubs"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert done.stderr == ""
    assert done.returncode == 141
