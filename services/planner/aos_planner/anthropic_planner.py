"""The Anthropic planner: Claude proposes a plan through tool use; AOS validates it.

The skills and their input schemas are described to Claude, and one tool,
`submit_plan`, takes the plan; `tool_choice` forces the reply to be that call. The reply
is parsed into a Plan and validated like any plan (skills, params, references, cycles,
the goal's inputs). A reply that fails the Plan schema is read as far as it can be, so
its every problem is listed, not only the schema's. An unparseable or invalid reply —
or one cut off by `max_tokens` — gets one repair attempt: the errors go back to Claude
as the tool's error result. If the second reply is no better, the goal is rejected with
every reason.

Each call is metered (`CallMeter`): in the service, reserved on the ledger for its worst
case before it is made and charged to the run after. Whether the plan fits the budget
is judged by `decide`, against what the run has left once planning is paid for.

Errors of the API itself (connection, 5xx, rate limits after the SDK's own retries)
are not rejections: they propagate, so the goal is redelivered and planned later.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any, cast

import anthropic
from anthropic import AsyncAnthropic
from anthropic.types import Message, MessageParam, ToolChoiceToolParam, ToolParam, ToolUseBlock

from aos_contracts.events import GoalSubmitted, StepTelemetry
from aos_contracts.failures import FailureCode
from aos_contracts.plans import DEFAULT_PLAN_LIMITS, Plan, PlanLimits
from aos_contracts.skills import SKILL_CONTRACTS, estimate_input_tokens, llm_cost_cents
from aos_planner.backend import CallMeter, OverBudget, PlanningFailed, Unmetered
from aos_planner.planning import read_plan

PLAN_TOOL = "submit_plan"
REPAIR_ATTEMPTS = 1


def _skills_description() -> str:
    lines = []
    for contract in SKILL_CONTRACTS.values():
        schema = contract.params_model.model_json_schema()
        fields = contract.output_fields
        output = ", ".join(sorted(fields)) if fields is not None else "any JSON"
        lines.append(
            f"- {contract.name} (v{contract.version}, {contract.side_effect.value}): "
            f"{contract.description}. params schema: {json.dumps(schema, sort_keys=True)}. "
            f"output fields: {output}"
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
PLAN_TOOL_CHOICE: ToolChoiceToolParam = {"type": "tool", "name": PLAN_TOOL}


class AnthropicPlanner:
    name = "anthropic"
    is_stub = False

    def __init__(
        self,
        client: AsyncAnthropic,
        *,
        model: str,
        max_tokens: int,
        limits: PlanLimits = DEFAULT_PLAN_LIMITS,
    ) -> None:
        self.client = client
        self.model = model
        self.max_tokens = max_tokens
        self.limits = limits
        self._fixed_prompt_chars = len(SYSTEM_PROMPT) + len(json.dumps(PLAN_TOOL_DEFINITION))

    def worst_case_cents(self, messages: list[MessageParam]) -> int:
        """What one call may cost at most: the prompt's estimated tokens, and every allowed
        output token, at the model's price (`llm_price`: a dated id by its prefix, an unknown
        model at the dearest price)."""
        chars = self._fixed_prompt_chars + len(json.dumps(messages, default=str))
        return llm_cost_cents(self.model, estimate_input_tokens("x" * chars), self.max_tokens)

    async def make_plan(
        self,
        goal: GoalSubmitted,
        meter: CallMeter | None = None,
        *,
        over_budget: OverBudget | None = None,
    ) -> Plan:
        meter = meter or Unmetered()
        messages: list[MessageParam] = [
            {"role": "user", "content": _goal_prompt(goal, over_budget)}
        ]
        problems: list[str] = []
        for attempt in range(1 + REPAIR_ATTEMPTS):
            reply, (plan, problems, tool_use) = await self._call(messages, meter, goal.inputs)
            if plan is not None:
                return plan
            if attempt == REPAIR_ATTEMPTS:
                break
            messages += _repair_turn(reply, tool_use, problems)
        raise PlanningFailed(
            [f"the model's plan was invalid after {1 + REPAIR_ATTEMPTS} attempts", *problems],
            FailureCode.PLAN_INVALID,
        )

    async def _call(
        self, messages: list[MessageParam], meter: CallMeter, inputs: dict[str, Any]
    ) -> tuple[Message, tuple[Plan | None, list[str], ToolUseBlock | None]]:
        """One metered call, and what its reply holds: the call is reserved before, and
        its cost (from reported usage) reported after, with whether it held a plan."""
        worst_case = self.worst_case_cents(messages)
        await meter.before_call(worst_case, self.model)
        started = time.perf_counter()
        try:
            reply = await self.client.messages.create(
                model=self.model,
                max_tokens=self.max_tokens,
                system=SYSTEM_PROMPT,
                tools=[PLAN_TOOL_DEFINITION],
                tool_choice=PLAN_TOOL_CHOICE,
                messages=messages,
            )
        except Exception as exc:
            # An error answer (4xx, 5xx, overloaded) is not billed: the call costs 0. A
            # timeout may have been processed and billed all the same: its worst case.
            # The reservation is closed now rather than left to expire; if even that
            # fails, the next attempt at the goal closes it, at its worst case (metering.py).
            cost = worst_case if isinstance(exc, anthropic.APITimeoutError) else 0
            with contextlib.suppress(Exception):
                await meter.after_call(
                    cost, outcome="error", duration_ms=_since_ms(started), telemetry=None
                )
            raise
        usage = reply.usage
        # Priced by the model asked for, like the reservation (the reply may name a dated
        # id of it; `llm_price` prices both alike), cache tokens included.
        cost = llm_cost_cents(
            self.model,
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_creation_input_tokens or 0,
            usage.cache_read_input_tokens or 0,
        )
        read = _read_reply(reply, self.limits, inputs)
        await meter.after_call(
            cost,
            outcome="plan" if read[0] is not None else "invalid",
            duration_ms=_since_ms(started),
            telemetry=StepTelemetry(
                backend="claude",
                calls=1,
                model=reply.model,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cache_creation_input_tokens=usage.cache_creation_input_tokens,
                cache_read_input_tokens=usage.cache_read_input_tokens,
            ),
        )
        return reply, read


def _since_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def _goal_prompt(goal: GoalSubmitted, over_budget: OverBudget | None) -> str:
    inputs = json.dumps(goal.inputs, sort_keys=True)[:4000]
    prompt = f"Goal: {goal.goal}\nBudget: {goal.budget_cents} cents\nInputs (JSON): {inputs}"
    if over_budget is not None:
        previous = over_budget.plan.model_dump_json(exclude_defaults=True)[:4000]
        prompt += (
            f"\n\nA previous plan for this goal was estimated at {over_budget.estimated_cents}"
            f" cents, above the {over_budget.remaining_cents} cents the run has left for its"
            f" steps. Plan again within {over_budget.remaining_cents} cents: fewer or cheaper"
            f" steps, a smaller max_tokens or a cheaper model.\nThe previous plan: {previous}"
        )
    return prompt


def _read_reply(
    reply: Message, limits: PlanLimits, inputs: dict[str, Any]
) -> tuple[Plan | None, list[str], ToolUseBlock | None]:
    """The plan in the reply if it is valid; otherwise every reason it is not (the
    schema's errors and everything else: `read_plan`). The budget is not judged here:
    `decide` does that, against what the run has left after planning."""
    tool_use = next((block for block in reply.content if isinstance(block, ToolUseBlock)), None)
    if reply.stop_reason == "max_tokens":
        return None, ["the reply was cut off by max_tokens before the plan was complete"], tool_use
    if tool_use is None or tool_use.name != PLAN_TOOL:
        return None, [f"the reply did not call {PLAN_TOOL}"], tool_use
    plan, problems = read_plan(tool_use.input, limits, inputs)
    return plan, problems, tool_use


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
