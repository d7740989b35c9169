"""Plan validation before acceptance: references into outputs, and the size limits."""

from __future__ import annotations

from typing import Any

import pytest

from aos_contracts.plans import (
    MAX_PLAN_STEPS,
    Plan,
    PlanLimits,
    PlanStep,
    limit_problems,
    plan_depth,
    plan_problems,
)
from aos_contracts.skills import SKILL_CONTRACTS, output_fields_by_skill
from aos_planner.planning import validation_problems
from aos_planner.settings import PlannerSettings
from aos_planner.stub import StubPlanner

FETCH = PlanStep(id="fetch", skill="http_call", params={"url": "https://example.com/a"})
ASK = PlanStep(id="ask", skill="llm_invoke", params={"prompt": "hi"})
PICK = PlanStep(id="pick", skill="json_transform", params={"op": "pick", "input": {}, "keys": []})


def reading(*sources: PlanStep, ref: str) -> Plan:
    """The sources, then a step whose prompt is exactly `ref`."""
    reader = PlanStep(
        id="summary",
        skill="llm_invoke",
        params={"prompt": ref},
        depends_on=[source.id for source in sources],
    )
    return Plan(steps=[*sources, reader])


def chain(length: int) -> Plan:
    steps = [PlanStep(id="s1", skill="json_transform", params={"op": "merge", "inputs": []})]
    for index in range(2, length + 1):
        steps.append(
            PlanStep(
                id=f"s{index}",
                skill="json_transform",
                params={"op": "merge", "inputs": [f"${{steps.s{index - 1}.output}}"]},
                depends_on=[f"s{index - 1}"],
            )
        )
    return Plan(steps=steps)


def test_the_contracts_describe_the_output_fields() -> None:
    assert output_fields_by_skill() == {
        "http_call": frozenset({"status", "headers", "body", "url"}),
        "llm_invoke": frozenset({"text", "model", "usage", "stop_reason", "tool_calls"}),
    }
    assert SKILL_CONTRACTS["json_transform"].output_fields is None


def test_a_field_the_output_does_not_have_is_rejected_with_the_fields_named() -> None:
    problems = validation_problems(reading(FETCH, ref="${steps.fetch.output.bdy}"))
    assert problems == [
        "step 'summary': reference ${steps.fetch.output.bdy} names field 'bdy', which "
        "http_call's output does not have (fields: body, headers, status, url)"
    ]


def test_an_embedded_reference_is_checked_too() -> None:
    problems = validation_problems(reading(ASK, ref="Answer: ${steps.ask.output.txt} (end)"))
    assert len(problems) == 1
    assert "names field 'txt', which llm_invoke's output does not have" in problems[0]
    assert "(fields: model, stop_reason, text, tool_calls, usage)" in problems[0]


@pytest.mark.parametrize(
    "ref",
    [
        "${steps.fetch.output.body}",
        "${steps.fetch.output.status}",
        "${steps.fetch.output.body.items.0.title}",  # inside the body: data, not checked
        "${steps.fetch.output.headers.content-type}",
        "${steps.fetch.output}",
        "fetched: ${steps.fetch.output.body.summary}",
    ],
)
def test_fields_the_output_has_and_deeper_paths_pass(ref: str) -> None:
    assert validation_problems(reading(FETCH, ref=ref)) == []


@pytest.mark.parametrize(
    "ref",
    [
        "${steps.ask.output.text}",
        "${steps.ask.output.usage.output_tokens}",
        "${steps.ask.output.tool_calls.0.input}",
        "${steps.ask.output}",
    ],
)
def test_llm_invoke_output_fields_pass(ref: str) -> None:
    assert validation_problems(reading(ASK, ref=ref)) == []


@pytest.mark.parametrize(
    "ref", ["${steps.pick.output.anything}", "${steps.pick.output.a.b.0}", "${steps.pick.output}"]
)
def test_json_transform_output_may_be_referenced_anywhere(ref: str) -> None:
    assert validation_problems(reading(PICK, ref=ref)) == []


def test_a_step_reference_must_go_through_output() -> None:
    problems = validation_problems(reading(FETCH, ref="${steps.fetch.body}"))
    assert problems == [
        "step 'summary': reference ${steps.fetch.body} must be steps.<id>.output..."
    ]


def test_without_output_fields_plan_problems_checks_no_fields() -> None:
    plan = reading(FETCH, ref="${steps.fetch.output.bdy}")
    assert plan_problems(plan, set(SKILL_CONTRACTS)) == []
    assert len(plan_problems(plan, set(SKILL_CONTRACTS), output_fields_by_skill())) == 1


def test_a_reference_to_a_step_outside_depends_on_gets_both_reasons() -> None:
    plan = Plan(
        steps=[
            FETCH,
            PlanStep(
                id="summary", skill="llm_invoke", params={"prompt": "${steps.fetch.output.x}"}
            ),
        ]
    )
    problems = validation_problems(plan)
    assert any("which is not in depends_on" in problem for problem in problems)
    assert any("names field 'x'" in problem for problem in problems)


def test_goal_references_must_be_goal_inputs() -> None:
    plan = Plan(steps=[PlanStep(id="a", skill="llm_invoke", params={"prompt": "${goal.inputsx}"})])
    assert validation_problems(plan) == [
        "step 'a': reference ${goal.inputsx} must be goal.inputs..."
    ]


def test_depth_is_the_longest_dependency_chain() -> None:
    assert plan_depth(chain(1)) == 1
    assert plan_depth(chain(7)) == 7
    diamond = Plan(
        steps=[
            PICK,
            PlanStep(id="b", skill="json_transform", params={"op": "merge"}, depends_on=["pick"]),
            PlanStep(id="c", skill="json_transform", params={"op": "merge"}, depends_on=["pick"]),
            PlanStep(id="d", skill="json_transform", params={"op": "merge"}, depends_on=["b", "c"]),
            PlanStep(id="e", skill="json_transform", params={"op": "merge"}),
        ]
    )
    assert plan_depth(diamond) == 3
    cycle = Plan(
        steps=[
            PlanStep(id="a", skill="json_transform", depends_on=["b"]),
            PlanStep(id="b", skill="json_transform", depends_on=["a"]),
        ]
    )
    assert plan_depth(cycle) is None


def test_step_and_depth_limits_report_the_numbers() -> None:
    problems = validation_problems(chain(12), PlanLimits(max_steps=10, max_depth=5))
    assert problems == [
        "plan has 12 steps, above the limit of 10",
        "plan is 12 steps deep, above the limit of 5",
    ]
    wide = Plan(
        steps=[
            PlanStep(id=f"w{index}", skill="json_transform", params={"op": "merge", "inputs": []})
            for index in range(12)
        ]
    )
    assert validation_problems(wide, PlanLimits(max_steps=10, max_depth=1)) == [
        "plan has 12 steps, above the limit of 10"
    ]
    assert validation_problems(chain(7), PlanLimits(max_steps=10, max_depth=5)) == [
        "plan is 7 steps deep, above the limit of 5"
    ]


def test_a_plan_at_the_limits_passes() -> None:
    assert validation_problems(chain(5), PlanLimits(max_steps=5, max_depth=5)) == []
    assert limit_problems(chain(MAX_PLAN_STEPS)) == []


def test_a_cyclic_plan_gets_no_depth_reason() -> None:
    cycle = Plan(
        steps=[
            PlanStep(id="a", skill="json_transform", params={"op": "merge"}, depends_on=["b"]),
            PlanStep(id="b", skill="json_transform", params={"op": "merge"}, depends_on=["a"]),
        ]
    )
    assert validation_problems(cycle, PlanLimits(max_depth=1)) == ["plan has a dependency cycle"]


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        PlanLimits(max_steps=0)


def test_settings_give_the_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AOS_PLAN_MAX_STEPS", raising=False)
    monkeypatch.delenv("AOS_PLAN_MAX_DEPTH", raising=False)
    assert PlannerSettings().plan_limits() == PlanLimits(MAX_PLAN_STEPS, MAX_PLAN_STEPS)
    monkeypatch.setenv("AOS_PLAN_MAX_STEPS", "10")
    monkeypatch.setenv("AOS_PLAN_MAX_DEPTH", "5")
    assert PlannerSettings().plan_limits() == PlanLimits(max_steps=10, max_depth=5)
    monkeypatch.setenv("AOS_PLAN_MAX_DEPTH", "0")
    with pytest.raises(ValueError, match="AOS_PLAN_MAX_DEPTH"):
        PlannerSettings()


@pytest.mark.parametrize(
    ("text", "inputs"),
    [
        (f"bench {MAX_PLAN_STEPS}", {}),
        ("please fetch https://example.com/a.json now", {}),
        ("fetch https://example.com/notes and summarize them", {}),
        ("Summarise the release notes", {"text": "notes"}),
        ("extract name, email from user", {"user": {"name": "n"}}),
    ],
)
def test_the_stub_planners_plans_pass(text: str, inputs: dict[str, Any]) -> None:
    plan = StubPlanner().plan(text, inputs)
    assert validation_problems(plan) == []
    assert validation_problems(plan, PlannerSettings().plan_limits()) == []
