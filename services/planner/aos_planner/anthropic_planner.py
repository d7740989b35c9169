"""The Anthropic planner: Claude proposes a plan through tool use; AOS validates it.

The skills and their input schemas are described to Claude, and one tool,
`submit_plan`, takes the plan; `tool_choice` forces the reply to be that call. The reply
is parsed into a Plan and validated like any plan (skills, params, references, cycles,
budget). An unparseable or invalid reply — or one cut off by `max_tokens` — gets one
repair attempt: the errors go back to Claude as the tool's error result. If the second
reply is no better, the goal is rejected with every reason.

Errors of the API itself (connection, 5xx, rate limits after the SDK's own retries)
are not rejections: they propagate, so the goal is redelivered and planned later.
"""

from __future__ import annotations

import json
from typing import cast

from anthropic import AsyncAnthropic
from anthropic.types import Message, MessageParam, ToolChoiceToolParam, ToolParam, ToolUseBlock
from pydantic import ValidationError

from aos_contracts.events import GoalSubmitted
from aos_contracts.failures import FailureCode
from aos_contracts.plans import Plan
from aos_contracts.skills import SKILL_CONTRACTS, llm_cost_cents
from aos_planner.backend import PlanningFailed
from aos_planner.planning import budget_problem, validation_problems

PLAN_TOOL = "submit_plan"
REPAIR_ATTEMPTS = 1


def _skills_description() -> str:
    lines = []
    for contract in SKILL_CONTRACTS.values():
        schema = contract.params_model.model_json_schema()
        lines.append(
            f"- {contract.name} (v{contract.version}, {contract.side_effect.value}): "
            f"{contract.description}. params schema: {json.dumps(schema, sort_keys=True)}"
        )
    return "\n".join(lines)


SYSTEM_PROMPT = f"""You plan work for AOS. Turn the user's goal into a plan: a list of
steps, each calling one skill with params. Steps may depend on earlier steps
(depends_on); a param value may reference an earlier step's output as
"${{steps.<id>.output.<path>}}" (the step must be in depends_on) or the goal's inputs as
"${{goal.inputs.<path>}}". Use as few steps as the goal needs, and stay within the budget
in cents (each llm_invoke may cost up to its max_tokens at the model's output price).
Step ids are lowercase words. Answer only by calling the {PLAN_TOOL} tool.

Skills:
{_skills_description()}
"""

PLAN_TOOL_DEFINITION: ToolParam = {
    "name": PLAN_TOOL,
    "description": "Submit the plan for the goal.",
    "input_schema": Plan.model_json_schema(),
}


class AnthropicPlanner:
    name = "anthropic"
    is_stub = False

    def __init__(self, client: AsyncAnthropic, *, model: str, max_tokens: int) -> None:
        self.client = client
        self.model = model
        self.max_tokens = max_tokens
        self.spent_cents = 0  # what planning calls cost, from reported usage

    async def make_plan(self, goal: GoalSubmitted) -> Plan:
        messages: list[MessageParam] = [{"role": "user", "content": _goal_prompt(goal)}]
        tool_choice: ToolChoiceToolParam = {"type": "tool", "name": PLAN_TOOL}
        problems: list[str] = []
        for attempt in range(1 + REPAIR_ATTEMPTS):
            reply = await self.client.messages.create(
                model=self.model,
                max_tokens=self.max_tokens,
                system=SYSTEM_PROMPT,
                tools=[PLAN_TOOL_DEFINITION],
                tool_choice=tool_choice,
                messages=messages,
            )
            self.spent_cents += llm_cost_cents(
                self.model, reply.usage.input_tokens, reply.usage.output_tokens
            )
            plan, problems, tool_use = _read_reply(reply, goal)
            if plan is not None:
                return plan
            if attempt == REPAIR_ATTEMPTS:
                break
            messages += _repair_turn(reply, tool_use, problems)
        code = (
            FailureCode.BUDGET_EXCEEDED
            if problems and all("above the budget" in problem for problem in problems)
            else FailureCode.PLAN_INVALID
        )
        raise PlanningFailed(
            [f"the model's plan was invalid after {1 + REPAIR_ATTEMPTS} attempts", *problems], code
        )


def _goal_prompt(goal: GoalSubmitted) -> str:
    inputs = json.dumps(goal.inputs, sort_keys=True)[:4000]
    return f"Goal: {goal.goal}\nBudget: {goal.budget_cents} cents\nInputs (JSON): {inputs}"


def _read_reply(
    reply: Message, goal: GoalSubmitted
) -> tuple[Plan | None, list[str], ToolUseBlock | None]:
    tool_use = next((block for block in reply.content if isinstance(block, ToolUseBlock)), None)
    if reply.stop_reason == "max_tokens":
        return None, ["the reply was cut off by max_tokens before the plan was complete"], tool_use
    if tool_use is None or tool_use.name != PLAN_TOOL:
        return None, [f"the reply did not call {PLAN_TOOL}"], tool_use
    try:
        plan = Plan.model_validate(tool_use.input)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(part) for part in error['loc']) or 'plan'}: {error['msg']}"
            for error in exc.errors()[:10]
        ]
        return None, problems, tool_use
    problems = validation_problems(plan)
    over_budget = None if problems else budget_problem(plan, goal.budget_cents)
    if over_budget:
        problems = [over_budget]
    return (None if problems else plan), problems, tool_use


def _repair_turn(
    reply: Message, tool_use: ToolUseBlock | None, problems: list[str]
) -> list[MessageParam]:
    feedback = "The plan is not valid:\n" + "\n".join(f"- {p}" for p in problems)
    feedback += f"\nCall {PLAN_TOOL} again with a corrected plan."
    if tool_use is not None and reply.stop_reason != "max_tokens":
        assistant = {
            "role": "assistant",
            "content": [block.model_dump(exclude_none=True) for block in reply.content],
        }
        result = {"type": "tool_result", "tool_use_id": tool_use.id, "is_error": True}
        user = {"role": "user", "content": [{**result, "content": feedback}]}
        return [cast(MessageParam, assistant), cast(MessageParam, user)]
    # A reply cut off mid-call (or with no call) cannot be answered with a tool result:
    # a short stand-in for it, then what went wrong.
    return [
        {"role": "assistant", "content": "(an incomplete reply)"},
        {"role": "user", "content": feedback},
    ]
