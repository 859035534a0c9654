"""Kubernetes label selectors: parsing, validation, matching, canonical form.

A :class:`LabelSelector` is stored as a normalised, sorted tuple of
:class:`Requirement` values (``matchLabels`` entries become ``In`` requirements
with one value), so two selectors that say the same thing compare equal and
have the same :meth:`LabelSelector.canonical` form.

Semantics follow ``k8s.io/apimachinery/pkg/labels``: requirements are ANDed,
``NotIn`` and ``DoesNotExist`` match when the key is absent, and an empty
selector matches everything. (A *null* selector, which matches nothing, is
represented by ``None`` where a selector is optional.)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Operator = Literal["In", "NotIn", "Exists", "DoesNotExist"]
OPERATORS: tuple[Operator, ...] = ("In", "NotIn", "Exists", "DoesNotExist")
_VALUED: frozenset[str] = frozenset({"In", "NotIn"})

_NAME_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class PolicyError(ValueError):
    """A NetworkPolicy (or a part of it) is malformed; the message names the field path."""


def _check_label_key(key: Any, path: str) -> str:
    if not isinstance(key, str) or not key:
        raise PolicyError(f"{path}: label key must be a non-empty string, got {key!r}")
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN_RE.match(prefix)):
        raise PolicyError(f"{path}: invalid label key prefix in {key!r}")
    if len(name) > 63 or not _NAME_RE.match(name):
        raise PolicyError(f"{path}: invalid label key {key!r}")
    return key


def _check_label_value(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise PolicyError(f"{path}: label value must be a string, got {value!r}")
    if value and (len(value) > 63 or not _NAME_RE.match(value)):
        raise PolicyError(f"{path}: invalid label value {value!r}")
    return value


@dataclass(frozen=True, slots=True, order=True)
class Requirement:
    """One ``key operator values`` clause; ``values`` is sorted and unique."""

    key: str
    operator: Operator
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        if self.operator == "NotIn":
            return self.key not in labels or labels[self.key] not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "operator": self.operator}
        if self.operator in _VALUED:
            out["values"] = list(self.values)
        return out


def _parse_expression(expr: Any, path: str) -> Requirement:
    if not isinstance(expr, Mapping):
        raise PolicyError(f"{path}: must be an object, got {expr!r}")
    key = _check_label_key(expr.get("key"), f"{path}.key")
    operator = expr.get("operator")
    if operator not in OPERATORS:
        raise PolicyError(f"{path}.operator: unknown operator {operator!r} (expected one of {', '.join(OPERATORS)})")
    raw_values = expr.get("values")
    if raw_values is None:
        raw_values = []
    if not isinstance(raw_values, list):
        raise PolicyError(f"{path}.values: must be a list, got {raw_values!r}")
    values = [_check_label_value(v, f"{path}.values[{i}]") for i, v in enumerate(raw_values)]
    if operator in _VALUED and not values:
        raise PolicyError(f"{path}.values: must be non-empty when operator is {operator}")
    if operator not in _VALUED and values:
        raise PolicyError(f"{path}.values: must be empty when operator is {operator}")
    return Requirement(key=key, operator=operator, values=tuple(sorted(set(values))))


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """A label selector; ``requirements`` is normalised (sorted, unique)."""

    requirements: tuple[Requirement, ...] = ()

    @classmethod
    def of(cls, requirements: tuple[Requirement, ...] | list[Requirement]) -> LabelSelector:
        """Build a selector from requirements in any order, normalising them."""
        return cls(requirements=tuple(sorted(set(requirements))))

    @classmethod
    def from_labels(cls, match_labels: Mapping[str, str]) -> LabelSelector:
        """The selector ``{matchLabels: match_labels}`` (no validation)."""
        return cls.of([Requirement(k, "In", (v,)) for k, v in match_labels.items()])

    @classmethod
    def from_k8s(cls, data: Any, path: str = "selector") -> LabelSelector:
        """Parse and validate a Kubernetes ``LabelSelector`` dict.

        Raises :class:`PolicyError` naming the offending field (prefixed with
        ``path``) on malformed input.
        """
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise PolicyError(f"{path}: must be an object, got {data!r}")
        reqs: list[Requirement] = []
        match_labels = data.get("matchLabels")
        match_labels = {} if match_labels is None else match_labels
        if not isinstance(match_labels, Mapping):
            raise PolicyError(f"{path}.matchLabels: must be an object, got {match_labels!r}")
        for key, value in match_labels.items():
            _check_label_key(key, f"{path}.matchLabels")
            _check_label_value(value, f"{path}.matchLabels[{key}]")
            reqs.append(Requirement(key, "In", (value,)))
        exprs = data.get("matchExpressions")
        exprs = [] if exprs is None else exprs
        if not isinstance(exprs, list):
            raise PolicyError(f"{path}.matchExpressions: must be a list, got {exprs!r}")
        for i, expr in enumerate(exprs):
            reqs.append(_parse_expression(expr, f"{path}.matchExpressions[{i}]"))
        return cls.of(reqs)

    @property
    def is_empty(self) -> bool:
        """True for the empty selector, which matches every label set."""
        return not self.requirements

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(req.matches(labels) for req in self.requirements)

    def keys(self) -> frozenset[str]:
        """The label keys this selector references (its answer depends only on them)."""
        return frozenset(req.key for req in self.requirements)

    def canonical(self) -> dict[str, Any]:
        """A normalised JSON form: equivalent selectors give equal dicts.

        Single-valued ``In`` requirements are written as ``matchLabels`` (at
        most one per key); everything else as sorted ``matchExpressions``.
        """
        match_labels: dict[str, str] = {}
        expressions: list[dict[str, Any]] = []
        for req in self.requirements:
            if req.operator == "In" and len(req.values) == 1 and req.key not in match_labels:
                match_labels[req.key] = req.values[0]
            else:
                expressions.append(req.to_json())
        return {"matchLabels": match_labels, "matchExpressions": expressions}


EVERYTHING = LabelSelector()
"""The empty selector (matches every label set)."""
