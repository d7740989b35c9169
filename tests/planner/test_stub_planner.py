"""The stub planner and the planner's decision (pure)."""

from __future__ import annotations

import uuid

import pytest

from aos_contracts import GoalSubmitted, PlanCreated, PlanRejected, RunAccepted
from aos_contracts.failures import FailureCode
from aos_contracts.plans import Plan, PlanStep, plan_problems
from aos_contracts.skills import SKILL_CONTRACTS
from aos_planner.backend import PlanningFailed
from aos_planner.planning import decide, estimate_cents, param_problems
from aos_planner.stub import StubPlanner, within_budget


def goal(goal_text: str, budget: int = 100, **inputs: object) -> GoalSubmitted:
    return GoalSubmitted(
        run_id=uuid.uuid4(), tenant="acme", goal=goal_text, budget_cents=budget, inputs=inputs
    )


def test_the_same_goal_gives_a_byte_identical_plan() -> None:
    planner = StubPlanner()
    first = planner.plan("summarize the notes", {"text": "x"}).model_dump_json()
    again = planner.plan("summarize the notes", {"text": "x"}).model_dump_json()
    assert first == again


@pytest.mark.parametrize(
    ("text", "skills"),
    [
        ("bench 3", ["json_transform"] * 3),
        ("please fetch https://example.com/a.json now", ["http_call", "json_transform"]),
        (
            "fetch https://example.com/notes and summarize them",
            ["http_call", "json_transform", "llm_invoke"],
        ),
        ("Summarise the release notes", ["json_transform", "llm_invoke"]),
        ("extract name, email from user", ["json_transform"]),
    ],
)
def test_each_rule_gives_its_documented_plan(text: str, skills: list[str]) -> None:
    plan = StubPlanner().plan(text, {})
    assert [step.skill for step in plan.steps] == skills
    assert plan_problems(plan, set(SKILL_CONTRACTS)) == []
    assert param_problems(plan) == []


async def test_accepted_goal_gets_run_accepted_then_plan_created_with_derived_ids() -> None:
    submitted = goal("summarize it", text="hello")
    events = await decide(submitted, StubPlanner())
    assert [type(event) for event in events] == [RunAccepted, PlanCreated]
    assert all(event.causation_id == submitted.event_id for event in events)
    assert [e.event_id for e in events] == [
        e.event_id for e in await decide(submitted, StubPlanner())
    ]
    created = events[1]
    assert isinstance(created, PlanCreated)
    assert created.budget_cents == 100
    assert created.inputs == {"text": "hello"}
    assert created.estimated_cents == estimate_cents(created.plan, created.inputs) > 0


async def test_a_goal_no_rule_matches_is_rejected_with_the_rules_listed() -> None:
    events = await decide(goal("make me a sandwich"), StubPlanner())
    rejected = events[-1]
    assert isinstance(rejected, PlanRejected)
    assert rejected.code is FailureCode.PLAN_INVALID
    assert "bench <N>" in rejected.reasons[0]


async def test_a_plan_estimated_above_the_budget_never_starts() -> None:
    events = await decide(goal("summarize it", budget=0, text="x"), StubPlanner())
    rejected = events[-1]
    assert isinstance(rejected, PlanRejected)
    assert rejected.code is FailureCode.BUDGET_EXCEEDED
    assert "above the budget of 0" in rejected.reasons[0]


def test_plan_problems_lists_every_reason() -> None:
    plan = Plan(
        steps=[
            PlanStep(id="a", skill="teleport", params={}),
            PlanStep(
                id="b",
                skill="json_transform",
                params={"op": "extract", "input": "${steps.a.output}"},
            ),
            PlanStep(id="c", skill="json_transform", params={"op": "pick"}, depends_on=["zz"]),
        ]
    )
    problems = plan_problems(plan, set(SKILL_CONTRACTS))
    assert any("unknown skill 'teleport'" in p for p in problems)
    assert any("not in depends_on" in p for p in problems)
    assert any("unknown step 'zz'" in p for p in problems)


def test_a_cycle_is_a_problem() -> None:
    plan = Plan(
        steps=[
            PlanStep(
                id="a",
                skill="json_transform",
                params={"op": "merge", "inputs": []},
                depends_on=["b"],
            ),
            PlanStep(
                id="b",
                skill="json_transform",
                params={"op": "merge", "inputs": []},
                depends_on=["a"],
            ),
        ]
    )
    assert plan_problems(plan, set(SKILL_CONTRACTS)) == ["plan has a dependency cycle"]


def test_param_problems_names_unknown_and_missing_params() -> None:
    plan = Plan(steps=[PlanStep(id="a", skill="llm_invoke", params={"promt": "hi"})])
    problems = param_problems(plan)
    assert any("has no params ['promt']" in p for p in problems)
    assert any("needs params ['prompt']" in p for p in problems)


def test_extract_picks_the_named_fields_from_the_named_input() -> None:
    plan = StubPlanner().plan("extract name, email and id from user", {})
    (step,) = plan.steps
    assert step.params == {
        "op": "pick",
        "input": "${goal.inputs.user}",
        "keys": ["name", "email", "id"],
    }


def dear_plan(max_tokens: int) -> Plan:
    return Plan(
        steps=[
            PlanStep(id="a", skill="llm_invoke", params={"prompt": "write", "max_tokens": 200}),
            PlanStep(
                id="b",
                skill="llm_invoke",
                params={"prompt": "more", "model": "claude-opus-4-1", "max_tokens": max_tokens},
            ),
        ]
    )


def test_within_budget_lowers_max_tokens_to_the_largest_value_that_fits() -> None:
    plan = dear_plan(8000)
    assert estimate_cents(plan) == 1 + 61  # 8000 opus output tokens are 60 cents, + input
    fitted = within_budget(plan, 10)
    assert estimate_cents(fitted) <= 10
    tokens = [step.params["max_tokens"] for step in fitted.steps]
    assert tokens[0] == 200  # already below the common cap: unchanged
    assert 1000 < tokens[1] < 1200  # (10 - 1 cents) / 7500 per million, less the prompt
    bumped = [
        step.model_copy(update={"params": {**step.params, "max_tokens": tokens[1] + 1}})
        if step.id == "b"
        else step
        for step in fitted.steps
    ]
    assert estimate_cents(fitted.model_copy(update={"steps": bumped})) > 10  # the largest
    assert "to fit 10 cents" in fitted.rationale


def test_within_budget_refuses_when_not_even_one_token_fits() -> None:
    with pytest.raises(PlanningFailed) as raised:
        within_budget(dear_plan(8000), 1)
    assert raised.value.code is FailureCode.BUDGET_EXCEEDED


async def test_a_stub_plan_over_budget_is_asked_again_only_when_the_goal_allows_it() -> None:
    def summarize(replan: bool) -> GoalSubmitted:
        return GoalSubmitted(
            run_id=uuid.uuid4(),
            tenant="acme",
            goal="summarize this",
            budget_cents=0,
            inputs={"text": "x"},
            replan_within_budget=replan,
        )

    plain = (await decide(summarize(False), StubPlanner()))[-1]
    assert isinstance(plain, PlanRejected) and len(plain.reasons) == 1
    again = (await decide(summarize(True), StubPlanner()))[-1]
    assert isinstance(again, PlanRejected)
    assert again.code is FailureCode.BUDGET_EXCEEDED
    assert again.reasons[1] == "no stub plan for this goal fits in 0 cents"
