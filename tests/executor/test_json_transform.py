"""json_transform: documented semantics, clear errors naming the path, and its algebra."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aos_contracts.json_transform import TransformError, apply
from aos_contracts.skills import JsonTransformParams
from aos_executor.references import UnresolvedReference, resolve


def run(**params: Any) -> Any:
    return apply(JsonTransformParams.model_validate(params))


def test_extract_walks_objects_and_list_indexes() -> None:
    assert run(op="extract", input={"a": [{"b": 1}, {"b": 2}]}, path="a.1.b") == 2
    assert run(op="extract", input={"a": 1}, path="") == {"a": 1}


def test_a_missing_path_names_the_path() -> None:
    with pytest.raises(TransformError, match=r"'a\.zz' not found"):
        run(op="extract", input={"a": {"b": 1}}, path="a.zz")


def test_map_filter_pick_omit_merge() -> None:
    items = [{"id": 1, "kind": "x"}, {"id": 2, "kind": "y"}, {"id": 3}]
    assert run(op="map", input=items[:2], path="id") == [1, 2]
    assert run(op="filter", input=items, path="kind", equals="x") == [{"id": 1, "kind": "x"}]
    assert run(op="pick", input={"a": 1, "b": 2}, keys=["a", "c"]) == {"a": 1}
    assert run(op="omit", input={"a": 1, "b": 2}, keys=["a"]) == {"b": 2}
    assert run(op="merge", inputs=[{"a": 1}, {"a": 2, "b": 3}]) == {"a": 2, "b": 3}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"op": "map", "input": {"a": 1}, "path": "a"}, "map: input must be a list, got object"),
        ({"op": "pick", "input": [1], "keys": ["a"]}, "pick: input must be an object, got list"),
        ({"op": "merge", "inputs": [{"a": 1}, 3]}, "merge: inputs.1 must be an object, got int"),
        ({"op": "pick", "input": {}}, "pick: keys is required"),
    ],
)
def test_type_mismatches_are_clear(params: dict[str, Any], message: str) -> None:
    with pytest.raises(TransformError, match=message):
        run(**params)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3)
    ),
    max_leaves=10,
)
objects = st.dictionaries(st.text(max_size=4), json_values, max_size=6)


@given(
    objects, st.lists(st.text(max_size=4), max_size=4), st.lists(st.text(max_size=4), max_size=4)
)
def test_pick_then_omit_of_disjoint_keys_is_pick(
    obj: dict[str, Any], keep: list[str], drop: list[str]
) -> None:
    drop = [key for key in drop if key not in keep]
    picked = run(op="pick", input=obj, keys=keep)
    assert run(op="omit", input=picked, keys=drop) == picked


@given(objects, st.lists(st.text(max_size=4), max_size=4))
def test_pick_and_omit_of_the_same_keys_partition_the_object(
    obj: dict[str, Any], keys: list[str]
) -> None:
    picked = run(op="pick", input=obj, keys=keys)
    omitted = run(op="omit", input=obj, keys=keys)
    assert set(picked).isdisjoint(omitted)
    assert {**picked, **omitted} == obj


@given(objects, objects, objects)
def test_merge_is_associative(a: dict[str, Any], b: dict[str, Any], c: dict[str, Any]) -> None:
    left = run(op="merge", inputs=[run(op="merge", inputs=[a, b]), c])
    right = run(op="merge", inputs=[a, run(op="merge", inputs=[b, c])])
    assert left == right == run(op="merge", inputs=[a, b, c])


def test_references_resolve_whole_values_and_inside_text() -> None:
    params = {"input": "${steps.a.output.items}", "prompt": "n=${goal.inputs.n}", "keep": "plain"}
    resolved = resolve(params, {"n": 3}, {"a": {"items": [1, 2]}})
    assert resolved == {"input": [1, 2], "prompt": "n=3", "keep": "plain"}


def test_an_unresolvable_reference_names_itself() -> None:
    with pytest.raises(UnresolvedReference, match=r"\$\{steps.a.output.nope\}"):
        resolve({"x": "${steps.a.output.nope}"}, {}, {"a": {}})
    with pytest.raises(UnresolvedReference, match="has no output"):
        resolve({"x": "${steps.zz.output}"}, {}, {})
