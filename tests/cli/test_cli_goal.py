"""The goal the CLI publishes: its ids and its idempotency key."""

from __future__ import annotations

from aos_cli.client import build_goal, redact
from aos_contracts.codec import HEADER_MSG_ID, event_headers


def test_a_key_travels_in_the_goal_and_derives_no_id_another_tenant_could_compute() -> None:
    """Idempotency is the planner's, per tenant (one run per tenant and key): a run id or
    Nats-Msg-Id derived from the key could be published first by another tenant."""
    first = build_goal("bench 2", tenant="acme", budget_cents=5, idempotency_key="order-1")
    again = build_goal("bench 2", tenant="acme", budget_cents=5, idempotency_key="order-1")
    assert first.idempotency_key == again.idempotency_key == "order-1"
    assert first.run_id != again.run_id
    assert event_headers(first)[HEADER_MSG_ID] != event_headers(again)[HEADER_MSG_ID]


def test_without_a_key_every_submission_is_a_new_run() -> None:
    first = build_goal("bench 2", tenant="acme", budget_cents=5)
    again = build_goal("bench 2", tenant="acme", budget_cents=5)
    assert first.run_id != again.run_id
    assert first.event_id != again.event_id


def test_redact_hides_only_the_password() -> None:
    assert redact("nats://me:pw@host:4222") == "nats://me:***@host:4222"
    assert redact("nats://host:4222") == "nats://host:4222"


def test_replan_and_reuse_travel_on_the_goal() -> None:
    earlier = build_goal("bench 2", tenant="acme", budget_cents=5)
    goal = build_goal(
        "bench 2",
        tenant="acme",
        budget_cents=5,
        replan_within_budget=True,
        reuse_plan_of=earlier.run_id,
    )
    assert goal.replan_within_budget is True
    assert goal.reuse_plan_of == earlier.run_id
    plain = build_goal("bench 2", tenant="acme", budget_cents=5)
    assert (plain.replan_within_budget, plain.reuse_plan_of) == (False, None)
