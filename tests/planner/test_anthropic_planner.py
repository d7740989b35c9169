"""AnthropicPlanner with the real anthropic SDK against a local Messages API."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import pytest
from anthropic import AsyncAnthropic

from aos_contracts import GoalSubmitted, PlanCreated, PlanRejected
from aos_contracts.failures import FailureCode
from aos_planner.anthropic_planner import AnthropicPlanner
from aos_planner.planning import decide
from tests.planner.scripted_messages_api import ScriptedMessagesApi, error, plan_call

GOOD_PLAN = {
    "steps": [
        {
            "id": "text",
            "skill": "json_transform",
            "params": {"op": "extract", "input": "${goal.inputs}", "path": "text"},
        },
        {
            "id": "summary",
            "skill": "llm_invoke",
            "depends_on": ["text"],
            "params": {"prompt": "Summarise: ${steps.text.output}", "max_tokens": 200},
        },
    ],
    "rationale": "extract, then summarise",
}
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


def goal(budget: int = 100) -> GoalSubmitted:
    return GoalSubmitted(
        run_id=uuid.uuid4(),
        tenant="acme",
        goal="summarize the notes",
        budget_cents=budget,
        inputs={"text": "AOS plans goals."},
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
    api.replies = [plan_call(GOOD_PLAN)]
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
    api.replies = [plan_call(UNKNOWN_SKILL), plan_call(GOOD_PLAN)]
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
    api.replies = [plan_call(partial, stop_reason="max_tokens"), plan_call(GOOD_PLAN)]
    events = await decide(goal(), planner(api))
    assert isinstance(events[-1], PlanCreated)
    feedback = api.requests[1]["messages"][-1]["content"]
    assert "cut off by max_tokens" in feedback


async def test_a_plan_over_budget_twice_is_rejected_as_budget_exceeded(
    api: ScriptedMessagesApi,
) -> None:
    api.replies = [plan_call(DEAR_PLAN), plan_call(DEAR_PLAN)]
    events = await decide(goal(budget=5), planner(api))
    rejected = events[-1]
    assert isinstance(rejected, PlanRejected)
    assert rejected.code is FailureCode.BUDGET_EXCEEDED
    assert "above the budget of 5" in rejected.reasons[-1]


async def test_an_api_failure_is_not_a_rejection_the_goal_is_retried_later(
    api: ScriptedMessagesApi,
) -> None:
    api.replies = [error(529, "overloaded_error", "Overloaded")]
    with pytest.raises(anthropic.APIStatusError):
        await decide(goal(), planner(api))
