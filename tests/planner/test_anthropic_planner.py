"""AnthropicPlanner with the real anthropic SDK against a local Messages API."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anthropic
import pytest
from anthropic import AsyncAnthropic

from aos_contracts import GoalSubmitted, PlanCreated, PlanRejected
from aos_contracts.events import StepTelemetry
from aos_contracts.failures import FailureCode
from aos_planner.anthropic_planner import AnthropicPlanner
from aos_planner.backend import CallOutcome, PlanningFailed
from aos_planner.planning import Planned, Refused, decide, plan_goal
from tests.planner.scripted_messages_api import (
    SUMMARY_PLAN,
    ScriptedMessagesApi,
    error,
    plan_call,
)

UNKNOWN_SKILL = {"steps": [{"id": "a", "skill": "teleport", "params": {}}]}
DEAR_PLAN = {
    "steps": [
        {
            "id": "essay",
            "skill": "llm_invoke",
            "params": {"prompt": "write", "max_tokens": 60000, "model": "claude-opus-4-1"},
        }
    ]
}


def goal(budget: int = 100, *, replan: bool = False) -> GoalSubmitted:
    return GoalSubmitted(
        run_id=uuid.uuid4(),
        tenant="acme",
        goal="summarize the notes",
        budget_cents=budget,
        inputs={"text": "AOS plans goals."},
        replan_within_budget=replan,
    )


@pytest.fixture
async def api() -> AsyncIterator[ScriptedMessagesApi]:
    server = await ScriptedMessagesApi(replies=[]).start()
    try:
        yield server
    finally:
        await server.stop()


def planner(api: ScriptedMessagesApi) -> AnthropicPlanner:
    client = AsyncAnthropic(api_key="test-key", base_url=api.base_url, max_retries=0)
    return AnthropicPlanner(client, model="claude-sonnet-4-6", max_tokens=1024)


async def test_a_valid_plan_is_accepted_and_the_skills_are_offered_as_a_forced_tool(
    api: ScriptedMessagesApi,
) -> None:
    api.replies = [plan_call(SUMMARY_PLAN)]
    events = await decide(goal(), planner(api))
    created = events[-1]
    assert isinstance(created, PlanCreated)
    assert [step.skill for step in created.plan.steps] == ["json_transform", "llm_invoke"]
    (request,) = api.requests
    assert request["tool_choice"] == {"type": "tool", "name": "submit_plan"}
    assert request["tools"][0]["name"] == "submit_plan"
    assert "llm_invoke" in request["system"] and "json_transform" in request["system"]
    assert "summarize the notes" in request["messages"][0]["content"]


async def test_an_invalid_plan_gets_one_repair_with_the_errors(api: ScriptedMessagesApi) -> None:
    api.replies = [plan_call(UNKNOWN_SKILL), plan_call(SUMMARY_PLAN)]
    events = await decide(goal(), planner(api))
    assert isinstance(events[-1], PlanCreated)
    repair = api.requests[1]["messages"]
    tool_result = repair[-1]["content"][0]
    assert tool_result["type"] == "tool_result" and tool_result["is_error"] is True
    assert "unknown skill 'teleport'" in tool_result["content"]
    assert repair[-2]["role"] == "assistant"


async def test_a_plan_invalid_twice_is_rejected_with_every_reason(
    api: ScriptedMessagesApi,
) -> None:
    api.replies = [plan_call(UNKNOWN_SKILL), plan_call({"steps": []})]
    events = await decide(goal(), planner(api))
    rejected = events[-1]
    assert isinstance(rejected, PlanRejected)
    assert rejected.code is FailureCode.PLAN_INVALID
    assert "invalid after 2 attempts" in rejected.reasons[0]
    assert any("steps" in reason for reason in rejected.reasons[1:])
    assert len(api.requests) == 2


async def test_a_reply_cut_off_by_max_tokens_is_repaired(api: ScriptedMessagesApi) -> None:
    partial: dict[str, Any] = {"steps": [{"id": "text", "skill": "json_transform"}]}
    api.replies = [plan_call(partial, stop_reason="max_tokens"), plan_call(SUMMARY_PLAN)]
    events = await decide(goal(), planner(api))
    assert isinstance(events[-1], PlanCreated)
    feedback = api.requests[1]["messages"][-1]["content"]
    assert "cut off by max_tokens" in feedback


async def test_a_plan_over_budget_is_rejected_after_one_call_and_its_cost_is_counted(
    api: ScriptedMessagesApi,
) -> None:
    api.replies = [plan_call(DEAR_PLAN)]
    events = await decide(goal(budget=5), planner(api))
    rejected = events[-1]
    assert isinstance(rejected, PlanRejected)
    assert rejected.code is FailureCode.BUDGET_EXCEEDED
    # 900 input and 120 output tokens at claude-sonnet-4-6's price: 1 cent.
    assert rejected.planning_cost_cents == 1
    assert (
        "above the 4 cents left of the budget of 5 after planning cost 1" in (rejected.reasons[0])
    )
    assert len(api.requests) == 1  # over budget is not an invalid plan: no repair


async def test_a_goal_that_allows_it_is_planned_again_with_the_budget_stated(
    api: ScriptedMessagesApi,
) -> None:
    api.replies = [plan_call(DEAR_PLAN), plan_call(SUMMARY_PLAN)]
    events = await decide(goal(budget=5, replan=True), planner(api))
    created = events[-1]
    assert isinstance(created, PlanCreated)
    assert created.replanned is True
    assert created.planning_cost_cents == 2
    assert [step.id for step in created.plan.steps] == ["text", "summary"]
    second = api.requests[1]["messages"][0]["content"]
    assert "above the 4 cents the run has left" in second
    assert "Plan again within 4 cents" in second and '"essay"' in second


async def test_a_plan_over_budget_twice_is_rejected_with_both_estimates(
    api: ScriptedMessagesApi,
) -> None:
    api.replies = [plan_call(DEAR_PLAN), plan_call(DEAR_PLAN)]
    events = await decide(goal(budget=5, replan=True), planner(api))
    rejected = events[-1]
    assert isinstance(rejected, PlanRejected)
    assert rejected.code is FailureCode.BUDGET_EXCEEDED
    assert rejected.planning_cost_cents == 2
    assert len(rejected.reasons) == 2 and len(api.requests) == 2
    assert "after planning cost 1" in rejected.reasons[0]
    assert rejected.reasons[1].startswith("asked again within the budget: plan is estimated")


@dataclass
class RecordingMeter:
    """A CallMeter that records every call and refuses those above `allow_cents`."""

    allow_cents: int = 1_000_000
    spent_cents: int = 0
    reserved: list[int] = field(default_factory=list)
    finished: list[tuple[str, int, StepTelemetry | None]] = field(default_factory=list)

    async def before_call(self, worst_case_cents: int, model: str | None) -> None:
        if worst_case_cents > self.allow_cents:
            raise PlanningFailed(["refused by the test"], FailureCode.BUDGET_EXCEEDED)
        self.reserved.append(worst_case_cents)

    async def after_call(
        self,
        cost_cents: int,
        *,
        outcome: CallOutcome,
        duration_ms: float,
        telemetry: StepTelemetry | None = None,
    ) -> None:
        self.spent_cents += cost_cents
        self.finished.append((outcome, cost_cents, telemetry))


async def test_every_call_is_reserved_for_its_worst_case_before_and_charged_after(
    api: ScriptedMessagesApi,
) -> None:
    api.replies = [plan_call(UNKNOWN_SKILL), plan_call(SUMMARY_PLAN)]
    meter = RecordingMeter()
    outcome = await plan_goal(goal(), planner(api), meter)
    assert isinstance(outcome, Planned) and outcome.planning_cost_cents == 2
    # max_tokens 1024 at 1500 cents per million output tokens is 1.5 cents, plus input.
    assert len(meter.reserved) == 2 and all(2 <= cents <= 5 for cents in meter.reserved)
    assert meter.reserved[1] >= meter.reserved[0]  # the repair turn makes a longer prompt
    assert [(outcome, cost) for outcome, cost, _ in meter.finished] == [
        ("invalid", 1),
        ("plan", 1),
    ]
    telemetry = meter.finished[0][2]
    assert telemetry is not None
    assert (telemetry.backend, telemetry.model) == ("claude", "claude-sonnet-4-6")
    assert (telemetry.input_tokens, telemetry.output_tokens) == (900, 120)


async def test_a_call_the_budget_refuses_is_never_made(api: ScriptedMessagesApi) -> None:
    api.replies = [plan_call(SUMMARY_PLAN)]
    outcome = await plan_goal(goal(), planner(api), RecordingMeter(allow_cents=1))
    assert isinstance(outcome, Refused)
    assert outcome.code is FailureCode.BUDGET_EXCEEDED
    assert outcome.planning_cost_cents == 0
    assert api.requests == []


async def test_a_failed_call_releases_its_reservation_and_costs_nothing(
    api: ScriptedMessagesApi,
) -> None:
    api.replies = [error(529, "overloaded_error", "Overloaded")]
    meter = RecordingMeter()
    with pytest.raises(anthropic.APIStatusError):
        await plan_goal(goal(), planner(api), meter)
    assert [(outcome, cost) for outcome, cost, _ in meter.finished] == [("error", 0)]


async def test_an_api_failure_is_not_a_rejection_the_goal_is_retried_later(
    api: ScriptedMessagesApi,
) -> None:
    api.replies = [error(529, "overloaded_error", "Overloaded")]
    with pytest.raises(anthropic.APIStatusError):
        await decide(goal(), planner(api))


async def test_a_dated_model_is_reserved_and_charged_at_its_own_price(
    api: ScriptedMessagesApi,
) -> None:
    api.replies = [plan_call(SUMMARY_PLAN)]
    client = AsyncAnthropic(api_key="test-key", base_url=api.base_url, max_retries=0)
    dated = AnthropicPlanner(client, model="claude-haiku-4-5-20251001", max_tokens=10_000)
    undated = AnthropicPlanner(client, model="claude-haiku-4-5", max_tokens=10_000)
    meter = RecordingMeter()
    outcome = await plan_goal(goal(), dated, meter)
    assert isinstance(outcome, Planned)
    (reserved,) = meter.reserved
    assert reserved == undated.worst_case_cents(api.requests[0]["messages"])
    assert reserved < 10  # 10 000 output tokens at haiku's 500 cents per MTok: 5, + input
    # 900 input and 120 output tokens at haiku's price: 0.15 cents, so 1 (the dearest: 3).
    ((_, charged, _),) = meter.finished
    assert charged == 1


# Fails the Plan schema (an id with capitals, an unknown field) and, besides, names a skill
# that does not exist and an input the goal does not have.
SCHEMA_AND_MORE: dict[str, Any] = {
    "steps": [
        {"id": "Fetch", "skill": "teleport", "params": {}},
        {
            "id": "summary",
            "skill": "llm_invoke",
            "params": {"prompt": "Summarise ${goal.inputs.body}"},
            "colour": "blue",
        },
    ]
}


async def test_a_plan_failing_the_schema_is_repaired_with_every_reason(
    api: ScriptedMessagesApi,
) -> None:
    api.replies = [plan_call(SCHEMA_AND_MORE), plan_call(SUMMARY_PLAN)]
    events = await decide(goal(), planner(api))
    assert isinstance(events[-1], PlanCreated)
    feedback = api.requests[1]["messages"][-1]["content"][0]["content"]
    assert "steps.0.id: String should match pattern" in feedback
    assert "steps.1.colour: Extra inputs are not permitted" in feedback
    assert "step 'Fetch': unknown skill 'teleport'" in feedback
    assert "${goal.inputs.body} needs the goal input 'body', which is missing" in feedback


async def test_a_plan_failing_the_schema_twice_is_rejected_with_every_reason(
    api: ScriptedMessagesApi,
) -> None:
    api.replies = [plan_call(SCHEMA_AND_MORE), plan_call(SCHEMA_AND_MORE)]
    rejected = (await decide(goal(), planner(api)))[-1]
    assert isinstance(rejected, PlanRejected)
    assert rejected.code is FailureCode.PLAN_INVALID
    reasons = rejected.reasons[1:]
    assert any(reason.startswith("steps.0.id:") for reason in reasons)
    assert "step 'Fetch': unknown skill 'teleport'" in reasons
    assert any("needs the goal input 'body'" in reason for reason in reasons)


async def test_a_plan_naming_a_missing_input_is_repaired_with_it(
    api: ScriptedMessagesApi,
) -> None:
    wrong_input = {
        "steps": [
            {"id": "summary", "skill": "llm_invoke", "params": {"prompt": "${goal.inputs.txt}"}}
        ]
    }
    api.replies = [plan_call(wrong_input), plan_call(SUMMARY_PLAN)]
    assert isinstance((await decide(goal(), planner(api)))[-1], PlanCreated)
    feedback = api.requests[1]["messages"][-1]["content"][0]["content"]
    assert "needs the goal input 'txt', which is missing (the goal's inputs: text)" in feedback
