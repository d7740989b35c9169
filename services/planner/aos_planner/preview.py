"""What can be known of a plan before it runs, from the goal's actual inputs.

- References to the goal's inputs (`${goal.inputs.<path>}`) are looked up in them: one
  that names a missing input is a problem, named, at plan time (the executor would fail
  the step with INPUT_INVALID).
- A json_transform step whose params are all known is run now: it is pure, so its
  output is exactly what the executor will compute, and its failure (e.g. an `extract`
  of an input the goal lacks) is certain.
- Every step is estimated from its params resolved this far, so a prompt that holds a
  900 KB input is priced as such.
- Outputs of the other skills (http_call, llm_invoke), and of steps that use them, are
  not known before the run. A step that uses one is estimated twice: with that output
  as its reference text (what the planner judges the budget on; the executor reserves
  each step's worst case again from its resolved params before it runs), and with that
  output at an assumed bound (`bound_bytes`), which `plan simulate` reports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from aos_contracts.json_transform import TransformError, apply, lookup
from aos_contracts.plans import EMBEDDED_REFERENCE_RE, REFERENCE_RE, Plan, references_in
from aos_contracts.skills import SKILL_CONTRACTS, JsonTransformParams

# The executor's default AOS_MAX_STEP_OUTPUT_BYTES: a step's output is at most this large
# unless the executor is configured otherwise (at most 768 KiB).
UNKNOWN_OUTPUT_BOUND_BYTES = 512 * 1024

_MISSING = object()
GOAL_INPUTS = ["goal", "inputs"]


@dataclass(frozen=True)
class StepPreview:
    id: str
    # Worst case from what is known before the run (None: estimated only at run time).
    cents: int | None
    # Worst case if every output in `unknown_outputs` were `bound_bytes` long.
    cents_at_bound: int | None
    # Earlier steps whose outputs this step uses and that are not known before the run.
    unknown_outputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlanPreview:
    steps: list[StepPreview]
    # Certain failures: references to missing inputs, json_transform failing on them.
    problems: list[str]
    bound_bytes: int

    @property
    def cents(self) -> int:
        return sum(step.cents or 0 for step in self.steps)

    @property
    def cents_at_bound(self) -> int:
        return sum(step.cents_at_bound or 0 for step in self.steps)


def preview(
    plan: Plan,
    inputs: dict[str, Any] | None,
    *,
    bound_bytes: int = UNKNOWN_OUTPUT_BOUND_BYTES,
) -> PlanPreview:
    """The plan seen from the goal's `inputs` (None: the inputs are not known either, and
    references to them count as unknown outputs of `goal`)."""
    known: dict[str, Any] = {}  # step id -> output, for steps that can be run now
    problems: list[str] = []
    steps: dict[str, StepPreview] = {}
    for step in _in_dependency_order(plan):
        unknown: list[str] = []
        missing = False
        for ref in references_in(step.params):
            found = _look_up(ref, inputs, known)
            if isinstance(found, str):
                problems.append(f"step {step.id!r}: {found}")
                missing = True
            elif found is None:
                unknown.append(_source(ref))
        contract = SKILL_CONTRACTS.get(step.skill)
        if missing or contract is None:
            steps[step.id] = StepPreview(step.id, None, None, tuple(dict.fromkeys(unknown)))
            continue
        resolved = _resolve(step.params, inputs, known, bound=None)
        if not unknown:
            problem = None
            if references_in(step.params):
                # The params the executor will validate once resolved (those of steps
                # without references are validated by param_problems already).
                problem = _params_problem(step.id, contract.params_model, resolved)
            if problem is None and step.skill == "json_transform":
                problem = _run_transform(step.id, resolved, step.params, inputs, known)
            if problem:
                problems.append(problem)
        try:
            cents: int | None = contract.estimate_cents(resolved)
        except ValueError:
            cents = None  # params that only fit the schema once resolved at run time
        at_bound = cents
        if unknown:
            try:
                at_bound = contract.estimate_cents(
                    _resolve(step.params, inputs, known, bound=bound_bytes)
                )
            except ValueError:
                at_bound = None
        steps[step.id] = StepPreview(step.id, cents, at_bound, tuple(dict.fromkeys(unknown)))
    ordered = [steps[step.id] for step in plan.steps if step.id in steps]
    return PlanPreview(ordered, problems, bound_bytes)


def _in_dependency_order(plan: Plan) -> list[Any]:
    """The steps, each after those it depends on (listed order where a cycle or an unknown
    dependency leaves no other: validation reports those)."""
    by_id = {step.id: step for step in plan.steps}
    placed: set[str] = set()
    ordered = []
    pending = list(plan.steps)
    while pending:
        ready = [s for s in pending if all(d in placed or d not in by_id for d in s.depends_on)]
        if not ready:
            ready = pending[:1]
        for step in ready:
            ordered.append(step)
            placed.add(step.id)
            pending.remove(step)
    return ordered


def _source(ref: str) -> str:
    """What a reference reads: a step id, or `goal` for the goal's inputs."""
    head, _, rest = ref.partition(".")
    return rest.partition(".")[0] if head == "steps" else head


def _look_up(ref: str, inputs: dict[str, Any] | None, known: dict[str, Any]) -> Any:
    """The referenced value, wrapped in a 1-tuple; None when it is not known before the
    run; a str saying why it can never resolve."""
    head, _, rest = ref.partition(".")
    if head == "goal":
        root, _, path = rest.partition(".")
        if root != "inputs" or inputs is None:
            return None  # a malformed reference is plan_problems' to report
        missing = _first_missing(inputs, path)
        if missing is not None:
            return f"${{{ref}}} needs the goal input {missing!r}, which is missing " + (
                _inputs_given(inputs)
            )
        return (lookup(inputs, path),)
    if head == "steps":
        step_id, _, inner = rest.partition(".")
        kind, _, path = inner.partition(".")
        if step_id not in known or kind != "output":
            return None
        try:
            return (lookup(known[step_id], path),)
        except TransformError as exc:
            return f"${{{ref}}}: {exc} in the output of step {step_id!r}, known before the run"
    return None


def _first_missing(value: Any, path: str) -> str | None:
    """The shortest prefix of `path` that `value` does not have; None if it has it all."""
    if path == "":
        return None
    tokens = path.split(".")
    for end in range(1, len(tokens) + 1):
        prefix = ".".join(tokens[:end])
        if lookup(value, prefix, default=_MISSING) is _MISSING:
            return prefix
    return None


def _inputs_given(inputs: dict[str, Any]) -> str:
    names = ", ".join(sorted(inputs)) if inputs else "none"
    return f"(the goal's inputs: {names})"


def _resolve(
    value: Any, inputs: dict[str, Any] | None, known: dict[str, Any], *, bound: int | None
) -> Any:
    """`value` with every known reference resolved as the executor will; an unknown one
    left as its reference text (`bound` None) or made a `bound`-byte string."""

    def replacement(path: str) -> Any:
        found = _look_up(path, inputs, known)
        if isinstance(found, tuple):
            return found[0]
        return "${" + path + "}" if bound is None else "x" * bound

    if isinstance(value, str):
        whole = REFERENCE_RE.match(value)
        if whole:
            return replacement(whole.group("path"))
        return EMBEDDED_REFERENCE_RE.sub(lambda match: _text(replacement(match["path"])), value)
    if isinstance(value, dict):
        return {key: _resolve(item, inputs, known, bound=bound) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve(item, inputs, known, bound=bound) for item in value]
    return value


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _params_problem(step_id: str, model: type[BaseModel], resolved: dict[str, Any]) -> str | None:
    try:
        model.model_validate(resolved)
    except ValidationError as exc:
        return f"step {step_id!r}: invalid params once resolved from the goal's inputs: {exc}"
    return None


def _run_transform(
    step_id: str,
    resolved: dict[str, Any],
    raw: dict[str, Any],
    inputs: dict[str, Any] | None,
    known: dict[str, Any],
) -> str | None:
    """Run a json_transform step whose params are all known; record its output, or say
    why it will fail (naming the missing goal input when it extracts one)."""
    try:
        params = JsonTransformParams.model_validate(resolved)
    except ValidationError:
        return None  # reported by param_problems or _params_problem
    try:
        known[step_id] = apply(params)
    except TransformError as exc:
        source = REFERENCE_RE.match(raw["input"]) if isinstance(raw.get("input"), str) else None
        ref = source.group("path") if source else ""
        if inputs is not None and params.op == "extract" and ref.split(".")[:2] == GOAL_INPUTS:
            parts = [*ref.split(".")[2:], *(params.path or "").split(".")]
            path = ".".join(part for part in parts if part)
            missing = _first_missing(inputs, path) or path
            return (
                f"step {step_id!r}: json_transform extract needs the goal input {missing!r}, "
                f"which is missing {_inputs_given(inputs)}"
            )
        return f"step {step_id!r}: json_transform fails on what is known before the run: {exc}"
    return None
