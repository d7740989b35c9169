"""A plan's references to the goal's inputs are checked at plan time (issue 15)."""

from __future__ import annotations

import uuid
from typing import Any

from aos_contracts import GoalSubmitted, PlanCreated, PlanRejected
from aos_contracts.failures import FailureCode
from aos_contracts.plans import Plan, PlanStep
from aos_planner.planning import decide
from aos_planner.preview import preview
from aos_planner.stub import StubPlanner


def goal(text: str, inputs: dict[str, Any], budget: int = 100) -> GoalSubmitted:
    return GoalSubmitted(
        run_id=uuid.uuid4(), tenant="acme", goal=text, budget_cents=budget, inputs=inputs
    )


def asking(prompt: str) -> Plan:
    return Plan(steps=[PlanStep(id="ask", skill="llm_invoke", params={"prompt": prompt})])


async def test_a_summarize_goal_without_text_is_rejected_at_plan_time_naming_it() -> None:
    rejected = (await decide(goal("summarize the notes", {"title": "notes"}), StubPlanner()))[-1]
    assert isinstance(rejected, PlanRejected)
    assert rejected.code is FailureCode.INPUT_INVALID
    assert rejected.reasons == [
        "step 'text': json_transform extract needs the goal input 'text', which is missing "
        "(the goal's inputs: title)"
    ]


async def test_a_summarize_goal_with_text_is_planned() -> None:
    created = (await decide(goal("summarize the notes", {"text": "hi"}), StubPlanner()))[-1]
    assert isinstance(created, PlanCreated)


def test_a_reference_to_a_missing_input_is_named_with_the_inputs_given() -> None:
    seen = preview(asking("Translate ${goal.inputs.doc.body} into French"), {"doc": {"title": 1}})
    assert seen.problems == [
        "step 'ask': ${goal.inputs.doc.body} needs the goal input 'doc.body', which is missing "
        "(the goal's inputs: doc)"
    ]


def test_references_to_inputs_the_goal_has_are_fine_and_priced_with_them() -> None:
    plan = asking("Translate ${goal.inputs.doc.body} into French")
    small = preview(plan, {"doc": {"body": "hi"}})
    large = preview(plan, {"doc": {"body": "x" * 300_000}})
    assert small.problems == [] and large.problems == []
    # 300 000 characters are ~100 000 tokens: 30 cents on claude-sonnet-4-6.
    assert large.cents - small.cents == 30


def test_an_input_of_the_wrong_type_for_the_params_is_a_problem() -> None:
    plan = Plan(
        steps=[
            PlanStep(
                id="ask",
                skill="llm_invoke",
                params={"prompt": "hi", "max_tokens": "${goal.inputs.limit}"},
            )
        ]
    )
    assert preview(plan, {"limit": 100}).problems == []
    (problem,) = preview(plan, {"limit": "lots"}).problems
    assert problem.startswith("step 'ask': invalid params once resolved from the goal's inputs")
    assert "max_tokens" in problem


def test_a_transform_chain_over_the_inputs_is_run_and_its_failure_named() -> None:
    plan = Plan(
        steps=[
            PlanStep(
                id="users",
                skill="json_transform",
                params={"op": "extract", "input": "${goal.inputs}", "path": "users"},
            ),
            PlanStep(
                id="names",
                skill="json_transform",
                params={"op": "map", "input": "${steps.users.output}", "path": "name"},
                depends_on=["users"],
            ),
            PlanStep(
                id="greet",
                skill="llm_invoke",
                params={"prompt": "Greet ${steps.names.output.0}"},
                depends_on=["names"],
            ),
        ]
    )
    fine = preview(plan, {"users": [{"name": "ada"}]})
    assert fine.problems == []
    assert [step.unknown_outputs for step in fine.steps] == [(), (), ()]
    broken = preview(plan, {"users": [{"nom": "ada"}]})
    assert broken.problems == [
        "step 'names': json_transform fails on what is known before the run: "
        "path 'name' not found (at object)"
    ]


def test_without_inputs_nothing_is_claimed_missing() -> None:
    seen = preview(asking("${goal.inputs.text}"), None)
    assert seen.problems == []
    assert seen.steps[0].unknown_outputs == ("goal",)
