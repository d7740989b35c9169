"""json_transform: deterministic operations over JSON values (the real one is the stub).

In the contracts because both sides run them: the executor for the step, the planner to
learn before the run what a step over the goal's inputs will produce (or fail on).

Paths are dot-separated; a token that is an integer indexes a list; the empty path is the
value itself. A missing path or a value of the wrong type raises TransformError naming
the path; the skill turns it into INPUT_INVALID.

- extract: the value at `path`.
- map:     `input` must be a list; the value at `path` of every item (missing -> error).
- filter:  `input` must be a list; the items whose value at `path` equals `equals`
           (an item without the path does not match).
- pick:    `input` must be an object; only the listed `keys` that it has.
- omit:    `input` must be an object; all but the listed `keys`.
- merge:   `inputs` must be a list of objects; one object, later keys win (shallow).
"""

from __future__ import annotations

from typing import Any

from aos_contracts.skills import JsonTransformParams


class TransformError(ValueError):
    pass


_MISSING = object()


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "list", str: "string", bool: "boolean"}.get(
        type(value), type(value).__name__
    )


def lookup(value: Any, path: str, *, default: Any = _MISSING) -> Any:
    if path == "":
        return value
    current = value
    walked: list[str] = []
    for token in path.split("."):
        walked.append(token)
        if isinstance(current, dict) and token in current:
            current = current[token]
        elif (
            isinstance(current, list)
            and _is_index(token)
            and -len(current) <= int(token) < len(current)
        ):
            current = current[int(token)]
        else:
            if default is not _MISSING:
                return default
            where = ".".join(walked)
            raise TransformError(f"path {where!r} not found (at {_type_name(current)})")
    return current


def _is_index(token: str) -> bool:
    return token.lstrip("-").isdigit()


def _object(value: Any, op: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TransformError(f"{op}: input must be an object, got {_type_name(value)}")
    return value


def _list(value: Any, op: str) -> list[Any]:
    if not isinstance(value, list):
        raise TransformError(f"{op}: input must be a list, got {_type_name(value)}")
    return value


def apply(params: JsonTransformParams) -> Any:
    op = params.op
    path = params.path or ""
    if op == "extract":
        return lookup(params.input, path)
    if op == "map":
        items = _list(params.input, op)
        return [lookup(item, path) for item in items]
    if op == "filter":
        items = _list(params.input, op)
        return [
            item for item in items if lookup(item, path, default=_MISSING_MATCH) == params.equals
        ]
    if op in ("pick", "omit"):
        source = _object(params.input, op)
        if params.keys is None:
            raise TransformError(f"{op}: keys is required")
        keys = set(params.keys)
        if op == "pick":
            return {key: item for key, item in source.items() if key in keys}
        return {key: item for key, item in source.items() if key not in keys}
    if op == "merge":
        if params.inputs is None:
            raise TransformError("merge: inputs (a list of objects) is required")
        merged: dict[str, Any] = {}
        for index, item in enumerate(params.inputs):
            if not isinstance(item, dict):
                raise TransformError(
                    f"merge: inputs.{index} must be an object, got {_type_name(item)}"
                )
            merged.update(item)
        return merged
    raise TransformError(f"unknown op {op!r}")  # unreachable: the params model checks op


class _NeverEqual:
    def __eq__(self, other: object) -> bool:
        return False

    def __hash__(self) -> int:
        return 0


_MISSING_MATCH = _NeverEqual()
