"""Resolve `${goal.inputs...}` and `${steps.<id>.output...}` in a step's params."""

from __future__ import annotations

import json
from typing import Any

from aos_contracts.json_transform import TransformError, lookup
from aos_contracts.plans import EMBEDDED_REFERENCE_RE, REFERENCE_RE


class UnresolvedReference(ValueError):
    """A reference that does not resolve; the message names it."""


def resolve(value: Any, inputs: dict[str, Any], outputs: dict[str, Any]) -> Any:
    if isinstance(value, str):
        whole = REFERENCE_RE.match(value)
        if whole:
            return _resolve_path(whole.group("path"), inputs, outputs)
        if "${" in value:
            return EMBEDDED_REFERENCE_RE.sub(
                lambda match: _as_text(_resolve_path(match.group("path"), inputs, outputs)), value
            )
        return value
    if isinstance(value, dict):
        return {key: resolve(item, inputs, outputs) for key, item in value.items()}
    if isinstance(value, list):
        return [resolve(item, inputs, outputs) for item in value]
    return value


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _resolve_path(path: str, inputs: dict[str, Any], outputs: dict[str, Any]) -> Any:
    head, _, rest = path.partition(".")
    try:
        if head == "goal":
            root, _, inner = rest.partition(".")
            if root != "inputs":
                raise UnresolvedReference(f"${{{path}}}: only goal.inputs can be referenced")
            return lookup(inputs, inner)
        if head == "steps":
            step_id, _, inner = rest.partition(".")
            if step_id not in outputs:
                raise UnresolvedReference(f"${{{path}}}: step {step_id!r} has no output")
            field, _, deeper = inner.partition(".")
            if field != "output":
                raise UnresolvedReference(f"${{{path}}}: expected steps.{step_id}.output...")
            return lookup(outputs[step_id], deeper)
    except TransformError as exc:
        raise UnresolvedReference(f"${{{path}}}: {exc}") from exc
    raise UnresolvedReference(f"${{{path}}}: must start with goal. or steps.")
