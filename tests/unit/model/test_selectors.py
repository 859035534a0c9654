"""LabelSelector: parsing, validation, Kubernetes matching semantics, canonical form."""

from __future__ import annotations

from typing import Any

import pytest

from netfence.model.selectors import EVERYTHING, LabelSelector, PolicyError, Requirement


def sel(data: dict[str, Any]) -> LabelSelector:
    return LabelSelector.from_k8s(data)


def expr(key: str, op: str, *values: str) -> dict[str, Any]:
    out: dict[str, Any] = {"key": key, "operator": op}
    if values:
        out["values"] = list(values)
    return out


MATCH_CASES: list[tuple[dict[str, Any], dict[str, str], bool]] = [
    ({}, {}, True),
    ({}, {"a": "1"}, True),
    ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
    ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
    ({"matchLabels": {"a": "1"}}, {}, False),
    ({"matchLabels": {"a": "1", "b": "2"}}, {"a": "1"}, False),
    ({"matchExpressions": [expr("a", "In", "1", "2")]}, {"a": "2"}, True),
    ({"matchExpressions": [expr("a", "In", "1", "2")]}, {"a": "3"}, False),
    ({"matchExpressions": [expr("a", "In", "1")]}, {}, False),
    ({"matchExpressions": [expr("a", "NotIn", "1")]}, {}, True),  # absent key matches NotIn
    ({"matchExpressions": [expr("a", "NotIn", "1")]}, {"a": "2"}, True),
    ({"matchExpressions": [expr("a", "NotIn", "1")]}, {"a": "1"}, False),
    ({"matchExpressions": [expr("a", "Exists")]}, {"a": ""}, True),
    ({"matchExpressions": [expr("a", "Exists")]}, {"b": "1"}, False),
    ({"matchExpressions": [expr("a", "DoesNotExist")]}, {}, True),
    ({"matchExpressions": [expr("a", "DoesNotExist")]}, {"a": "1"}, False),
    (
        {"matchLabels": {"a": "1"}, "matchExpressions": [expr("b", "DoesNotExist")]},
        {"a": "1", "b": "x"},
        False,
    ),
    ({"matchLabels": {"a": "1"}, "matchExpressions": [expr("b", "DoesNotExist")]}, {"a": "1"}, True),
    ({"matchLabels": None, "matchExpressions": None}, {"x": "y"}, True),
]


@pytest.mark.parametrize(("data", "labels", "expected"), MATCH_CASES)
def test_matches_like_kubernetes(data: dict[str, Any], labels: dict[str, str], expected: bool) -> None:
    assert sel(data).matches(labels) is expected


ERROR_CASES: list[tuple[Any, str]] = [
    ({"matchExpressions": [expr("a", "Foo", "1")]}, "matchExpressions[0].operator: unknown operator 'Foo'"),
    ({"matchExpressions": [expr("a", "In")]}, "matchExpressions[0].values: must be non-empty"),
    ({"matchExpressions": [expr("a", "NotIn")]}, "must be non-empty when operator is NotIn"),
    ({"matchExpressions": [expr("a", "Exists", "1")]}, "must be empty when operator is Exists"),
    ({"matchExpressions": [expr("a", "DoesNotExist", "1")]}, "must be empty when operator is DoesNotExist"),
    ({"matchExpressions": [{"operator": "Exists"}]}, "matchExpressions[0].key"),
    ({"matchLabels": {"a": 1}}, "label value must be a string"),
    ({"matchLabels": {"bad key!": "1"}}, "invalid label key"),
    ({"matchLabels": {"a": "-bad-"}}, "invalid label value"),
    ({"matchLabels": ["a"]}, "matchLabels: must be an object"),
    ({"matchExpressions": {"key": "a"}}, "matchExpressions: must be a list"),
    ("nope", "must be an object"),
]


@pytest.mark.parametrize(("data", "message"), ERROR_CASES)
def test_invalid_selectors_raise_with_field_path(data: Any, message: str) -> None:
    with pytest.raises(PolicyError) as err:
        LabelSelector.from_k8s(data, "spec.podSelector")
    assert message in str(err.value)
    assert str(err.value).startswith("spec.podSelector")


def test_prefixed_keys_are_valid() -> None:
    selector = sel({"matchLabels": {"kubernetes.io/metadata.name": "x"}})
    assert selector.matches({"kubernetes.io/metadata.name": "x"})
    assert selector.keys() == frozenset({"kubernetes.io/metadata.name"})


def test_keys_cover_labels_and_expressions() -> None:
    selector = sel({"matchLabels": {"a": "1"}, "matchExpressions": [expr("b", "Exists"), expr("a", "NotIn", "2")]})
    assert selector.keys() == frozenset({"a", "b"})
    assert EVERYTHING.keys() == frozenset()


def test_is_empty() -> None:
    assert sel({}).is_empty
    assert sel({"matchLabels": {}, "matchExpressions": []}).is_empty
    assert not sel({"matchLabels": {"a": "1"}}).is_empty


EQUIVALENT_PAIRS: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({"matchLabels": {"a": "1", "b": "2"}}, {"matchLabels": {"b": "2", "a": "1"}}),
    ({"matchLabels": {"a": "1"}}, {"matchExpressions": [expr("a", "In", "1")]}),
    ({"matchExpressions": [expr("a", "In", "2", "1", "2")]}, {"matchExpressions": [expr("a", "In", "1", "2")]}),
    (
        {"matchExpressions": [expr("b", "Exists"), expr("a", "NotIn", "x")]},
        {"matchExpressions": [expr("a", "NotIn", "x"), expr("b", "Exists"), expr("b", "Exists")]},
    ),
    ({"matchLabels": {"a": "1"}, "matchExpressions": [expr("a", "In", "1")]}, {"matchLabels": {"a": "1"}}),
]


@pytest.mark.parametrize(("left", "right"), EQUIVALENT_PAIRS)
def test_equivalent_selectors_have_equal_canonical_form(left: dict[str, Any], right: dict[str, Any]) -> None:
    assert sel(left).canonical() == sel(right).canonical()
    assert sel(left) == sel(right)


def test_canonical_form_shape() -> None:
    selector = sel(
        {
            "matchLabels": {"z": "1"},
            "matchExpressions": [expr("b", "NotIn", "y", "x"), expr("a", "Exists"), expr("z", "In", "2")],
        }
    )
    assert selector.canonical() == {
        "matchLabels": {"z": "1"},
        "matchExpressions": [
            {"key": "a", "operator": "Exists"},
            {"key": "b", "operator": "NotIn", "values": ["x", "y"]},
            {"key": "z", "operator": "In", "values": ["2"]},
        ],
    }
    assert sel({}).canonical() == {"matchLabels": {}, "matchExpressions": []}


def test_different_selectors_have_different_canonical_form() -> None:
    assert sel({"matchLabels": {"a": "1"}}).canonical() != sel({"matchLabels": {"a": "2"}}).canonical()
    assert (
        sel({"matchExpressions": [expr("a", "In", "1")]}).canonical()
        != sel({"matchExpressions": [expr("a", "NotIn", "1")]}).canonical()
    )


def test_requirement_and_from_labels_helpers() -> None:
    assert LabelSelector.from_labels({"a": "1"}) == sel({"matchLabels": {"a": "1"}})
    assert LabelSelector.of([Requirement("b", "Exists"), Requirement("a", "Exists")]).keys() == {"a", "b"}
    assert Requirement("a", "DoesNotExist").to_json() == {"key": "a", "operator": "DoesNotExist"}
