"""Plans: a DAG of skill steps, produced by the planner and run by the executor."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

STEP_ID_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"

# References are resolved by the executor just before a step runs:
# ${goal.inputs.<path>} or ${steps.<step_id>.output.<path>}. A string that is exactly one
# reference becomes the referenced value (any JSON type); references inside a longer
# string are replaced by the value's text.
REFERENCE_RE = re.compile(r"^\$\{(?P<path>[^}]+)\}$")
EMBEDDED_REFERENCE_RE = re.compile(r"\$\{(?P<path>[^}]+)\}")


class PlanStep(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, Field(pattern=STEP_ID_PATTERN)]
    skill: str
    params: dict[str, Any] = Field(default_factory=dict)
    depends_on: list[str] = Field(default_factory=list)
    max_attempts: Annotated[int, Field(ge=1, le=10)] | None = None
    timeout_s: Annotated[float, Field(gt=0, le=3600)] | None = None
    optional: bool = Field(
        default=False,
        description="when the budget denies this step, skip it (and the optional steps that "
        "depend on it) and go on, instead of failing the run",
    )


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: Annotated[list[PlanStep], Field(min_length=1, max_length=200)]
    rationale: str = ""

    def step(self, step_id: str) -> PlanStep:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)

    def sinks(self) -> list[str]:
        """Steps no other step depends on: their outputs are the run's outputs."""
        depended = {dep for step in self.steps for dep in step.depends_on}
        return [step.id for step in self.steps if step.id not in depended]


def references_in(value: Any) -> list[str]:
    """Every reference path ("steps.x.output.y") found in a params value, depth first."""
    found: list[str] = []
    if isinstance(value, str):
        found.extend(match.group("path") for match in EMBEDDED_REFERENCE_RE.finditer(value))
    elif isinstance(value, dict):
        for item in value.values():
            found.extend(references_in(item))
    elif isinstance(value, list):
        for item in value:
            found.extend(references_in(item))
    return found


def plan_problems(plan: Plan, known_skills: set[str]) -> list[str]:
    """Every reason the plan cannot run (empty when it can). Pure; shared by planner and
    executor so both sides agree on what a valid plan is."""
    problems: list[str] = []
    ids = [step.id for step in plan.steps]
    seen: set[str] = set()
    for step in plan.steps:
        if step.id in seen:
            problems.append(f"step {step.id!r}: duplicate step id")
        seen.add(step.id)
        if step.skill not in known_skills:
            problems.append(f"step {step.id!r}: unknown skill {step.skill!r}")
        for dep in step.depends_on:
            if dep not in ids:
                problems.append(f"step {step.id!r}: depends on unknown step {dep!r}")
            elif dep == step.id:
                problems.append(f"step {step.id!r}: depends on itself")
        for ref in references_in(step.params):
            head, _, rest = ref.partition(".")
            if head == "goal":
                if not rest.startswith("inputs"):
                    problems.append(
                        f"step {step.id!r}: reference ${{{ref}}} must be goal.inputs..."
                    )
            elif head == "steps":
                target = rest.split(".", 1)[0]
                if target not in step.depends_on:
                    problems.append(
                        f"step {step.id!r}: reference ${{{ref}}} names step {target!r}, "
                        "which is not in depends_on"
                    )
            else:
                problems.append(
                    f"step {step.id!r}: reference ${{{ref}}} must start with goal. or steps."
                )
    if not problems and _has_cycle(plan):
        problems.append("plan has a dependency cycle")
    return problems


def _has_cycle(plan: Plan) -> bool:
    deps = {step.id: list(step.depends_on) for step in plan.steps}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str) -> bool:
        if state.get(node) == 1:
            return True
        if state.get(node) == 2:
            return False
        state[node] = 1
        if any(visit(dep) for dep in deps.get(node, [])):
            return True
        state[node] = 2
        return False

    return any(visit(node) for node in deps)
