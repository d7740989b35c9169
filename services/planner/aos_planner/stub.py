"""The stub planner: deterministic keyword rules. Same goal text, byte-identical plan.

Rules, tried in order (the first that matches wins):

1. `bench <N>` -> N chained json_transform steps over the goal's inputs (benchmarks).
2. `fetch <url> ... summari[sz]e` -> http_call GET <url>, json_transform extract of the
   body, then llm_invoke asking for a summary of it.
3. `fetch <url> ...` -> http_call GET <url>, then json_transform extract of the body.
4. `summari[sz]e ...` -> json_transform extract of `inputs.text`, then llm_invoke asking
   for a summary of it.
5. `extract <a>, <b> ... from <key>` -> json_transform pick of the named fields from
   `inputs.<key>` (or from the inputs themselves without `from`).
6. `call <METHOD> <url> [idempotent] [within <N>s]` -> one http_call of that method (a
   POST, PUT or PATCH sends the goal's inputs as JSON), declared idempotent if asked, with
   a step timeout of N seconds if given (fault tests: a step cut off mid-call).

A goal no rule matches is rejected, with the rules listed in the reason.

Asked again within a budget (a goal with `replan_within_budget` whose plan was estimated
above it), the stub lowers every llm_invoke step's `max_tokens` to the largest common
value that fits; when not even one token fits, the goal is rejected.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from aos_contracts.events import GoalSubmitted
from aos_contracts.failures import FailureCode
from aos_contracts.plans import Plan, PlanStep
from aos_contracts.skills import LlmInvokeParams
from aos_planner.backend import CallMeter, OverBudget, PlanningFailed
from aos_planner.planning import estimate_cents

Rule = tuple[str, re.Pattern[str], Callable[[re.Match[str], dict[str, Any]], Plan]]

MAX_BENCH_STEPS = 200


class NoRuleMatched(ValueError):
    pass


def _bench(match: re.Match[str], inputs: dict[str, Any]) -> Plan:
    count = max(1, min(int(match.group(1)), MAX_BENCH_STEPS))
    steps = [
        PlanStep(
            id="s1",
            skill="json_transform",
            params={"op": "omit", "input": "${goal.inputs}", "keys": ["_"]},
        )
    ]
    for index in range(2, count + 1):
        prev = f"s{index - 1}"
        steps.append(
            PlanStep(
                id=f"s{index}",
                skill="json_transform",
                params={"op": "omit", "input": f"${{steps.{prev}.output}}", "keys": ["_"]},
                depends_on=[prev],
            )
        )
    return Plan(steps=steps, rationale=f"benchmark: {count} chained json_transform steps")


def _fetch(match: re.Match[str], inputs: dict[str, Any]) -> Plan:
    url = match.group(1)
    return Plan(
        steps=[
            PlanStep(id="fetch", skill="http_call", params={"url": url, "method": "GET"}),
            PlanStep(
                id="body",
                skill="json_transform",
                params={"op": "extract", "input": "${steps.fetch.output}", "path": "body"},
                depends_on=["fetch"],
            ),
        ],
        rationale=f"fetch {url} and keep its body",
    )


def _fetch_and_summarise(match: re.Match[str], inputs: dict[str, Any]) -> Plan:
    fetched = _fetch(match, inputs)
    return Plan(
        steps=[
            *fetched.steps,
            PlanStep(
                id="summary",
                skill="llm_invoke",
                params={
                    "prompt": "Summarise in three sentences:\n\n${steps.body.output}",
                    "max_tokens": 300,
                },
                depends_on=["body"],
            ),
        ],
        rationale=f"{fetched.rationale}, then ask the model for a summary",
    )


def _summarise(match: re.Match[str], inputs: dict[str, Any]) -> Plan:
    return Plan(
        steps=[
            PlanStep(
                id="text",
                skill="json_transform",
                params={"op": "extract", "input": "${goal.inputs}", "path": "text"},
            ),
            PlanStep(
                id="summary",
                skill="llm_invoke",
                params={
                    "prompt": "Summarise in three sentences:\n\n${steps.text.output}",
                    "max_tokens": 300,
                },
                depends_on=["text"],
            ),
        ],
        rationale="extract the text, then ask the model for a summary",
    )


def _extract(match: re.Match[str], inputs: dict[str, Any]) -> Plan:
    fields = [
        name
        for name in re.split(r"[\s,]+", match.group(1))
        if name and name.lower() != "and" and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)
    ]
    source = f"${{goal.inputs.{match.group(2)}}}" if match.group(2) else "${goal.inputs}"
    return Plan(
        steps=[
            PlanStep(
                id="fields",
                skill="json_transform",
                params={"op": "pick", "input": source, "keys": fields},
            )
        ],
        rationale=f"keep only {', '.join(fields)}",
    )


def _call(match: re.Match[str], inputs: dict[str, Any]) -> Plan:
    method, url = match.group(1).upper(), match.group(2)
    params: dict[str, Any] = {"url": url, "method": method}
    if method in ("POST", "PUT", "PATCH"):
        params["json_body"] = "${goal.inputs}"
    if match.group(3):
        params["idempotent"] = True
    timeout_s = float(match.group(4)) if match.group(4) else None
    return Plan(
        steps=[PlanStep(id="call", skill="http_call", params=params, timeout_s=timeout_s)],
        rationale=f"{method} {url}",
    )


RULES: list[Rule] = [
    ("bench <N>", re.compile(r"^\s*bench\s+(\d{1,4})\b", re.IGNORECASE), _bench),
    (
        "fetch <url> ... summarize",
        re.compile(r"\bfetch\s+(https?://\S+).*\bsummari[sz]e\b", re.IGNORECASE | re.DOTALL),
        _fetch_and_summarise,
    ),
    ("fetch <url>", re.compile(r"\bfetch\s+(https?://\S+)", re.IGNORECASE), _fetch),
    ("summarise|summarize", re.compile(r"\bsummari[sz]e\b", re.IGNORECASE), _summarise),
    (
        "extract <fields> [from <key>]",
        re.compile(r"\bextract\s+(.+?)(?:\s+from\s+([a-z_][a-z0-9_]*))?\s*$", re.IGNORECASE),
        _extract,
    ),
    (
        "call <METHOD> <url> [idempotent] [within <N>s]",
        re.compile(
            r"\bcall\s+(GET|HEAD|POST|PUT|PATCH|DELETE|OPTIONS)\s+(https?://\S+)"
            r"(?:\s+(idempotent))?(?:\s+within\s+(\d{1,4})s)?",
            re.IGNORECASE,
        ),
        _call,
    ),
]


class StubPlanner:
    """Free and deterministic: it makes no model call, so it never touches the meter."""

    name = "stub"
    is_stub = True

    async def make_plan(
        self,
        goal: GoalSubmitted,
        meter: CallMeter | None = None,
        *,
        over_budget: OverBudget | None = None,
    ) -> Plan:
        try:
            plan = self.plan(goal.goal, goal.inputs)
        except NoRuleMatched as exc:
            raise PlanningFailed([str(exc)]) from exc
        if over_budget is None:
            return plan
        return within_budget(plan, over_budget.remaining_cents, goal.inputs)

    def plan(self, goal: str, inputs: dict[str, Any]) -> Plan:
        for _label, pattern, build in RULES:
            match = pattern.search(goal)
            if match:
                return build(match, inputs)
        labels = ", ".join(label for label, _, _ in RULES)
        raise NoRuleMatched(f"the stub planner has no rule for this goal (rules: {labels})")


def within_budget(plan: Plan, budget_cents: int, inputs: dict[str, Any] | None = None) -> Plan:
    """The plan with every llm_invoke's max_tokens lowered to the largest common value
    whose worst case (from the goal's `inputs`) fits `budget_cents` (a binary search: the
    estimate grows with it)."""

    def capped(limit: int) -> Plan:
        steps = [
            step.model_copy(
                update={"params": {**step.params, "max_tokens": min(limit, _max_tokens(step))}}
            )
            if step.skill == "llm_invoke"
            else step
            for step in plan.steps
        ]
        return plan.model_copy(update={"steps": steps})

    highest = max((_max_tokens(s) for s in plan.steps if s.skill == "llm_invoke"), default=0)
    if highest == 0 or estimate_cents(capped(1), inputs) > budget_cents:
        raise PlanningFailed(
            [f"no stub plan for this goal fits in {budget_cents} cents"],
            FailureCode.BUDGET_EXCEEDED,
        )
    low, high = 1, highest  # capped(low) fits
    while low < high:
        middle = (low + high + 1) // 2
        if estimate_cents(capped(middle), inputs) <= budget_cents:
            low = middle
        else:
            high = middle - 1
    fitted = capped(low)
    return fitted.model_copy(
        update={"rationale": f"{plan.rationale} (max_tokens {low}, to fit {budget_cents} cents)"}
    )


def _max_tokens(step: PlanStep) -> int:
    value = step.params.get("max_tokens", LlmInvokeParams.model_fields["max_tokens"].default)
    return int(value)
