"""Plans: a DAG of skill steps, produced by the planner and run by the executor."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

STEP_ID_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
MAX_PLAN_STEPS = 200  # what a Plan can hold at all; PlanLimits may only lower it

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

    steps: Annotated[list[PlanStep], Field(min_length=1, max_length=MAX_PLAN_STEPS)]
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


def plan_problems(
    plan: Plan,
    known_skills: Collection[str],
    output_fields: Mapping[str, Collection[str]] | None = None,
) -> list[str]:
    """Every reason the plan cannot run (empty when it can). Pure; shared by planner and
    executor so both sides agree on what a valid plan is.

    `output_fields` maps a skill to the top-level fields of its output
    (`aos_contracts.skills.output_fields_by_skill()`); a reference
    `${steps.<id>.output.<field>...}` must then name one of them. Only that first
    segment is checked (what lies below, e.g. inside an HTTP body, is data); skills not
    in the mapping, and `${steps.<id>.output}` itself, are not checked."""
    problems: list[str] = []
    ids = [step.id for step in plan.steps]
    skill_of: dict[str, str] = {}
    for step in plan.steps:
        skill_of.setdefault(step.id, step.skill)
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
                if rest != "inputs" and not rest.startswith("inputs."):
                    problems.append(
                        f"step {step.id!r}: reference ${{{ref}}} must be goal.inputs..."
                    )
            elif head == "steps":
                target, _, inner = rest.partition(".")
                if target not in step.depends_on:
                    problems.append(
                        f"step {step.id!r}: reference ${{{ref}}} names step {target!r}, "
                        "which is not in depends_on"
                    )
                problem = _output_problem(ref, inner, skill_of.get(target), output_fields)
                if problem:
                    problems.append(f"step {step.id!r}: {problem}")
            else:
                problems.append(
                    f"step {step.id!r}: reference ${{{ref}}} must start with goal. or steps."
                )
    if not problems and _has_cycle(plan):
        problems.append("plan has a dependency cycle")
    return problems


def _output_problem(
    ref: str,
    inner: str,
    skill: str | None,
    output_fields: Mapping[str, Collection[str]] | None,
) -> str | None:
    """What is wrong with the `output...` part of a step reference, if anything."""
    kind, _, deeper = inner.partition(".")
    if kind != "output":
        return f"reference ${{{ref}}} must be steps.<id>.output..."
    if not deeper or skill is None or output_fields is None or skill not in output_fields:
        return None
    field = deeper.split(".", 1)[0]
    fields = output_fields[skill]
    if field in fields:
        return None
    return (
        f"reference ${{{ref}}} names field {field!r}, which {skill}'s output does not have "
        f"(fields: {', '.join(sorted(fields))})"
    )


@dataclass(frozen=True)
class PlanLimits:
    """How big a plan the planner accepts. `max_depth` counts the steps on the longest
    dependency chain (a plan of independent steps is 1 deep)."""

    max_steps: int = MAX_PLAN_STEPS
    max_depth: int = MAX_PLAN_STEPS

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.max_depth < 1:
            raise ValueError(f"plan limits must be at least 1: {self}")


DEFAULT_PLAN_LIMITS = PlanLimits()


def plan_depth(plan: Plan) -> int | None:
    """Steps on the longest dependency chain; None when the plan has a cycle. Unknown
    dependencies are ignored (plan_problems reports them)."""
    ids = {step.id for step in plan.steps}
    deps = {step.id: {dep for dep in step.depends_on if dep in ids} for step in plan.steps}
    dependents: dict[str, list[str]] = {node: [] for node in deps}
    for node, node_deps in deps.items():
        for dep in node_deps:
            dependents[dep].append(node)
    waiting = {node: len(node_deps) for node, node_deps in deps.items()}
    depth = {node: 1 for node in deps}
    ready = [node for node, count in waiting.items() if count == 0]
    done = 0
    while ready:  # Kahn's topological order: iterative, so no recursion limit
        node = ready.pop()
        done += 1
        for dependent in dependents[node]:
            depth[dependent] = max(depth[dependent], depth[node] + 1)
            waiting[dependent] -= 1
            if waiting[dependent] == 0:
                ready.append(dependent)
    if done < len(deps):
        return None
    return max(depth.values(), default=0)


def limit_problems(plan: Plan, limits: PlanLimits = DEFAULT_PLAN_LIMITS) -> list[str]:
    """The plan's size against the limits: step count, and depth when it has no cycle."""
    problems: list[str] = []
    if len(plan.steps) > limits.max_steps:
        problems.append(f"plan has {len(plan.steps)} steps, above the limit of {limits.max_steps}")
    depth = plan_depth(plan)
    if depth is not None and depth > limits.max_depth:
        problems.append(f"plan is {depth} steps deep, above the limit of {limits.max_depth}")
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
