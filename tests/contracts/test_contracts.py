"""The contracts: round trips, validation errors, generated files, upcasting."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import jsonschema
import pytest

from aos_contracts import (
    EVENT_TYPES,
    EventDecodeError,
    GoalSubmitted,
    RunAccepted,
    Upcasters,
    decode_event,
    encode_event,
)
from aos_contracts.generate import SCHEMA_DIR, render, stale_files


def goal(**overrides: object) -> GoalSubmitted:
    fields: dict[str, object] = {
        "run_id": uuid.uuid4(),
        "tenant": "acme",
        "goal": "summarize this",
        "budget_cents": 100,
    }
    fields.update(overrides)
    return GoalSubmitted.model_validate(fields)


def test_every_event_type_round_trips_through_bytes() -> None:
    original = goal(inputs={"text": "hello"})
    decoded = decode_event(encode_event(original))
    assert decoded == original


def test_derived_events_have_stable_ids_and_carry_the_correlation() -> None:
    cause = goal()
    first = cause.caused(RunAccepted, "accepted", goal="g", budget_cents=1, planner_backend="stub")
    again = cause.caused(RunAccepted, "accepted", goal="g", budget_cents=1, planner_backend="stub")
    assert first.event_id == again.event_id
    assert first.event_id != cause.event_id
    assert first.causation_id == cause.event_id
    assert first.correlation_id == cause.event_id


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"type": "goal.exploded"}', "invalid event"),
        (json.dumps({"type": "goal.submitted", "tenant": "acme"}).encode(), "run_id"),
    ],
)
def test_bad_bytes_are_refused_with_a_reason(payload: bytes, expected: str) -> None:
    with pytest.raises(EventDecodeError, match=expected):
        decode_event(payload)


@pytest.mark.parametrize("tenant", ["Acme", "a.b", "", "x" * 70, "a*"])
def test_tenant_must_be_a_single_safe_subject_token(tenant: str) -> None:
    with pytest.raises(ValueError, match="tenant"):
        goal(tenant=tenant)


def test_negative_budget_and_blank_goal_are_refused() -> None:
    with pytest.raises(ValueError, match="budget_cents"):
        goal(budget_cents=-1)
    with pytest.raises(ValueError, match="blank"):
        goal(goal="   ")


def test_checked_in_schemas_are_up_to_date() -> None:
    assert stale_files() == [], "run: make schemas"


def test_stale_detection_notices_a_changed_schema(tmp_path: Path) -> None:
    for name, content in render().items():
        (tmp_path / name).write_text(content)
    assert stale_files(tmp_path) == []
    (tmp_path / "goal.submitted.json").write_text("{}")
    assert stale_files(tmp_path) == ["goal.submitted.json"]


def test_every_event_type_has_a_schema_and_is_in_the_asyncapi_document() -> None:
    asyncapi = json.loads((SCHEMA_DIR / "asyncapi.json").read_text())
    messages = {message["name"] for message in asyncapi["components"]["messages"].values()}
    assert messages == set(EVENT_TYPES)
    for event_type in EVENT_TYPES:
        schema = json.loads((SCHEMA_DIR / f"{event_type}.json").read_text())
        assert schema["properties"]["type"]["const"] == event_type


def test_an_old_schema_version_is_upcast_before_validation() -> None:
    # Pretend goal.submitted v1 is current and a v0 payload called the budget "budget"
    # in dollars: the upcaster registered for v0 turns it into today's shape.
    upcasters = Upcasters()

    @upcasters.register("goal.submitted", from_version=0)
    def dollars_to_cents(raw: dict[str, object]) -> dict[str, object]:
        dollars = raw.pop("budget")
        assert isinstance(dollars, (int, float))
        raw["budget_cents"] = round(dollars * 100)
        return raw

    old = json.loads(encode_event(goal()))
    old["schema_version"] = 0
    old["budget"] = old.pop("budget_cents") / 100 + 2.5
    event = decode_event(json.dumps(old).encode(), upcasters)
    assert isinstance(event, GoalSubmitted)
    assert event.schema_version == 1
    assert event.budget_cents == 350


def test_an_old_version_without_an_upcaster_is_refused_clearly() -> None:
    old = json.loads(encode_event(goal()))
    old["schema_version"] = 0
    with pytest.raises(EventDecodeError, match="no upcaster"):
        decode_event(json.dumps(old).encode(), Upcasters())


def test_every_schema_requires_the_type_its_consumers_need() -> None:
    """`type` is the discriminator: a payload without it is parked by every service, so
    every published schema must say it is required."""
    for event_type in EVENT_TYPES:
        schema = json.loads((SCHEMA_DIR / f"{event_type}.json").read_text())
        assert "type" in schema["required"], event_type
    union = json.loads((SCHEMA_DIR / "event.json").read_text())
    for name, model in union["$defs"].items():
        if "type" in model.get("properties", {}):
            assert "type" in model["required"], name


def test_a_goal_of_only_the_schemas_required_fields_is_valid_and_decodes() -> None:
    """What a client written from goal.submitted.json alone sends (issue 15)."""
    schema = json.loads((SCHEMA_DIR / "goal.submitted.json").read_text())
    examples = {
        "type": "goal.submitted",
        "run_id": str(uuid.uuid4()),
        "tenant": "acme",
        "goal": "summarize the notes",
        "budget_cents": 20,
    }
    minimal = {name: examples[name] for name in schema["required"]}
    jsonschema.validate(minimal, schema)
    assert isinstance(decode_event(json.dumps(minimal).encode()), GoalSubmitted)
    without_type = {name: value for name, value in minimal.items() if name != "type"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(without_type, schema)
