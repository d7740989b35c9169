"""Parked messages are operable: `aos parked list | show | replay | drop`, `aos doctor`
warns about them, and parking never copies an oversized payload."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from typing import Any

from aos_contracts.codec import encode_event, event_headers
from aos_contracts.events import GoalSubmitted
from aos_contracts.parked import PARKED_DATA_MAX_BYTES, ParkedMessage
from aos_contracts.subjects import PARKED, goal_subject, parked_subject, stream_name
from tests.support.bus import RunWatcher, connected
from tests.system.conftest import System, aos
from tests.tracer.polling import until


async def run_aos(system: System, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(aos, system, *args)


async def parked_rows(system: System, *flags: str) -> list[dict[str, Any]]:
    listed = await run_aos(system, "parked", "list", "--json", *flags)
    assert listed.returncode == 0, listed.stderr
    return list(json.loads(listed.stdout)["parked"])


async def doctor(system: System) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "AOS_NATS_URL": system.nats_url,
        "AOS_NAMESPACE": system.namespace,
        **{f"AOS_{s.name.upper()}_URL": s.url for s in system.all},
    }
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "aos_cli", "doctor"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def parked_in_stream(system: System) -> int:
    async with connected(system.nats_url) as nc:
        info = await nc.jetstream().stream_info(stream_name(PARKED, system.namespace))
        return int(info.state.messages)


async def test_a_parked_goal_is_listed_shown_replayed_and_its_run_completes(
    system: System,
) -> None:
    # A valid goal the planner parked (as it would after a transient failure outlasted
    # its deliveries): parked by hand, exactly as EventBus.park writes it.
    goal = GoalSubmitted(
        run_id=uuid.uuid4(), tenant="acme", goal="bench 1", budget_cents=5, inputs={"n": 1}
    )
    subject = goal_subject(goal.tenant, goal.run_id, system.namespace)
    parked = ParkedMessage.of(
        service="planner",
        reason="handler failed 10 times",
        stream=stream_name("goals", system.namespace),
        stream_seq=1_000_000,
        subject=subject,
        headers={**event_headers(goal), "Authorization": "<redacted>"},
        data=encode_event(goal),
        num_delivered=10,
    )
    async with connected(system.nats_url) as nc:
        await nc.jetstream().publish(
            parked_subject("planner", system.namespace), parked.model_dump_json().encode()
        )

    rows = await until(
        lambda: parked_rows(system), lambda rows: len(rows) == 1, what="the parked goal listed"
    )
    (row,) = rows
    parked_id = row["id"]
    assert (row["status"], row["service"], row["subject"]) == ("parked", "planner", subject)
    table = await run_aos(system, "parked", "list")
    assert table.returncode == 0 and str(parked_id) in table.stdout and "planner" in table.stdout

    shown = await run_aos(system, "parked", "show", str(parked_id))
    assert shown.returncode == 0, shown.stderr
    assert "handler failed 10 times" in shown.stdout and str(goal.run_id) in shown.stdout

    warned = await doctor(system)
    assert warned.returncode == 1, warned.stdout
    assert "WARNING: 1 parked message" in warned.stdout

    async with connected(system.nats_url) as nc, RunWatcher(nc, system.namespace) as watcher:
        replayed = await run_aos(system, "parked", "replay", str(parked_id))
        assert replayed.returncode == 0, replayed.stderr
        ends = await watcher.wait([str(goal.run_id)])
    assert ends[str(goal.run_id)]["type"] == "run.completed"

    assert await parked_rows(system) == []  # nothing left to deal with
    (history,) = await parked_rows(system, "--all")
    assert (history["id"], history["status"]) == (parked_id, "replayed")
    assert await parked_in_stream(system) == 0
    again = await run_aos(system, "parked", "replay", str(parked_id))
    assert again.returncode == 2 and "was replayed" in again.stderr
    healthy = await doctor(system)
    assert healthy.returncode == 0, healthy.stdout


async def test_an_oversized_message_is_parked_as_a_bounded_prefix_replayed_whole_and_dropped(
    system: System,
) -> None:
    # Undecodable and near the max payload: before, its parked copy (base64) was larger
    # than NATS takes, the park failed and the message was redelivered forever.
    junk = b"\x00" + b"j" * 899_999
    subject = goal_subject("acme", uuid.uuid4(), system.namespace)
    async with connected(system.nats_url) as nc:
        ack = await nc.jetstream().publish(subject, junk)

    def every_goal_reader_parked(rows: list[dict[str, Any]]) -> bool:
        return len([r for r in rows if r["stream_seq"] == ack.seq]) == 4

    rows = await until(
        lambda: parked_rows(system), every_goal_reader_parked, what="four parked copies"
    )
    assert {r["service"] for r in rows} == {"planner", "executor", "ledger", "tracer"}
    for row in rows:
        assert row["truncated"] is True and row["original_size"] == len(junk)
        assert len(row["data"].encode()) <= PARKED_DATA_MAX_BYTES + 3 * 1024  # U+FFFD for \0

    # The replay sends the original bytes, read from the goals stream by sequence.
    first = min(rows, key=lambda r: r["id"])
    replayed = await run_aos(system, "parked", "replay", str(first["id"]), "--json")
    assert replayed.returncode == 0, replayed.stderr
    new_seq = json.loads(replayed.stdout)["replayed_seq"]
    rows = await until(
        lambda: parked_rows(system),
        lambda rows: any(r["stream_seq"] == new_seq for r in rows),
        what="the replayed junk parked again",
    )
    assert all(r["original_size"] == len(junk) for r in rows)

    for row in rows:
        dropped = await run_aos(system, "parked", "drop", str(row["id"]))
        assert dropped.returncode == 0, dropped.stderr

    # What the consumers park of the replay may still be arriving: drop until none left.
    async def nothing_parked() -> list[dict[str, Any]]:
        for row in await parked_rows(system):
            await run_aos(system, "parked", "drop", str(row["id"]))
        return await parked_rows(system, "--all")

    remaining = await until(nothing_parked, lambda rows: len(rows) == 1, what="all dropped")
    assert remaining[0]["status"] == "replayed"  # the replayed one stays, as history
    assert await parked_in_stream(system) == 0
    gone = await run_aos(system, "parked", "show", str(rows[0]["id"]))
    assert gone.returncode == 2 and "unknown parked message" in gone.stderr
    bad = await run_aos(system, "parked", "drop", "0")
    assert bad.returncode == 2
